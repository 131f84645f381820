"""Failover time under steady load: the primary ingest is killed (SIGKILL, ``mode="kill"``) or
hung (SIGSTOP, ``mode="hang"``); the time runs to the first commit acknowledged by another cloud.
Then the primary comes back, traffic fails back, and it happens again."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import until
from bench.results import Row, percentile
from devkit import localrun, simulate


def run(*, kills: int, mode: str, log: Callable[[str], None]) -> list[Row]:
    scenario = "failover" if mode == "kill" else "failover_hang"
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        work = Path(tmp)
        pkis = localrun.Pki(work / "pki", ["bench-site"])
        broker = localrun.Mosquitto(work).start()
        nodes = [localrun.ingest(work, pkis, n) for n in ("aws", "azure")]
        for n in nodes:
            n.start()
            localrun.wait_healthy(n.target, pkis.consumer())
        agent = localrun.agent(work, pkis, "bench-site", mqtt_port=broker.port, endpoints=nodes,
                               uplink_extra="failback_after_s = 1.0\n").start()
        stop = threading.Event()
        pub = threading.Thread(target=simulate.run, kwargs=dict(
            host="127.0.0.1", port=broker.port, site="bench-site", count=10**7, rate=1000,
            stop=stop), daemon=True)
        samples: list[float] = []
        voided = 0
        try:
            agent.wait_subscribed()
            pub.start()
            aws = nodes[0]
            while len(samples) < kills:
                _wait(lambda: _active(agent) == "aws", 30)
                up = agent.status()["uplink"]
                if _active_in(up) != "aws":
                    continue  # it moved between the two reads: look again
                before = up["failover_first_ack_ns"] or 0
                t_kill = time.time()
                if mode == "kill":
                    aws.proc.kill()
                else:
                    aws.proc.signal(signal.SIGSTOP)
                ok = until(lambda: (agent.status()["uplink"]["failover_first_ack_ns"]
                                             or 0) > before, 30)  # noqa: B023 - called now
                up = agent.status()["uplink"]
                if ok and up["last_failover_ns"] >= t_kill * 1e9:
                    samples.append(up["failover_first_ack_ns"] / 1e9 - t_kill)
                    log(f"  {scenario} {len(samples)}/{kills}: {samples[-1] * 1000:.0f} ms")
                else:
                    # A failover that began before the kill (the primary's health probe had
                    # just missed its deadline on its own) is not this kill's: not a sample.
                    voided += 1
                    log(f"  {scenario}: a failover began before the kill; not counted")
                    if voided > kills:
                        raise RuntimeError("most failovers began before the kill")
                if mode == "kill":
                    aws.start()
                else:
                    aws.proc.signal(signal.SIGCONT)
                localrun.wait_healthy(aws.target, pkis.consumer())
        finally:
            stop.set()
            pub.join(30)
            agent.proc.stop()
            for n in nodes:
                n.proc.stop()
            broker.stop()
    return [Row(scenario, "bridge", "p50_s", round(percentile(samples, 50), 4), "s"),
            Row(scenario, "bridge", "p95_s", round(percentile(samples, 95), 4), "s"),
            Row(scenario, "bridge", "max_s", round(max(samples), 4), "s"),
            Row(scenario, "bridge", "kills", kills, "count"),
            Row(scenario, "bridge", "voided", voided, "count")]


def _active(agent: localrun.AgentProc) -> str | None:
    return _active_in(agent.status()["uplink"])


def _active_in(uplink: dict[str, Any]) -> str | None:
    return next((e["name"] for e in uplink["endpoints"] if e["active"]), None)


def _wait(cond: Callable[[], bool], timeout: float) -> None:
    if not until(cond, timeout, interval=0.01):
        raise TimeoutError("benchmark step did not complete")
