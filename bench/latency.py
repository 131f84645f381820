"""Latency at a fixed offered load, and exact accounting under faults, for every system.

``latency``: ``bench.load.Paced`` publishes at 1k and 5k msgs/s; each payload carries its
publish time, and the cloud side's records carry the commit time, so each reading's latency is
measured, not sampled. ``offered_msgs_per_s`` reports the rate the publisher really achieved.

``faults``: the same paced load; one third of the way in, the cloud side is killed with
SIGKILL and restarted 2 s later (``cloud_killed``), or the edge process is (``edge_killed``,
restarted after 1 s). Once the publisher is done and the cloud side has stopped growing for
15 s (longer than any peer's reconnect backoff here), every broker-acknowledged seq is
looked up: ``lost`` = acknowledged but never committed,
``duplicates`` = committed copies beyond the first.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.load import Paced
from bench.results import Row, percentile
from bench.systems import System, checked

SITE = "bench-site"
Log = Callable[[str], None]


def _settle(system: System, expected: int, quiet_s: float, timeout: float) -> None:
    """Until the cloud side holds ``expected`` readings or has not grown for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            n = system.committed()
        except Exception:  # noqa: BLE001 - the cloud side may still be coming back
            n = last
        if n >= expected:
            return
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return
        time.sleep(0.05)


def _await_progress(pub: Paced, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(pub.acked) < n and time.monotonic() < deadline and not pub.done():
        time.sleep(0.01)


def latency(system: System, *, rates: tuple[int, ...], seconds: float, log: Log) -> list[Row]:
    rows: list[Row] = []
    system.start()
    try:
        first = 1
        for rate in rates:
            count = int(rate * seconds)
            pub = Paced(port=system.mqtt_port, site=SITE, count=count, rate=rate, first=first)
            t0 = time.monotonic()
            pub.start().join(seconds * 3 + 60)
            offered = pub.sent / (time.monotonic() - t0)
            _settle(system, first - 1 + len(pub.acked), quiet_s=5, timeout=120)
            lat = [(r.committed_ns - r.published_ns) / 1e6 for r in system.records()
                   if first <= r.seq < first + count]
            first += count
            if not lat:
                raise RuntimeError(f"{system.name}: nothing committed at {rate} msgs/s")
            label = f"{rate // 1000}k"
            rows += [Row("latency", system.name, f"p50_ms_{label}", round(percentile(lat, 50), 2),
                         "ms"),
                     Row("latency", system.name, f"p99_ms_{label}", round(percentile(lat, 99), 2),
                         "ms"),
                     Row("latency", system.name, f"p999_ms_{label}",
                         round(percentile(lat, 99.9), 2), "ms"),
                     Row("latency", system.name, f"offered_msgs_per_s_{label}", round(offered),
                         "msgs/s")]
            log(f"  {system.name} at {rate}/s (offered {offered:,.0f}/s): "
                f"p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
                f"p99.9 {percentile(lat, 99.9):.1f} ms over {len(lat):,} readings")
        rows += checked("latency", system, log)
    finally:
        system.stop()
    return rows


def fault(system: System, *, kind: str, count: int, rate: int, log: Log) -> list[Row]:
    system.start()
    try:
        pub = Paced(port=system.mqtt_port, site=SITE, count=count, rate=rate).start()
        _await_progress(pub, count // 3)
        if kind == "cloud_killed":
            system.kill_cloud()
            time.sleep(2)  # an outage of a fixed length, not a synchronisation stand-in
            system.start_cloud()
        else:
            system.kill_edge()
            time.sleep(1)
            system.start_edge()
        pub.join(count / rate * 3 + 120)
        acked = set(pub.acked)
        _settle(system, len(acked), quiet_s=15, timeout=180)
        seen = Counter(r.seq for r in system.records())
        evidence = checked(f"faults_{kind}", system, log)
    finally:
        system.stop()
    lost = len(acked - set(seen))
    dups = sum(n - 1 for n in seen.values())
    log(f"  {system.name} {kind}: {len(acked):,} acknowledged by the broker, "
        f"{len(acked) - lost:,} committed, lost {lost}, duplicates {dups}")
    return [*evidence, Row(f"faults_{kind}", system.name, "lost", lost, "readings"),
            Row(f"faults_{kind}", system.name, "duplicates", dups, "readings"),
            Row(f"faults_{kind}", system.name, "acknowledged", len(acked), "readings")]


def run(*, systems: Callable[[Path], list[System]], work: Path, seconds: float,
        fault_count: int, log: Log) -> list[Row]:
    rows: list[Row] = []
    for system in systems(work / "latency"):
        log(f"latency: {system.name}")
        rows += latency(system, rates=(1000, 5000), seconds=seconds, log=log)
    for kind in ("cloud_killed", "edge_killed"):
        for system in systems(work / kind):
            log(f"faults ({kind}): {system.name}")
            rows += fault(system, kind=kind, count=fault_count, rate=2000, log=log)
    return rows
