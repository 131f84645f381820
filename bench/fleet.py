"""``fleet``: many sites at once against one SQLite node and against two JetStream replicas.

Every site has its own certificate and its own mTLS channel and pushes 100-reading batches
back to back, one in flight (an agent's live lane), for ``seconds``; a call refused busy
(admission control) waits its retry-after as the agent does; the load generator is
one process of this machine. Reported per store: committed readings/s, p99 per call, and the
ingest's RSS per connected, active site (RSS after the load minus RSS with one site
connected, over the sites; for two replicas, both processes). Every (site, seq) is then read
back from the store with a plain client and must be there exactly once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import nats

from bench import client
from bench.memory import rss_mb
from bench.results import Row, percentile
from bridge.edge.uplink.layers import hinted_wait
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.grpcconn import mtls_channel
from devkit import localrun
from devkit.jscluster import JetStreamCluster

SCENARIO = "fleet"
BATCH = 100


async def _load(targets: list[str], pkis: localrun.Pki, sites: list[str], seconds: float,
                ) -> tuple[dict[str, int], list[float], int, int]:
    """(highest seq stored per site, call seconds of answered calls, calls failed, calls
    refused busy: each waited its retry-after as the agent does)."""
    latencies: list[float] = []
    highest: dict[str, int] = {}
    failed = refused = 0
    start = asyncio.Event()
    ready = 0
    channels = []
    for i, site in enumerate(sites):
        channels.append(mtls_channel(targets[i % len(targets)], pkis.site(site).read()))

    async def site_loop(ch: grpc.aio.Channel, site: str) -> None:
        nonlocal failed, refused, ready
        stub = pb_grpc.IngestStub(ch)
        await ch.channel_ready()
        ready += 1
        if ready == len(sites):
            start.set()
        await start.wait()
        deadline = time.monotonic() + seconds
        seq = 0
        while time.monotonic() < deadline:
            envs = [pb.Envelope(site_id=site, epoch=1, seq=seq + k + 1,
                                values=[pb.Value(signal="v", number=float(k))])
                    for k in range(BATCH)]
            t0 = time.perf_counter()
            try:
                await stub.PushBatch(pb.Batch(batch_id=f"{site}-{seq}", envelopes=envs),
                                     timeout=30, metadata=client.stated(30))
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:  # as the agent does
                    refused += 1
                    await asyncio.sleep(hinted_wait(client.retry_after(err)))
                    continue
                failed += 1
                continue
            latencies.append(time.perf_counter() - t0)
            seq += BATCH
        highest[site] = seq

    try:
        await asyncio.gather(*(site_loop(ch, s) for ch, s in zip(channels, sites,
                                                                  strict=True)))
    finally:
        for ch in channels:
            await ch.close(grace=None)
    return highest, latencies, failed, refused


def _sqlite_counts(path: Path) -> dict[str, tuple[int, int, int]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {site: (n, lo, hi) for site, n, lo, hi in db.execute(
            "SELECT site_id, COUNT(*), MIN(seq), MAX(seq) FROM readings GROUP BY site_id")}
    finally:
        db.close()


async def _stream_counts(servers: list[str]) -> dict[str, tuple[int, int, int]]:
    """Per site: messages, and (from the subject's size) nothing else is needed: a subject
    holds each seq at most once by the dedupe invariant, so count == highest means exact."""
    nc = await nats.connect(servers=servers)
    try:
        info = await nc.jetstream().stream_info("BRIDGE", subjects_filter="bridge.r.>")
        out = {}
        for subject, n in (info.state.subjects or {}).items():
            site = subject.split(".")[2].replace("_", ".")
            out[site] = (n, 1, n)
        return out
    finally:
        await nc.close()


SYSTEMS = (("ingest_sqlite", 0), ("ingest_js_default_2", 2))


def run(*, work: Path, sites: int, seconds: float, log: Callable[[str], None],
        systems: tuple[tuple[str, int], ...] = SYSTEMS) -> list[Row]:
    names = [f"fleet-site-{i}" for i in range(sites)]
    t0 = time.monotonic()
    pkis = localrun.Pki(work / "pki-fleet", names)
    log(f"  {sites} site certificates in {time.monotonic() - t0:.0f} s")
    rows: list[Row] = []
    rates: dict[str, float] = {}
    for system, replicas in systems:
        where = work / system
        where.mkdir(parents=True, exist_ok=True)
        cluster = JetStreamCluster(where / "js", sync="default").start() if replicas else None
        procs = [localrun.ingest(where, pkis, "fleet", name=f"fleet-{i}",
                                 jetstream=cluster.servers if cluster else None,
                                 extra='[log]\nlevel = "warning"\n').start()
                 for i in range(max(replicas, 1))]
        try:
            for p in procs:  # a replica waits for the new cluster's stream and bucket
                localrun.wait_healthy(p.target, pkis.consumer(), timeout=60)
            base = sum(rss_mb(p.proc.pid) for p in procs)
            t1 = time.monotonic()
            highest, lat, failed, refused = asyncio.run(
                _load([p.target for p in procs], pkis, names, seconds))
            elapsed = time.monotonic() - t1
            grown = sum(rss_mb(p.proc.pid) for p in procs) - base
            counts = _sqlite_counts(where / "store-fleet.db") if cluster is None else \
                asyncio.run(_stream_counts(cluster.servers))
        finally:
            for p in procs:
                p.proc.stop()
            if cluster is not None:
                cluster.stop()
        wrong = [s for s in names if counts.get(s, (0, 1, 0)) != (highest[s], 1, highest[s])
                 and highest[s]]
        if wrong:
            raise RuntimeError(f"{system}: stored counts differ from what was acknowledged "
                               f"for {len(wrong)} sites, e.g. {wrong[0]}: "
                               f"{counts.get(wrong[0])} vs {highest[wrong[0]]}")
        total = sum(highest.values())
        rate = total / elapsed
        rates[system] = rate
        p99 = percentile(lat, 99) * 1000 if lat else 0.0
        per_site_kb = grown * 1024 / sites
        rows += [Row(SCENARIO, system, "readings_per_s", round(rate, 1), "readings/s"),
                 Row(SCENARIO, system, "call_p99_ms", round(p99, 1), "ms"),
                 Row(SCENARIO, system, "rss_kb_per_site", round(per_site_kb, 1), "kB"),
                 Row(SCENARIO, system, "calls_failed", failed, "calls"),
                 Row(SCENARIO, system, "calls_refused_busy", refused, "calls")]
        log(f"  {system}: {sites} sites, {rate:,.0f} readings/s, p99 {p99:.0f} ms, "
            f"+{per_site_kb:.0f} kB RSS per site, {failed} calls failed, {refused} refused busy, "
            "every reading stored once")
    if len(rates) == 2:
        rows.append(Row(SCENARIO, "bridge", "replicas_ratio_to_sqlite",
                        round(rates["ingest_js_default_2"] / rates["ingest_sqlite"], 3), "x"))
    return rows


def bare(*, work: Path, sites: int, seconds: float, log: Callable[[str], None]) -> float:
    """kB of RSS per connected, active site of a bare grpcio mTLS server (bench.bare_ingest)
    under the same load as the stores: grpcio's own share of the per-site figure."""
    names = [f"fleet-site-{i}" for i in range(sites)]
    pkis = localrun.Pki(work / "pki-fleet", names)
    srv = pkis.server()
    target = f"127.0.0.1:{localrun.free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare_ingest", target, str(srv.ca),
                             str(srv.cert), str(srv.key)], stdout=subprocess.PIPE)
    try:
        line = proc.stdout.readline().strip() if proc.stdout is not None else b""
        if line != b"ready":
            raise RuntimeError(f"bench.bare_ingest did not start (exit {proc.poll()}): "
                               f"{line[:200]!r}")
        base = rss_mb(proc.pid)
        highest, _, failed, _ = asyncio.run(_load([target], pkis, names, seconds))
        per_site_kb = (rss_mb(proc.pid) - base) * 1024 / sites
    finally:
        proc.kill()
        proc.wait()
    log(f"  grpc_bare: {sites} sites, {sum(highest.values()) / seconds:,.0f} readings/s "
        f"answered, +{per_site_kb:.0f} kB RSS per site, {failed} calls failed")
    return per_site_kb


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.fleet")
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--only", choices=[s for s, _ in SYSTEMS])
    ap.add_argument("--bare", action="store_true",
                    help="also a bare grpcio mTLS server under the same load (bench.bare_ingest)")
    args = ap.parse_args()
    systems = tuple(x for x in SYSTEMS if args.only in (None, x[0]))
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        if args.bare:
            bare(work=Path(tmp) / "bare", sites=args.sites, seconds=args.seconds, log=print)
        for r in run(work=Path(tmp), sites=args.sites, seconds=args.seconds, log=print,
                     systems=systems):
            print(f"{r.system:<22} {r.metric:<18} {r.value:g} {r.unit}")


if __name__ == "__main__":
    main()
