"""Big backlogs stay cheap: agent startup time and RSS with a small and a huge spool.

A spool is filled in-process with ``n`` realistic envelopes (the agent's own Spool, no broker),
then the agent starts on it with one healthy ingest. ``startup_s`` runs from process start to
the first acknowledged batch of the backlog; RSS is read from /proc once it is draining.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.results import Row
from bridge.edge.codecs.json import decode_json
from bridge.edge.envelope import SourceInfo, prepare_envelope
from bridge.edge.spool import Pending, Spool
from devkit import localrun, simulate

SITE = "bench-site"


def fill(path: Path, n: int) -> int:
    """Fill a new spool with ``n`` envelopes; returns its epoch."""
    import random

    rng = random.Random(1)
    sp = Spool(path=path, site_id=SITE, max_bytes=1 << 40)
    info = SourceInfo(name="plant", protocol="mqtt", broker="mqtt://127.0.0.1:1883")
    topic, payload = simulate.message(profile="grid", site=SITE, n=1, t0=time.time(), rng=rng)
    decoded = decode_json(topic, payload)
    now = time.time_ns()

    env = prepare_envelope(site_id=SITE, source=info, topic=topic,
                           decoded=decoded, codec="json", gateway_time_ns=now,
                           clock_synced=True)

    chunk = [Pending(envelope=env)] * 10_000
    done = 0
    while done < n:
        sp.commit(chunk[: min(10_000, n - done)])
        done += min(10_000, n - done)
    epoch = int(sp.epoch)
    sp.close()
    return epoch


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory line of /proc/<pid>/status in MB (``RssAnon``, ``RssFile`` split ``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def measure(n: int, log: Callable[[str], None]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        pkis = localrun.Pki(work / "pki", [SITE])
        t0 = time.monotonic()
        fill(work / f"spool-{SITE}.db", n)
        log(f"  filled a spool with {n:,} readings in {time.monotonic() - t0:.1f} s")
        broker = localrun.Mosquitto(work).start()
        node = localrun.ingest(work, pkis, "aws").start()
        localrun.wait_healthy(node.target, pkis.consumer())
        agent = localrun.agent(work, pkis, SITE, mqtt_port=broker.port, endpoints=[node])
        try:
            t_start = time.monotonic()
            agent.start()
            while True:
                try:
                    if agent.status()["uplink"]["acked_readings"] > 0:
                        break
                except OSError:
                    pass
                if time.monotonic() - t_start > 120:
                    raise TimeoutError("agent did not start draining")
                time.sleep(0.005)
            startup = time.monotonic() - t_start
            time.sleep(1.0)  # let it settle into steady draining before reading RSS
            rss = rss_mb(agent.proc.pid)
        finally:
            agent.proc.stop()
            node.proc.stop()
            broker.stop()
    log(f"  {n:,} spooled: ready in {startup:.2f} s, RSS {rss:.1f} MB")
    return startup, rss


def run(*, big: int, log: Callable[[str], None]) -> list[Row]:
    small = 100_000
    s_small, r_small = measure(small, log)
    s_big, r_big = measure(big, log)
    label = f"{big // 1_000_000}M" if big >= 1_000_000 else f"{big // 1000}k"
    return [
        Row("memory", "bridge", "startup_s_100k", round(s_small, 3), "s"),
        Row("memory", "bridge", f"startup_s_{label}", round(s_big, 3), "s"),
        Row("memory", "bridge", "rss_mb_100k", round(r_small, 1), "MB"),
        Row("memory", "bridge", f"rss_mb_{label}", round(r_big, 1), "MB"),
        Row("memory", "bridge", "rss_growth_mb", round(r_big - r_small, 1), "MB"),
    ]




def idle_and_load(*, work: Path, count: int, procs: int, log: Callable[[str], None]) -> list[Row]:
    """RSS of an agent at idle (2 s after it subscribed) and its peak under full load.

    The load is ``count`` JSON readings from ``bench.load.Blast`` (far more than the agent
    takes per second), so the peak is the agent at its own maximum rate, which is reported.
    """
    from bench.load import Blast
    from bench.systems import Bridge

    bridge = Bridge(workdir=work / "memory-load", site=SITE)
    bridge.start()
    assert bridge.agent is not None
    pid = bridge.agent.proc.pid
    blast = Blast(workdir=work, port=bridge.mqtt_port, site=SITE, count=count, procs=procs)
    try:
        time.sleep(2.0)  # a measurement window at idle, not a synchronisation
        idle = rss_mb(pid)
        peak = 0.0
        t0 = blast.start()
        while bridge.committed() < count:
            peak = max(peak, rss_mb(pid))
            time.sleep(0.05)
        rate = count / (time.monotonic() - t0)
    finally:
        blast.stop()
        bridge.stop()
    log(f"  idle RSS {idle:.1f} MB; peak {peak:.1f} MB while taking {rate:,.0f} msgs/s")
    return [Row("memory", "bridge", "rss_mb_idle", round(idle, 1), "MB"),
            Row("memory", "bridge", "rss_mb_load", round(peak, 1), "MB"),
            Row("memory", "bridge", "load_msgs_per_s", round(rate), "msgs/s")]
