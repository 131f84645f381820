"""The consumer: read every cloud's ingest, merge per (site, epoch) by seq, emit each reading once.

Each cloud's store is complete for what reached it; together they hold everything. The merge
keeps, per (site, epoch), the readings above the cursor and emits them only while they are
contiguous (seq = cursor + 1, + 2, ...): the output is in per-site order, has no duplicates, and
never skips a reading that is merely late (still in an agent's spool or in flight). Readings
held back above a gap are not lost: the cursor stays below them and the next run reads them
again. ``status`` shows the gaps by name, per cloud and merged.

Cursor file (JSON, replaced atomically): ``{"version": 1, "streams": [{"site_id": ...,
"epoch": "<16 hex digits>", "after_seq": N}, ...]}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import orjson
from google.protobuf.message import DecodeError

from bridge._pb import bridge_pb2 as pb
from bridge._pb import bridge_pb2_grpc as pb_grpc
from bridge.common import Backoff, channel_options
from bridge.config import JetStreamSettings, TlsConfig, nats_servers
from bridge.errors import CursorError, SourceUnavailable
from bridge.telemetry import event

Key = tuple[str, int]
_QUALITY = {0: None, 1: "good", 2: "uncertain", 3: "bad"}
_PROTOCOL = {0: None, 1: "mqtt", 2: "amqp"}


def load_cursors(path: Path | None) -> dict[Key, int]:
    if path is None or not path.exists():
        return {}
    try:
        doc = orjson.loads(path.read_bytes())
        return {(s["site_id"], int(s["epoch"], 16)): int(s["after_seq"])
                for s in doc["streams"]}
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CursorError(f"{path}: not a cursor file ({exc}); move it aside to start over") \
            from exc


def save_cursors(path: Path, cursors: dict[Key, int]) -> None:
    doc = {"version": 1, "streams": [{"site_id": s, "epoch": f"{e:016x}", "after_seq": n}
                                     for (s, e), n in sorted(cursors.items())]}
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def reading_json(c: pb.Committed) -> dict[str, Any]:
    env = c.envelope
    if env.HasField("dropped"):
        d = env.dropped
        return {"site_id": env.site_id, "epoch": f"{env.epoch:016x}", "seq": env.seq,
                "last_seq": d.last_seq, "dropped": {"reason": d.reason, "count": d.count},
                "gateway_time_ns": env.gateway_time_ns, "node": c.node}
    values = []
    for v in env.values:
        kind = v.WhichOneof("kind")
        item: dict[str, Any] = {"signal": v.signal,
                                "value": getattr(v, kind) if kind else None}
        if v.unit:
            item["unit"] = v.unit
        if v.quality:
            item["quality"] = _QUALITY.get(v.quality)
        if v.HasField("source_time_ns"):
            item["source_time_ns"] = v.source_time_ns
        if v.historical:
            item["historical"] = True
        values.append(item)
    out: dict[str, Any] = {
        "site_id": env.site_id, "epoch": f"{env.epoch:016x}", "seq": env.seq,
        "source": {"protocol": _PROTOCOL.get(env.source.protocol), "broker": env.source.broker,
                   "topic": env.source.topic, "name": env.source.name},
        "gateway_time_ns": env.gateway_time_ns, "clock_synced": env.clock_synced,
        "values": values, "codec": env.codec, "node": c.node,
    }
    if env.HasField("source_time_ns"):
        out["source_time_ns"] = env.source_time_ns
    if env.HasField("source_seq"):
        out["source_seq"] = env.source_seq
    if env.labels:
        out["labels"] = dict(sorted(env.labels.items()))
    if env.raw:
        out["raw_hex"] = env.raw.hex()
    return out


class NodeClient:
    """One ingest node, read with a consumer certificate."""

    def __init__(self, *, target: str, tls: TlsConfig) -> None:
        ca, cert, key = tls.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=cert)
        self.target = target
        self.channel = grpc.aio.secure_channel(target, creds,
                                               options=channel_options(backoff_max_s=5.0))
        self.stub = pb_grpc.IngestStub(self.channel)

    def subscribe(self, cursors: dict[Key, int], *, follow: bool,
                  timeout: float | None) -> AsyncIterator[pb.Committed]:
        req = pb.SubscribeRequest(follow=follow, cursors=[
            pb.Cursor(site_id=s, epoch=e, after_seq=n) for (s, e), n in cursors.items()])
        stream: Any = self.stub.Subscribe(req, timeout=timeout)
        return cast("AsyncIterator[pb.Committed]", stream)

    async def status(self, *, timeout: float) -> pb.StatusReply:
        reply: pb.StatusReply = await self.stub.Status(pb.StatusRequest(), timeout=timeout)
        return reply

    async def close(self) -> None:
        await self.channel.close(grace=None)


class JetStreamClient:
    """A JetStream-backed cloud read straight from its stream (``nats://HOST:PORT[,...]``):
    the same merge, no ingest node in between (subject layout in docs/consuming.md)."""

    def __init__(self, *, target: str, settings: JetStreamSettings | None = None) -> None:
        """``settings``: the stream's name and subject prefix, credentials and TLS (the
        consumer config's ``[jetstream]``); its ``servers`` are ignored for ``target``'s."""
        self.target = target
        self.servers = nats_servers(target)
        self.settings = settings or JetStreamSettings(servers=())
        self.stream, self.prefix = self.settings.stream, self.settings.prefix
        self._nc: Any = None

    async def subscribe(self, cursors: dict[Key, int], *, follow: bool,
                        timeout: float | None) -> AsyncIterator[pb.Committed]:
        import nats
        from nats.js.api import ConsumerConfig, DeliverPolicy

        try:
            self._nc = await nats.connect(servers=self.servers, connect_timeout=5,
                                          max_reconnect_attempts=2,
                                          **self.settings.connect_options())
            js = self._nc.jetstream()
            info = await js.stream_info(self.stream)
            if info.state.messages == 0 and not follow:
                return
            sub = await js.subscribe(f"{self.prefix}.>", ordered_consumer=True,
                                     config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise SourceUnavailable(f"{type(exc).__name__}: {exc}") from exc
        while True:
            try:
                msg = await sub.next_msg(timeout=timeout or 5.0)
            except nats.errors.TimeoutError:
                if follow:
                    continue
                raise SourceUnavailable("the stream stopped answering") from None
            meta = msg.metadata
            try:
                env = pb.Envelope.FromString(msg.data)
            except DecodeError:  # another publisher's message on our subjects: not a reading
                event("consume.unreadable_record", level=logging.WARNING, target=self.target,
                      stream_seq=meta.sequence.stream)
                continue
            if env.seq > cursors.get((env.site_id, env.epoch), 0):
                yield pb.Committed(envelope=env, node=f"jetstream:{self.stream}",
                                   commit_time_ns=int(meta.timestamp.timestamp() * 1e9)
                                   if meta.timestamp else 0)
            if not follow and meta.num_pending == 0:
                return

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()


def is_jetstream(target: str) -> bool:
    return target.startswith(("nats://", "tls://"))


def client_for(target: str, tls: TlsConfig | None,
               jetstream: JetStreamSettings | None = None) -> NodeClient | JetStreamClient:
    if is_jetstream(target):
        return JetStreamClient(target=target, settings=jetstream)
    if tls is None:
        raise ValueError(f"{target}: an ingest node is read with a consumer certificate")
    return NodeClient(target=target, tls=tls)


@dataclass
class Merger:
    """Per (site, epoch): cursor plus the readings held above it, emitted when contiguous."""

    cursors: dict[Key, int] = field(default_factory=dict)
    held: dict[Key, dict[int, pb.Committed]] = field(default_factory=dict)
    duplicates: int = 0

    def add(self, c: pb.Committed) -> None:
        key = (c.envelope.site_id, c.envelope.epoch)
        seq = c.envelope.seq
        held = self.held.setdefault(key, {})
        if seq <= self.cursors.get(key, 0) or seq in held:
            self.duplicates += 1
            return
        held[seq] = c

    def drain(self) -> list[pb.Committed]:
        out: list[pb.Committed] = []
        for key in self._ordered_keys():
            held = self.held[key]
            n = self.cursors.get(key, 0)
            jumped = False
            while n + 1 in held:
                c = held.pop(n + 1)
                out.append(c)
                # A tombstone covers seq..dropped.last_seq: the gap is named, not waited for.
                if c.envelope.HasField("dropped"):
                    n, jumped = max(n + 1, c.envelope.dropped.last_seq), True
                else:
                    n += 1
            if jumped:  # readings held inside a tombstone's range are accounted for by it
                for seq in [s for s in held if s <= n]:
                    del held[seq]
                    self.duplicates += 1
            self.cursors[key] = n
        return out

    def _ordered_keys(self) -> list[Key]:
        def first_time(key: Key) -> tuple[str, int]:
            held = self.held[key]
            t = held[min(held)].envelope.gateway_time_ns if held else 0
            return key[0], t
        return sorted(self.held, key=first_time)

    def pending(self) -> int:
        return sum(len(h) for h in self.held.values())


async def read_all(*, targets: Iterable[str], tls: TlsConfig | None, merger: Merger,
                   timeout: float = 30.0,
                   jetstream: JetStreamSettings | None = None) -> dict[str, str]:
    """One pass over every node (no follow) into ``merger``; returns per-node errors."""
    cursors = dict(merger.cursors)
    errors: dict[str, str] = {}

    async def one(target: str) -> None:
        client = client_for(target, tls, jetstream)
        try:
            async for c in client.subscribe(cursors, follow=False, timeout=timeout):
                merger.add(c)
        except grpc.aio.AioRpcError as err:
            errors[target] = f"{err.code().name}: {err.details()}"
            event("consume.node_unavailable", level=logging.WARNING, target=target,
                  reason=errors[target])
        except SourceUnavailable as err:
            errors[target] = f"UNAVAILABLE: {err}"
            event("consume.node_unavailable", level=logging.WARNING, target=target,
                  reason=errors[target])
        finally:
            await client.close()

    await asyncio.gather(*(one(t) for t in targets))
    return errors


async def follow(*, targets: Iterable[str], tls: TlsConfig | None, merger: Merger,
                 emit: Callable[[list[pb.Committed]], None], stop: asyncio.Event,
                 jetstream: JetStreamSettings | None = None) -> None:
    """Keep reading every node until ``stop``; emit in order as readings become contiguous."""
    changed = asyncio.Event()

    async def one(target: str) -> None:
        backoff = Backoff(base_s=0.2, cap_s=10.0)
        client = client_for(target, tls, jetstream)
        try:
            while not stop.is_set():
                try:
                    async for c in client.subscribe(merger.cursors, follow=True, timeout=None):
                        merger.add(c)
                        changed.set()
                        backoff.reset()
                except grpc.aio.AioRpcError as err:
                    event("consume.node_unavailable", level=logging.WARNING, target=target,
                          reason=f"{err.code().name}: {err.details()}")
                except SourceUnavailable as err:
                    event("consume.node_unavailable", level=logging.WARNING, target=target,
                          reason=str(err))
                await backoff.sleep()
        finally:
            await client.close()

    async def pump() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 0.5)
            changed.clear()
            out = merger.drain()
            if out:
                emit(out)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(t), name=f"consume-{t}") for t in targets]
        tasks.append(tg.create_task(pump(), name="consume-pump"))
        await stop.wait()
        for t in tasks:
            t.cancel()
    emit(merger.drain())


# -- completeness ---------------------------------------------------------------------------

Intervals = list[tuple[int, int]]


def committed_intervals(s: pb.StreamStatus) -> Intervals:
    out: Intervals = [(1, s.committed_through)] if s.committed_through else []
    prev = s.committed_through
    for g in s.gaps:
        if g.first_seq > prev + 1:
            out.append((prev + 1, g.first_seq - 1))
        prev = g.last_seq
    if s.highest_seq > prev:
        out.append((prev + 1, s.highest_seq))
    return out


def union(intervals: Iterable[tuple[int, int]]) -> Intervals:
    out: Intervals = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def watermark_and_gaps(iv: Intervals) -> tuple[int, Intervals]:
    wm = iv[0][1] if iv and iv[0][0] == 1 else 0
    gaps: Intervals = []
    prev = 0
    for a, b in iv:
        if a > prev + 1:
            gaps.append((prev + 1, a - 1))
        prev = b
    return wm, gaps


async def status(*, targets: list[str], tls: TlsConfig | None,
                 timeout: float = 5.0) -> dict[str, Any]:
    """Per (site, epoch): each cloud's watermark and gaps, and the merged view."""
    replies: dict[str, pb.StatusReply | str] = {}

    async def one(target: str) -> None:
        if is_jetstream(target) or tls is None:
            replies[target] = ("UNIMPLEMENTED: completeness of a JetStream-backed cloud is "
                               "asked of one of its ingest replicas (--from HOST:PORT)")
            return
        client = NodeClient(target=target, tls=tls)
        try:
            replies[target] = await client.status(timeout=timeout)
        except grpc.aio.AioRpcError as err:
            replies[target] = f"{err.code().name}: {err.details()}"
        finally:
            await client.close()

    await asyncio.gather(*(one(t) for t in targets))
    streams: dict[Key, dict[str, Any]] = {}
    nodes = []
    for target in targets:
        reply = replies[target]
        if isinstance(reply, str):
            nodes.append({"target": target, "error": reply})
            continue
        nodes.append({"target": target, "node": reply.node})
        for s in reply.streams:
            entry = streams.setdefault((s.site_id, s.epoch), {"clouds": {}, "_iv": []})
            iv = committed_intervals(s)
            entry["_iv"].extend(iv)
            entry["clouds"][reply.node] = {
                "committed_through": s.committed_through, "highest_seq": s.highest_seq,
                "committed": s.committed, "gaps": [[g.first_seq, g.last_seq] for g in s.gaps]}
            for d in s.dropped:
                entry.setdefault("_dropped", {})[(d.first_seq, d.last_seq)] = d.reason
    out = []
    for (site, epoch), entry in sorted(streams.items()):
        merged = union(entry.pop("_iv"))
        wm, gaps = watermark_and_gaps(merged)
        highest = merged[-1][1] if merged else 0
        dropped = [{"first_seq": a, "last_seq": b, "reason": r}
                   for (a, b), r in sorted(entry.pop("_dropped", {}).items())]
        out.append({"site_id": site, "epoch": f"{epoch:016x}", "clouds": entry["clouds"],
                    "merged": {"committed_through": wm, "highest_seq": highest,
                               "readings": sum(b - a + 1 for a, b in merged)
                               - sum(d["last_seq"] - d["first_seq"] + 1 for d in dropped),
                               "gaps": [list(g) for g in gaps], "dropped": dropped}})
    return {"nodes": nodes, "streams": out}


def format_status(doc: dict[str, Any]) -> str:
    lines = []
    for n in doc["nodes"]:
        state = f"node {n['node']}" if "node" in n else f"UNREACHABLE ({n['error']})"
        lines.append(f"{n['target']:<24} {state}")
    for s in doc["streams"]:
        m = s["merged"]
        lines.append("")
        lines.append(f"site {s['site_id']}  epoch {s['epoch']}")
        for node, c in sorted(s["clouds"].items()):
            gaps = ", ".join(f"{a}-{b}" for a, b in c["gaps"]) or "none"
            lines.append(f"  {node:<10} committed through {c['committed_through']:>10}  "
                         f"highest {c['highest_seq']:>10}  gaps: {gaps}")
        gaps = ", ".join(f"{a}-{b}" for a, b in m["gaps"]) or "none"
        verdict = "complete" if not m["gaps"] else "INCOMPLETE"
        for d in m["dropped"]:
            lines.append(f"  {'dropped':<10} seqs {d['first_seq']}-{d['last_seq']} at the edge: "
                         f"{d['reason']}")
        lines.append(f"  {'merged':<10} committed through {m['committed_through']:>10}  "
                     f"highest {m['highest_seq']:>10}  gaps: {gaps}  ({verdict} up to "
                     f"seq {m['committed_through']})")
    return "\n".join(lines)
