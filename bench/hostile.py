"""``hostile_site``: one site sends its largest allowed batches as fast and as wide as it can;
the others must not notice.

One SQLite ingest node with its default limits (10,000 envelopes a call, 8 calls in flight a
site). The hostile site keeps ``hostile_calls`` calls of 10,000 envelopes open at once (those
past the in-flight cap are refused at once and sent again at once, as a hostile client
would; from its own process); ``sites`` other sites each push
100-reading batches back to back, one in flight, as agents do. Reported: the other sites'
p50/p99 per call with and without the hostile site, the node's peak RSS, and how many of
the hostile site's calls were refused.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench import client
from bench.memory import rss_mb
from bench.results import Row, percentile
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared._pb import bridge_pb2_grpc as pb_grpc
from bridge.shared.grpcconn import mtls_channel
from devkit import localrun

SCENARIO = "hostile_site"
BIG = 10_000


async def _run(target: str, pkis: localrun.Pki, sites: list[str], hostile: str | None,
               hostile_calls: int, seconds: float, pid: int
               ) -> tuple[list[float], int, float]:
    """(other sites' call seconds, hostile calls refused, peak RSS MB)."""
    lat: list[float] = []
    refused = 0
    peak = 0.0
    stop = time.monotonic() + seconds

    def chan(site: str) -> grpc.aio.Channel:
        return mtls_channel(target, pkis.site(site).read())

    async def normal(site: str) -> None:
        async with chan(site) as ch:
            stub = pb_grpc.IngestStub(ch)
            seq = 0
            while time.monotonic() < stop:
                envs = [pb.Envelope(site_id=site, epoch=1, seq=seq + k + 1,
                                    values=[pb.Value(signal="v", number=1.0)])
                        for k in range(100)]
                t0 = time.perf_counter()  # until acknowledged, refusals waited out included
                await client.push(stub.PushBatch, pb.Batch(batch_id=str(seq), envelopes=envs),
                                  timeout=60)
                lat.append(time.perf_counter() - t0)
                seq += 100

    async def watch() -> None:
        nonlocal peak
        while time.monotonic() < stop:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    tasks = [normal(s) for s in sites] + [watch()]
    proc = None
    if hostile is not None:  # its own process: building its batches costs it, not the others
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.hostile", "--attack", target, str(pkis.dir), hostile,
            str(hostile_calls), str(seconds), stdout=asyncio.subprocess.PIPE)
    await asyncio.gather(*tasks)
    if proc is not None:
        out, _ = await proc.communicate()
        refused = int(out.decode().strip().splitlines()[-1])
    return lat, refused, peak


async def _attack(target: str, pki_dir: Path, site: str, calls: int, seconds: float) -> int:
    """``calls`` lanes of 10,000-envelope batches for ``seconds``; the calls refused."""
    refused = 0
    stop = time.monotonic() + seconds
    pkis = localrun.Pki(pki_dir, [site])
    ca, cert, key = pkis.site(site).read()

    async def lane(ch: grpc.aio.Channel, i: int) -> None:
        nonlocal refused
        stub = pb_grpc.IngestStub(ch)
        seq = i * 10**9
        blob = None
        while time.monotonic() < stop:
            if blob is None:
                blob = pb.Batch(batch_id=str(seq), envelopes=[
                    pb.Envelope(site_id=site, epoch=1, seq=seq + k + 1,
                                values=[pb.Value(signal="v", number=1.0)])
                    for k in range(BIG)])
            try:
                await stub.PushBatch(blob, timeout=60)
                seq += BIG
                blob = None
            except grpc.aio.AioRpcError as err:
                # RESOURCE_EXHAUSTED: over the site's calls in flight; UNAVAILABLE (stream
                # refused): over the connection's concurrent streams before the client knew.
                if err.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      grpc.StatusCode.UNAVAILABLE):
                    raise
                refused += 1

    async with mtls_channel(target, (ca, cert, key)) as ch:
        await asyncio.gather(*(lane(ch, i) for i in range(calls)))
    return refused


def run(*, work: Path, sites: int, hostile_calls: int, seconds: float,
        log: Callable[[str], None]) -> list[Row]:
    names = [f"calm-site-{i}" for i in range(sites)]
    pkis = localrun.Pki(work / "pki-hostile", [*names, "hostile-site"])
    rows: list[Row] = []
    for label, hostile in (("alone", None), ("beside_hostile", "hostile-site")):
        where = work / label
        where.mkdir(parents=True, exist_ok=True)
        proc = localrun.ingest(where, pkis, "h", extra='[log]\nlevel = "warning"\n').start()
        try:
            localrun.wait_healthy(proc.target, pkis.consumer())
            lat, refused, peak = asyncio.run(_run(proc.target, pkis, names, hostile,
                                                  hostile_calls, seconds, proc.proc.pid))
        finally:
            proc.proc.stop()
        p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
        rows += [Row(SCENARIO, "bridge", f"others_p50_ms_{label}", round(p50, 1), "ms"),
                 Row(SCENARIO, "bridge", f"others_p99_ms_{label}", round(p99, 1), "ms"),
                 Row(SCENARIO, "bridge", f"peak_rss_mb_{label}", round(peak, 1), "MB")]
        if hostile is not None:
            rows.append(Row(SCENARIO, "bridge", "hostile_calls_refused", refused, "calls"))
        log(f"  {label}: other sites p50 {p50:.0f} ms, p99 {p99:.0f} ms; node peak RSS "
            f"{peak:.0f} MB" + (f"; {refused} hostile calls refused" if hostile else ""))
    return rows


def main() -> None:
    import argparse
    import tempfile

    if sys.argv[1:2] == ["--attack"]:
        target, pki_dir, site, calls, seconds = sys.argv[2:7]
        print(asyncio.run(_attack(target, Path(pki_dir), site, int(calls), float(seconds))))
        return
    ap = argparse.ArgumentParser(prog="python -m bench.hostile")
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--hostile-calls", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        for r in run(work=Path(tmp), sites=args.sites, hostile_calls=args.hostile_calls,
                     seconds=args.seconds, log=print):
            print(f"{r.metric:<28} {r.value:g} {r.unit}")


if __name__ == "__main__":
    main()
