"""``consumer_catchup``: how fast a cloud team catches up on a stream, beside a plain reader.

The stream holds ``readings`` readings of 10 sites (written by a replica in this process, on
a 3-node cluster with nats-server's default sync). Timed, each from process start to its
last line: a plain nats-py reader as docs/consuming.md describes it (an ordered consumer from
the start, ``Envelope.FromString`` per message, stop at ``num_pending == 0``, one JSON line
per reading), the same with a callback subscription (nats-py's fastest idiom; the ratios are
to the faster of the two), ``bridge consume --from nats://...`` (read straight from the stream), and
``bridge consume --from <replica>`` (through an ingest replica's Subscribe). Every line
counted: each must print every reading once.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from bench.results import Row
from bridge.cloud.store.jetstream import JetStreamStore
from bridge.cloud.store.records import Incoming
from bridge.shared._pb import bridge_pb2 as pb
from bridge.shared.config import JetStreamSettings
from devkit import localrun
from devkit.jscluster import JetStreamCluster

SCENARIO = "consumer_catchup"
SITES = 10

PLAIN = textwrap.dedent('''
    import asyncio, sys
    import nats, orjson
    from nats.js.api import ConsumerConfig, DeliverPolicy
    from bridge.shared._pb import bridge_pb2 as pb

    async def main():
        nc = await nats.connect(servers=sys.argv[1].split(","))
        js = nc.jetstream()
        sub = await js.subscribe("bridge.r.>", ordered_consumer=True,
                                 config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        out = sys.stdout.buffer
        while True:
            msg = await sub.next_msg(timeout=10)
            env = pb.Envelope.FromString(msg.data)
            out.write(orjson.dumps({"site_id": env.site_id, "seq": env.seq,
                                    "values": [{"signal": v.signal, "value": v.number}
                                               for v in env.values]}) + b"\\n")
            if msg.metadata.num_pending == 0:
                break
        await nc.close()

    asyncio.run(main())
''')


# The fastest idiom nats-py offers: a callback subscription, no task per message.
PLAIN_CB = textwrap.dedent('''
    import asyncio, sys
    import nats, orjson
    from nats.js.api import ConsumerConfig, DeliverPolicy
    from bridge.shared._pb import bridge_pb2 as pb

    async def main():
        nc = await nats.connect(servers=sys.argv[1].split(","))
        js = nc.jetstream()
        done = asyncio.Event()
        out = sys.stdout.buffer

        async def on_msg(msg):
            env = pb.Envelope.FromString(msg.data)
            out.write(orjson.dumps({"site_id": env.site_id, "seq": env.seq,
                                    "values": [{"signal": v.signal, "value": v.number}
                                               for v in env.values]}) + b"\\n")
            if msg.metadata.num_pending == 0:
                done.set()

        await js.subscribe("bridge.r.>", ordered_consumer=True, cb=on_msg,
                           config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        await done.wait()
        await nc.close()

    asyncio.run(main())
''')


async def _fill(servers: list[str], readings: int) -> None:
    store = JetStreamStore(settings=JetStreamSettings(servers=tuple(servers)))
    await store.start()
    per = readings // SITES
    for i in range(SITES):
        site = f"bench-site-{i}"
        for lo in range(1, per + 1, 1000):
            items = []
            for s in range(lo, min(lo + 1000, per + 1)):
                env = pb.Envelope(site_id=site, epoch=1, seq=s, gateway_time_ns=s,
                                  values=[pb.Value(signal="flow", number=float(s))])
                items.append(Incoming(site, 1, s, env.SerializeToString()))
            await store.commit(items)
    await store.close()


def _timed(argv: list[str], expect: int) -> float:
    t0 = time.monotonic()
    res = subprocess.run(argv, capture_output=True, timeout=1800,
                         check=False)
    took = time.monotonic() - t0
    lines = res.stdout.count(b"\n")
    if res.returncode != 0 or lines != expect:
        raise RuntimeError(f"{argv[:4]}: exit {res.returncode}, {lines} lines of {expect}: "
                           f"{res.stderr.decode(errors='replace')[-500:]}")
    return took


def run(*, work: Path, readings: int, log: Callable[[str], None]) -> list[Row]:
    readings -= readings % SITES
    pkis = localrun.Pki(work / "pki-consume", [f"bench-site-{i}" for i in range(SITES)])
    cluster = JetStreamCluster(work / "js-consume", sync="default").start()
    rows: list[Row] = []
    try:
        asyncio.run(_fill(cluster.servers, readings))
        servers = ",".join(cluster.servers)
        replica = localrun.ingest(work, pkis, "bench", name="consume-replica",
                                  jetstream=cluster.servers,
                                  extra='[log]\nlevel = "warning"\n').start()
        try:
            localrun.wait_healthy(replica.target, pkis.consumer())
            tls = pkis.consumer()
            runs = {
                "plain_nats_py": [sys.executable, "-c", PLAIN, servers],
                "plain_nats_py_cb": [sys.executable, "-c", PLAIN_CB, servers],
                "bridge_nats": localrun.bridge_argv("consume", "--from", servers),
                "bridge_ingest": localrun.bridge_argv(
                    "consume", "--from", replica.target, "--ca", str(tls.ca),
                    "--cert", str(tls.cert), "--key", str(tls.key)),
            }
            rates = {}
            for name, argv in runs.items():
                took = _timed(argv, readings)
                rates[name] = readings / took
                log(f"  {name}: {readings:,} readings in {took:.1f} s "
                    f"({rates[name]:,.0f}/s)")
        finally:
            replica.proc.stop()
    finally:
        cluster.stop()
    metrics = {"plain_nats_py": "plain_reader_per_s", "plain_nats_py_cb": "plain_cb_reader_per_s",
               "bridge_nats": "nats_per_s", "bridge_ingest": "ingest_per_s"}
    for name, rate in rates.items():
        system = "load_generator" if name.startswith("plain") else "bridge"
        rows.append(Row(SCENARIO, system, metrics[name], round(rate, 1), "readings/s"))
    plain = max(rates["plain_nats_py"], rates["plain_nats_py_cb"])  # the faster plain reader
    rows += [Row(SCENARIO, "bridge", "nats_ratio_to_plain", round(rates["bridge_nats"] / plain,
                                                                  3), "x"),
             Row(SCENARIO, "bridge", "ingest_ratio_to_plain",
                 round(rates["bridge_ingest"] / plain, 3), "x")]
    return rows


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.consumers")
    ap.add_argument("--readings", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-consume-") as tmp:
        for r in run(work=Path(tmp), readings=args.readings, log=print):
            print(f"{r.system:<16} {r.metric:<24} {r.value:g} {r.unit}")


if __name__ == "__main__":
    main()
