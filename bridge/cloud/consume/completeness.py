"""Completeness: per (site, epoch), each cloud's watermark and gaps and the merged view.

An ingest node answers ``Status``; a JetStream cloud read straight from its stream is asked
the same of its stream, as a replica would compute it (checkpoints, then the tail).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from typing import Any

import grpc

from bridge.cloud.consume import Key, NodeClient, is_jetstream
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import JetStreamSettings, TlsConfig, nats_servers
from bridge.shared.errors import StoreUnavailable

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


async def _stream_status(target: str, settings: JetStreamSettings | None,
                         timeout: float) -> pb.StatusReply | str:
    """A JetStream cloud's completeness, read straight from its stream with the reader's
    account: each subject's checkpoint (where the account may read the bucket) and the
    messages after it, as a replica would; nothing is created or written."""
    from bridge.cloud.store.backend import status_reply
    from bridge.cloud.store.jetstream import JetStreamStore

    base = settings or JetStreamSettings(servers=())
    store = JetStreamStore(settings=dataclasses.replace(
        base, servers=tuple(nats_servers(target)), ack_timeout_s=timeout), read_only=True)
    try:
        await store.start()
        return status_reply(f"jetstream:{base.stream}", await store.status())
    except (StoreUnavailable, OSError) as exc:
        return f"UNAVAILABLE: {exc}"
    finally:
        await store.close()


async def status(*, targets: list[str], tls: TlsConfig | None, timeout: float = 5.0,
                 jetstream: JetStreamSettings | None = None) -> dict[str, Any]:
    """Per (site, epoch): each cloud's watermark and gaps, and the merged view."""
    replies: dict[str, pb.StatusReply | str] = {}

    async def one(target: str) -> None:
        if is_jetstream(target):
            replies[target] = await _stream_status(target, jetstream, timeout)
            return
        if tls is None:
            replies[target] = "no consumer certificate to ask this node with"
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
