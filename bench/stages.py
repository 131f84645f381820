"""Where a reading's publish-to-commit latency goes, stage by stage (``python -m bench.stages``).

Starts the bridge as ``make bench`` does (site mosquitto, agent, one ingest), publishes at a
paced rate with ``bench.load.Paced`` and splits every committed reading's latency at the
envelope's ``gateway_time_ns`` (stamped when the intake takes the message off the source):

* ``publish -> intake``: the publisher, mosquitto, the agent's paho thread and its inbox, and
  the wait for the intake's previous group commit;
* ``intake -> commit``: the intake's own commit (fsync), the sender's read of the spool, the
  gRPC call and the ingest's commit (its ``commit_time_ns``).

Then, from the two processes' access logs, the agent's call duration (``uplink.batch``) next to
the ingest handler's (``ingest.batch``): the difference is gRPC and the two event loops. Last,
with the load stopped, the floor of one call on this machine: a gRPC health check and a
one-reading ``PushBatch`` to the same ingest, back to back, with the CPU each costs the
ingest. The CPU share of each process during the paced run is printed too: at a low rate the
per-batch costs (one commit, one read, one call and one release per few readings) dominate.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from bench.evidence import cpu_seconds
from bench.latency import _settle
from bench.load import Paced
from bench.results import percentile
from bench.systems import Bridge
from bridge.edge.envelope import encode_batch
from bridge.edge.uplink.transport import GrpcTransport
from bridge.shared._pb import bridge_pb2 as pb


def _line(name: str, values: list[float]) -> str:
    return (f"  {name:<26} p50 {percentile(values, 50):7.2f}  p90 {percentile(values, 90):7.2f}"
            f"  p99 {percentile(values, 99):7.2f} ms  (n={len(values):,})")


def _durations(log: Path, name: str) -> list[float]:
    out = []
    for raw in log.read_bytes().splitlines():
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if doc.get("event") == name and doc.get("status") == "OK":
            out.append(float(doc["duration_ms"]))
    return out


async def _floor(bridge: Bridge, calls: int) -> list[str]:
    """One call's cost with nothing else running: health checks, then one-reading pushes."""
    t = GrpcTransport(target=bridge.node.target, tls=bridge.pki.site(bridge.site),
                      backoff_max_s=1.0)
    pid = bridge.node.proc.pid
    lines = []
    try:
        await t.healthy(timeout=5)
        lat, c0 = [], cpu_seconds(pid)
        for _ in range(calls):
            s = time.perf_counter()
            await t.healthy(timeout=5)
            lat.append((time.perf_counter() - s) * 1000)
        lines.append(_line("health check", lat)
                     + f", ingest CPU {(cpu_seconds(pid) - c0) / calls * 1000:.2f} ms/call")
        epoch = int.from_bytes(uuid.uuid4().bytes[:7], "big")  # not the agent's epoch
        lat, c0 = [], cpu_seconds(pid)
        for seq in range(1, calls + 1):
            env = pb.Envelope(site_id=bridge.site, epoch=epoch, seq=seq,
                              gateway_time_ns=time.time_ns())
            blob = encode_batch(str(uuid.uuid4()), [env.SerializeToString()])
            s = time.perf_counter()
            await t.push(blob, batch_id="floor", timeout=5)
            lat.append((time.perf_counter() - s) * 1000)
        lines.append(_line("PushBatch, 1 reading", lat)
                     + f", ingest CPU {(cpu_seconds(pid) - c0) / calls * 1000:.2f} ms/call")
    finally:
        await t.close()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.stages")
    ap.add_argument("--rate", type=int, default=1000, help="readings per second (paced)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--calls", type=int, default=1000, help="calls for the idle floor")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        bridge = Bridge(workdir=Path(tmp))
        bridge.start()
        try:
            pids = bridge.pids()
            count = int(args.rate * args.seconds)
            pub = Paced(port=bridge.mqtt_port, site="bench-site", count=count, rate=args.rate)
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            t0 = time.monotonic()
            pub.start().join(args.seconds * 3 + 60)
            elapsed = time.monotonic() - t0
            cpu = {k: (cpu_seconds(p) - before[k]) / elapsed * 100 for k, p in pids.items()}
            _settle(bridge, len(pub.acked), quiet_s=5, timeout=120)
            stream = bridge.stream()
            assert bridge.agent is not None
            agent_calls = _durations(bridge.agent.proc.log, "uplink.batch")
            ingest_calls = _durations(bridge.node.proc.log, "ingest.batch")
            floor = asyncio.run(_floor(bridge, args.calls))
        finally:
            bridge.stop()
    env = [c.envelope for c in stream]
    print(f"{len(stream):,} readings at {args.rate:,}/s (offered {pub.sent / elapsed:,.0f}/s), "
          f"{len(agent_calls):,} batches ({len(stream) / max(len(agent_calls), 1):.1f} "
          "readings each)")
    print("CPU during the run: " + ", ".join(f"{k} {v:.0f}%" for k, v in cpu.items()))
    print("latency by stage:")
    print(_line("publish -> intake", [(e.gateway_time_ns - e.source_time_ns) / 1e6 for e in env]))
    print(_line("intake -> ingest commit", [(c.commit_time_ns - c.envelope.gateway_time_ns)
                                            / 1e6 for c in stream]))
    print(_line("publish -> ingest commit", [(c.commit_time_ns - c.envelope.source_time_ns)
                                             / 1e6 for c in stream]))
    print("one batch:")
    print(_line("agent's call (uplink)", agent_calls))
    print(_line("ingest's handler", ingest_calls))
    print("one call with nothing else running:")
    for line in floor:
        print(line)


if __name__ == "__main__":
    main()
