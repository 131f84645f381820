"""``ingest_stores``: committed readings/s and commit latency of the ingest's two stores.

Many sites push at once (each its own mTLS channel and certificate, one batch in flight per
site, as an agent's live lane does) to: the SQLite store (one node, the default), and a
JetStream R3 stream on a local 3-node cluster with ``sync_interval: always`` (fsync every
write) and with nats-server's default, each behind 1 and behind 3 stateless ingest replicas.
Everything (three servers, the replicas, the load) shares this machine's cores, so the
replica scaling is reported, not asserted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from bench import client
from bench.results import Row, percentile
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.grpcconn import mtls_channel
from devkit import localrun
from devkit.jscluster import JetStreamCluster

SCENARIO = "ingest_stores"
# system -> (sync_interval or None for SQLite, replicas)
CONFIGS: dict[str, tuple[str | None, int]] = {
    "ingest_sqlite": (None, 1),
    "ingest_js_always_1": ("always", 1),
    "ingest_js_always_3": ("always", 3),
    "ingest_js_default_1": ("default", 1),
    "ingest_js_default_3": ("default", 3),
}


async def _load(targets: list[str], pkis: localrun.Pki, sites: list[str], seconds: float,
                batch: int) -> tuple[int, list[float]]:
    """Every site pushes batches back to back for ``seconds``; (readings, call seconds)."""
    latencies: list[float] = []
    committed = 0
    deadline = time.monotonic() + seconds

    async def site_loop(i: int, site: str) -> None:
        nonlocal committed
        ch = mtls_channel(targets[i % len(targets)], pkis.site(site).read())
        stub = pb_grpc.IngestStub(ch)
        seq = 0
        try:
            while time.monotonic() < deadline:
                envs = [pb.Envelope(site_id=site, epoch=1, seq=seq + k + 1,
                                    values=[pb.Value(signal="v", number=float(k))])
                        for k in range(batch)]
                t0 = time.perf_counter()  # until acknowledged, refusals waited out included
                ack, _ = await client.push(stub.PushBatch, pb.Batch(batch_id=f"{site}-{seq}",
                                                                    envelopes=envs), timeout=30)
                latencies.append(time.perf_counter() - t0)
                seq += batch
                committed += sum(r.disposition == pb.DISPOSITION_COMMITTED
                                 for r in ack.results)
        finally:
            await ch.close(grace=None)

    await asyncio.gather(*(site_loop(i, s) for i, s in enumerate(sites)))
    return committed, latencies


def run(*, work: Path, sites: int, seconds: float, batch: int, configs: list[str],
        log: Callable[[str], None]) -> list[Row]:
    names = [f"bench-site-{i}" for i in range(sites)]
    pkis = localrun.Pki(work / "pki-stores", names)
    rows: list[Row] = []
    rates: dict[str, float] = {}
    for system in configs:
        sync, n = CONFIGS[system]
        where = work / system
        where.mkdir(parents=True, exist_ok=True)
        cluster = JetStreamCluster(where / "js", sync=sync).start() if sync else None
        procs = [localrun.ingest(where, pkis, "bench", name=f"bench-{i}",
                                 jetstream=cluster.servers if cluster else None,
                                 extra='[log]\nlevel = "warning"\n').start()
                 for i in range(n)]
        try:
            for p in procs:
                localrun.wait_healthy(p.target, pkis.consumer())
            t0 = time.monotonic()
            committed, lat = asyncio.run(_load([p.target for p in procs], pkis, names,
                                               seconds, batch))
            elapsed = time.monotonic() - t0
        finally:
            for p in procs:
                p.proc.stop()
            if cluster is not None:
                cluster.stop()
        rate = committed / elapsed
        rates[system] = rate
        rows += [Row(SCENARIO, system, "readings_per_s", round(rate, 1), "readings/s"),
                 Row(SCENARIO, system, "commit_p50_ms", round(percentile(lat, 50) * 1000, 2),
                     "ms"),
                 Row(SCENARIO, system, "commit_p99_ms", round(percentile(lat, 99) * 1000, 2),
                     "ms")]
        log(f"  {system}: {rate:,.0f} readings/s over {sites} sites, p50 "
            f"{percentile(lat, 50) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms")
    base = rates.get("ingest_sqlite")
    if base:
        rows += [Row(SCENARIO, system, "ratio_to_sqlite", round(rate / base, 3), "x")
                 for system, rate in rates.items()]
    return rows


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.stores")
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp:
        rows = run(work=Path(tmp), sites=args.sites, seconds=args.seconds, batch=args.batch,
                   configs=args.configs, log=print)
    for r in rows:
        if r.metric == "ratio_to_sqlite":
            print(f"{r.system:<22} {r.value:.2f}x the SQLite store")


if __name__ == "__main__":
    main()
