"""Draining a backlog after an outage while live readings keep arriving.

The spool is filled with ``backlog`` readings (as an outage would leave it), the agent starts on
it with a healthy ingest, and ``bench.load.Paced`` publishes live readings at ``live_rate``
from the start. ``readings_per_s`` is the backlog's drain rate, from the first acknowledged
batch until less than a second of live traffic is left in the spool; ``live_p99_ms`` is the
publish-to-commit latency of the live readings published during the drain (the uplink's live
lane goes ahead of the backlog; see docs/architecture.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from bench import memory
from bench.load import Paced
from bench.results import Row, percentile
from bench.systems import Bridge

SITE = "bench-site"
LIVE_FIRST = 10**9  # live seqs, apart from the backlog's


def run(*, work: Path, backlog: int, live_rate: int, log: Callable[[str], None]) -> list[Row]:
    bridge = Bridge(workdir=work / "drain", site=SITE)
    t_fill = time.monotonic()
    epoch = memory.fill(bridge.work / f"spool-{SITE}.db", backlog)
    log(f"  filled a spool with {backlog:,} readings in {time.monotonic() - t_fill:.1f} s")
    bridge.start()
    assert bridge.agent is not None
    agent = bridge.agent
    pub = Paced(port=bridge.mqtt_port, site=SITE, count=10**8, rate=live_rate,
                first=LIVE_FIRST).start()
    try:
        while (acked_first := agent.status()["uplink"]["acked_readings"]) == 0:
            time.sleep(0.005)
        t_first = time.monotonic()
        while True:
            st = agent.status()
            if st["spool"]["readings"] < live_rate:
                break
            time.sleep(0.02)
        t_end = time.monotonic()
        acked_end = st["uplink"]["acked_readings"]
        live_during = pub.sent
        pub.stop()
        while agent.status()["spool"]["readings"] or agent.status()["uplink"]["in_flight"]:
            time.sleep(0.05)
        after = {(SITE, epoch): backlog}  # skip the backlog: only the live readings are timed
        live = [(r.committed_ns - r.published_ns) / 1e6 for r in bridge.records(after)
                if LIVE_FIRST <= r.seq < LIVE_FIRST + live_during]
    finally:
        pub.stop()
        bridge.stop()
    rate = (acked_end - acked_first) / (t_end - t_first)
    p99 = percentile(live, 99)
    log(f"  drained {backlog:,} at {rate:,.0f} readings/s; live ({live_rate}/s, "
        f"{len(live):,} readings) p99 {p99:.1f} ms")
    return [Row("drain", "bridge", "readings_per_s", round(rate), "readings/s"),
            Row("drain", "bridge", "live_p99_ms", round(p99, 2), "ms"),
            Row("drain", "bridge", "backlog", backlog, "readings")]
