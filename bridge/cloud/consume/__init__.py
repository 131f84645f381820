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
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import orjson
from google.protobuf.message import DecodeError

from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.config import JetStreamSettings, TlsConfig, nats_servers
from bridge.shared.errors import CursorError, SourceUnavailable
from bridge.shared.grpcconn import channel_options, mtls_channel
from bridge.shared.pacing import Backoff, wait_event
from bridge.shared.telemetry import event

Key = tuple[str, int]
IDLE_S = 30.0  # a whole read gives up on a source after this long without a message
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
    src = env.source  # each attribute access of a sub-message builds a new wrapper
    out: dict[str, Any] = {
        "site_id": env.site_id, "epoch": f"{env.epoch:016x}", "seq": env.seq,
        "source": {"protocol": _PROTOCOL.get(src.protocol), "broker": src.broker,
                   "topic": src.topic, "name": src.name},
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


class Progress:
    """Progress of a read on a terminal (standard error): readings emitted, their rate, and
    how many came from each cloud; redrawn in place at most every ``every_s``."""

    def __init__(self, out: TextIO, *, every_s: float = 0.5) -> None:
        self.out, self.every_s = out, every_s
        self.total = 0
        self.per_node: dict[str, int] = {}
        self._t0 = self._shown = time.monotonic()

    def add(self, batch: list[pb.Committed]) -> None:
        for c in batch:
            self.per_node[c.node] = self.per_node.get(c.node, 0) + 1
        self.total += len(batch)
        if time.monotonic() - self._shown >= self.every_s:
            self._draw("")

    def done(self) -> None:
        self._draw("\n")

    def _draw(self, end: str) -> None:
        self._shown = now = time.monotonic()
        rate = self.total / max(now - self._t0, 1e-9)
        clouds = ", ".join(f"{n} {k:,}" for n, k in sorted(self.per_node.items()))
        self.out.write(f"\r\x1b[K{self.total:,} readings, {rate:,.0f}/s"
                       + (f" ({clouds})" if clouds else "") + end)
        self.out.flush()


class NodeClient:
    """One ingest node, read with a consumer certificate."""

    def __init__(self, *, target: str, tls: TlsConfig) -> None:
        self.target = target
        self.channel = mtls_channel(target, tls.read(),
                                    options=channel_options(backoff_max_s=5.0))
        self.stub = pb_grpc.IngestStub(self.channel)

    async def subscribe(self, cursors: dict[Key, int], *, follow: bool,
                        timeout: float | None) -> AsyncIterator[pb.Committed]:
        """The node's readings after ``cursors``, read in batches (SubscribeBatches); from a
        node that predates it, one per message (Subscribe)."""
        req = pb.SubscribeRequest(follow=follow, cursors=[
            pb.Cursor(site_id=s, epoch=e, after_seq=n) for (s, e), n in cursors.items()])
        batches: Any = self.stub.SubscribeBatches(req, timeout=timeout)
        try:
            async for batch in batches:
                for c in batch.items:
                    yield c
            return
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
        finally:
            batches.cancel()
        single: Any = self.stub.Subscribe(req, timeout=timeout)
        try:
            async for c in single:
                yield c
        finally:
            single.cancel()

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

        from bridge.cloud.store import stream

        try:
            self._nc = await nats.connect(servers=self.servers, connect_timeout=5,
                                          max_reconnect_attempts=2,
                                          **self.settings.connect_options())
            js = self._nc.jetstream()
            info = await js.stream_info(self.stream)
            if info.state.messages == 0 and not follow:
                return
            # Progress, not a deadline: a whole read takes as long as it takes while
            # messages keep coming; ``timeout`` is the longest silence (None: follow).
            messages = stream.messages(js, f"{self.prefix}.>", start=None,
                                       idle_s=None if follow else timeout or IDLE_S)
            node = f"jetstream:{self.stream}"
            async for msg in messages:
                meta = stream.delivery(msg)
                c = pb.Committed(node=node)
                try:
                    c.envelope.MergeFromString(msg.data)  # parsed in place: no copy
                except DecodeError:  # another publisher's message on our subjects
                    event("consume.unreadable_record", level=logging.WARNING,
                          target=self.target, stream_seq=meta.stream_seq)
                    continue
                env = c.envelope
                if env.seq > cursors.get((env.site_id, env.epoch), 0):
                    c.commit_time_ns = meta.time_ns
                    yield c
                if not follow and meta.pending == 0:
                    return
        except (nats.errors.Error, OSError) as exc:  # before TimeoutError: nats's subclass it
            raise SourceUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError:
            raise SourceUnavailable("the stream stopped answering (no message for "
                                    f"{timeout or IDLE_S:g} s)") from None

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
                   timeout: float = IDLE_S,
                   jetstream: JetStreamSettings | None = None,
                   emit: Callable[[list[pb.Committed]], None] | None = None) -> dict[str, str]:
    """One pass over every node (no follow) into ``merger``; returns per-node errors.

    There is no deadline on the pass: a source is given up only after ``timeout`` seconds
    without a message. With ``emit``, what is contiguous is emitted as the read goes (every
    ``EMIT_EVERY`` readings), so memory holds what waits above a gap, not the whole read."""
    cursors = dict(merger.cursors)
    errors: dict[str, str] = {}
    added = 0

    async def one(target: str) -> None:
        nonlocal added
        client = client_for(target, tls, jetstream)
        try:
            # A JetStream read watches its own silences; a node's stream is watched here.
            stream = _watched(client.subscribe(cursors, follow=False, timeout=None), timeout) \
                if isinstance(client, NodeClient) else \
                client.subscribe(cursors, follow=False, timeout=timeout)
            async for c in stream:
                merger.add(c)
                added += 1
                if emit is not None and added % EMIT_EVERY == 0:
                    emit(merger.drain())
        except SourceUnavailable as err:
            errors[target] = f"UNAVAILABLE: {err}"
            event("consume.node_unavailable", level=logging.WARNING, target=target,
                  reason=errors[target])
        except grpc.aio.AioRpcError as err:
            errors[target] = f"{err.code().name}: {err.details()}"
            event("consume.node_unavailable", level=logging.WARNING, target=target,
                  reason=errors[target])
        finally:
            await client.close()

    await asyncio.gather(*(one(t) for t in targets))
    return errors


EMIT_EVERY = 1000


async def _watched(stream: AsyncIterator[pb.Committed], idle: float
                   ) -> AsyncIterator[pb.Committed]:
    """``stream``, ended with SourceUnavailable after ``idle`` seconds without an item."""
    it = stream.__aiter__()
    while True:
        try:
            async with asyncio.timeout(idle):
                item = await it.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise SourceUnavailable(f"no reading for {idle:g} s") from None
        yield item


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
            await wait_event(changed, 0.5)
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


# Completeness (``status``) lives beside the reading, in ``completeness``.
from bridge.cloud.consume.completeness import (  # noqa: E402 - it uses the clients above
    committed_intervals,
    format_status,
    status,
    union,
    watermark_and_gaps,
)

__all__ = ["JetStreamClient", "Merger", "NodeClient", "client_for", "committed_intervals",
           "follow", "format_status", "is_jetstream", "load_cursors", "read_all",
           "reading_json", "save_cursors", "status", "union", "watermark_and_gaps"]
