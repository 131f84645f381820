"""``replica_restart``: a JetStream replica's first acknowledgement after a restart, by depth.

One site's (site, epoch) subject holds ``depth`` readings, written by a replica (in this
process, batches of 1,000) that then stops as a kill -9 would leave it: its last checkpoint is
whatever the background task wrote while it ran, never the final flush of a clean stop. A
fresh ingest replica process (after one warm-up call of another site, so the process's own
first-call costs are not counted) then gets one 100-reading batch of that site: the time to its
acknowledgement and the RSS it added are the cost of meeting a subject of that depth. The same
with the subject's checkpoint purged (``no_checkpoint``: the behaviour before checkpoints)
shows what the checkpoint saves; it is skipped at the largest depth, where it reads millions of
messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import nats

from bench.memory import rss_mb
from bench.results import Row
from bridge.cloud.store.jetstream import JetStreamStore
from bridge.cloud.store.records import Incoming
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.config import JetStreamSettings, TlsConfig
from bridge.shared.grpcconn import mtls_credentials
from devkit import localrun
from devkit.jscluster import JetStreamCluster

SCENARIO = "replica_restart"
SITE, WARM = "bench-deep", "bench-warm"
_WARMED: list[str] = []


def _label(depth: int) -> str:
    return f"{depth // 1_000_000}M" if depth % 1_000_000 == 0 else f"{depth // 1000}k"


async def _fill(servers: list[str], epoch: int, depth: int) -> None:
    store = JetStreamStore(settings=JetStreamSettings(servers=tuple(servers)))
    await store.start()
    env = pb.Envelope(site_id=SITE, epoch=epoch, values=[pb.Value(signal="v", number=1.0)])
    for lo in range(1, depth + 1, 1000):
        items = []
        for s in range(lo, min(lo + 1000, depth + 1)):
            env.seq = s
            items.append(Incoming(SITE, epoch, s, env.SerializeToString()))
        await store.commit(items)
    store.keeper.abandon()  # stopped as by kill -9: no final checkpoint
    await store.close()


async def _purge(servers: list[str], epoch: int) -> None:
    nc = await nats.connect(servers=servers)
    kv = await nc.jetstream().key_value("BRIDGE_LEDGER")
    await kv.purge(f"{SITE}.{epoch:016x}")
    await nc.close()


def _push(target: str, tls: TlsConfig, site: str, epoch: int, first: int) -> float:
    with grpc.secure_channel(target, mtls_credentials(tls.read())) as ch:
        stub = pb_grpc.IngestStub(ch)
        envs = [pb.Envelope(site_id=site, epoch=epoch, seq=s) for s in range(first, first + 100)]
        t0 = time.perf_counter()
        ack = stub.PushBatch(pb.Batch(batch_id=f"{site}-{first}", envelopes=envs), timeout=600)
        took = time.perf_counter() - t0
    if any(r.disposition != pb.DISPOSITION_COMMITTED for r in ack.results):
        raise RuntimeError(f"{site}: not every reading of the batch was committed: {ack}")
    return took


def _meet(where: Path, pkis: localrun.Pki, servers: list[str], epoch: int, depth: int,
          name: str) -> tuple[float, float]:
    """A fresh replica meets the subject: (seconds to the first ack, RSS MB it added)."""
    proc = localrun.ingest(where, pkis, "bench", name=name, jetstream=servers,
                           extra='[log]\nlevel = "warning"\n').start()
    try:
        localrun.wait_healthy(proc.target, pkis.consumer())
        _WARMED.append(name)  # a new warm-up subject each time: committed, not a duplicate
        _push(proc.target, pkis.site(WARM), WARM, len(_WARMED), 1)
        before = rss_mb(proc.proc.pid)
        took = _push(proc.target, pkis.site(SITE), SITE, epoch, depth + 1)
        return took, rss_mb(proc.proc.pid) - before
    finally:
        proc.proc.stop()


def run(*, work: Path, depths: list[int], log: Callable[[str], None]) -> list[Row]:
    pkis = localrun.Pki(work / "pki-restart", [SITE, WARM])
    cluster = JetStreamCluster(work / "js-restart", sync="default").start()
    rows: list[Row] = []
    firsts: list[float] = []
    try:
        for epoch, depth in enumerate(depths, 1):
            t0 = time.monotonic()
            asyncio.run(_fill(cluster.servers, epoch, depth))
            log(f"  {depth:,} readings stored in {time.monotonic() - t0:.0f} s")
            took, rss = _meet(work, pkis, cluster.servers, epoch, depth, f"r{epoch}a")
            firsts.append(took)
            label = _label(depth)
            rows += [Row(SCENARIO, "bridge", f"first_ack_s_{label}", round(took, 3), "s"),
                     Row(SCENARIO, "bridge", f"rss_added_mb_{label}", round(rss, 1), "MB")]
            log(f"  {label}: first ack {took:.3f} s, +{rss:.1f} MB (checkpoint)")
            if depth == max(depths):
                continue
            asyncio.run(_purge(cluster.servers, epoch))
            took, rss = _meet(work, pkis, cluster.servers, epoch, depth + 100, f"r{epoch}b")
            rows += [Row(SCENARIO, "no_checkpoint", f"first_ack_s_{label}", round(took, 3), "s"),
                     Row(SCENARIO, "no_checkpoint", f"rss_added_mb_{label}", round(rss, 1),
                         "MB")]
            log(f"  {label}: first ack {took:.3f} s, +{rss:.1f} MB (no checkpoint)")
    finally:
        cluster.stop()
    rows.append(Row(SCENARIO, "bridge", "first_ack_spread", round(max(firsts) / min(firsts), 2),
                    "x"))
    return rows


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.restart")
    ap.add_argument("--depths", type=int, nargs="*", default=[20_000, 200_000, 2_000_000])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        for r in run(work=Path(tmp), depths=args.depths, log=print):
            print(f"{r.system:<14} {r.metric:<22} {r.value:g} {r.unit}")


if __name__ == "__main__":
    main()
