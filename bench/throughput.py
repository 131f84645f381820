"""Throughput: a fixed number of QoS 1 readings published at full speed, timed from the first
publish to the moment the cloud side holds all of them.

JSON (``throughput_json``): ~100-byte readings from several ``mosquitto_pub`` processes
(``bench.load.Blast``), the same load for every system and ceiling. Sparkplug
(``throughput_sparkplug``): DDATA with 50 metrics each, from ``python -m devkit simulate`` processes
(one edge node each); every metric value is a reading.

Ceilings, on the same load: ``broker_ceiling`` is mosquitto delivering to ``mosquitto_sub``
(C, QoS 1); ``paho_ceiling`` is ``bench.paho_drain`` (paho, manual acks, no other work);
``load_generator`` is the publishers alone into a broker with no subscriber.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench import until
from bench.evidence import CpuMeter, per_million
from bench.load import Blast
from bench.peers import peers, systems
from bench.results import Row
from bench.systems import Bridge, System, checked
from devkit import localrun

SITE = "bench-site"
Log = Callable[[str], None]


def cpu_rows(scenario: str, system: str, used: dict[str, float], edge: tuple[str, ...],
             readings: int, *, client: str | None = None) -> list[Row]:
    """CPU seconds per million readings: all the system's processes, the gateway's, and
    (``client``) the one process that takes the messages off the site broker."""
    rows = [Row(scenario, system, "cpu_s_per_M", per_million(sum(used.values()), readings),
                "CPU s/M readings"),
            Row(scenario, system, "edge_cpu_s_per_M",
                per_million(sum(used[r] for r in edge), readings), "CPU s/M readings")]
    if client is not None:
        rows.append(Row(scenario, system, "client_cpu_s_per_M",
                        per_million(used[client], readings), "CPU s/M readings"))
    return rows


def system_rate(system: System, *, scenario: str, work: Path, count: int, procs: int,
                log: Log, timeout: float) -> list[Row]:
    system.start()
    blast = Blast(workdir=work, port=system.mqtt_port, site=SITE, count=count, procs=procs)
    try:
        meter = CpuMeter(pids=system.pids())
        t0 = blast.start()
        ok = until(lambda: system.committed() >= count, timeout)
        elapsed = time.monotonic() - t0
        used = meter.stop()
        got = system.committed()
        rows = checked(scenario, system, log)
    finally:
        blast.stop()
        system.stop()
    if not ok:
        log(f"  {system.name}: only {got:,} of {count:,} committed after {timeout:.0f} s")
    rate = got / elapsed
    log(f"  {system.name}: {got:,} readings in {elapsed:.2f} s = {rate:,.0f} msgs/s, CPU "
        + ", ".join(f"{role} {sec:.2f} s" for role, sec in used.items()))
    return [Row(scenario, system.name, "msgs_per_s", round(rate), "msgs/s"), *rows,
            *cpu_rows(scenario, system.name, used, system.edge_roles, got,
                      client="agent" if system.name == "bridge" else None)]


def _alone(*, work: Path, count: int, procs: int, log: Log, label: str,
           prepare: Callable[[int], Callable[[Blast], object]], count_acks: bool = False
           ) -> tuple[float, float]:
    """The load generator into a private mosquitto, timed until ``prepare(port)``'s returned
    wait (given the running load) comes back: (msgs/s, the broker's CPU seconds)."""
    broker = localrun.Mosquitto(work).start()
    assert broker.proc is not None
    try:
        wait = prepare(broker.port)
        blast = Blast(workdir=work, port=broker.port, site=SITE, count=count, procs=procs,
                      count_acks=count_acks)
        try:
            meter = CpuMeter(pids={"broker": broker.proc.pid})
            t0 = blast.start()
            wait(blast)
            elapsed = time.monotonic() - t0
            used = meter.stop()["broker"]
        finally:
            blast.stop()
    finally:
        broker.stop()
    rate = count / elapsed
    log(f"  {label}: {rate:,.0f} msgs/s, broker CPU {used:.2f} s")
    return rate, used


def broker_ceiling(*, work: Path, count: int, procs: int, log: Log) -> float:
    def prepare(port: int) -> Callable[[Blast], object]:
        # A persistent session subscribed beforehand (-E: exit once the SUBACK is in), so the
        # subscriber can start with the load and miss nothing.
        argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-c", "-i",
                "broker-ceiling", "-t", "substation/#"]
        subprocess.run([*argv, "-E"], check=True, timeout=10)
        return lambda _: subprocess.run([*argv, "-C", str(count)], check=True, timeout=600,
                                        stdout=subprocess.DEVNULL)

    rate, _ = _alone(work=work, count=count, procs=procs, log=log,
                     label="broker_ceiling (mosquitto_sub)", prepare=prepare)
    return rate


def paho_ceiling(*, work: Path, count: int, procs: int, log: Log) -> list[Row]:
    """The paho drain's rate and CPU: its own (it reports its CPU seconds from the SUBACK to
    the last message) and the broker's, per million readings."""
    client_cpu: list[float] = []

    def prepare(port: int) -> Callable[[Blast], object]:
        drain = subprocess.Popen([sys.executable, "-m", "bench.paho_drain", str(port),
                                  str(count)], stdout=subprocess.PIPE)
        assert drain.stdout is not None
        out = drain.stdout
        out.readline()  # "subscribed"

        def wait(_: Blast) -> None:
            client_cpu.append(float(out.readline().split()[1]))  # "cpu SECONDS"
            drain.wait(600)
        return wait

    rate, broker = _alone(work=work, count=count, procs=procs, log=log, label="paho_ceiling",
                          prepare=prepare)
    used = {"broker": broker, "client": client_cpu[0]}
    log(f"  paho_ceiling client CPU {used['client']:.2f} s")
    return [Row("throughput_json", "paho_ceiling", "msgs_per_s", round(rate), "msgs/s"),
            *cpu_rows("throughput_json", "paho_ceiling", used, ("broker", "client"), count,
                      client="client")]


def load_solo(*, work: Path, count: int, procs: int, log: Log) -> float:
    def prepare(port: int) -> Callable[[Blast], object]:
        def wait(blast: Blast) -> None:
            if not until(lambda: blast.acked() >= count, 600):
                raise TimeoutError(f"the broker acknowledged {blast.acked():,} of {count:,}")
        return wait

    rate, _ = _alone(work=work, count=count, procs=procs, log=log, count_acks=True,
                     label=f"load generator alone ({procs} x mosquitto_pub)", prepare=prepare)
    return rate


def run_json(*, work: Path, count: int, procs: int, log: Log) -> list[Row]:
    scenario = "throughput_json"
    work.mkdir(parents=True, exist_ok=True)
    rows = [Row(scenario, "load_generator", "msgs_per_s",
                round(load_solo(work=work, count=count, procs=procs, log=log)), "msgs/s"),
            Row(scenario, "broker_ceiling", "msgs_per_s",
                round(broker_ceiling(work=work, count=count, procs=procs, log=log)), "msgs/s"),
            *paho_ceiling(work=work, count=count, procs=procs, log=log)]
    for system in systems(work):
        rows += system_rate(system, scenario=scenario, work=work, count=count, procs=procs,
                            log=log, timeout=max(120.0, count / 500))
    return rows


# The same load for every system, shaped for NATS's MQTT listener: no space in the group id
# and MQTT 3.1.1 (it speaks no 5). nats-server 2.9 still refuses the '.' of ``spBv1.0``
# (see ``run_sparkplug``).
SPARKPLUG_GROUP = "BridgeSim"
_PUBLISHED = re.compile(rb"published (\d+) messages, (\d+) readings")


def sparkplug_load(port: int, messages: int, procs: int, *, output: int = subprocess.PIPE
                   ) -> list[subprocess.Popen[bytes]]:
    """``procs`` simulators publishing ``messages`` in all (``_finish`` reads their output)."""
    per = -(-messages // procs)
    return [subprocess.Popen(
        [*localrun.devkit_argv("simulate", "--broker", f"mqtt://127.0.0.1:{port}",
                               "--payload", "sparkplug", "--metrics-per-message", "50",
                               "--devices", "4", "--rate", "0", "--count", str(per),
                               "--site", f"edge{i}", "--group", SPARKPLUG_GROUP,
                               "--mqtt-version", "3.1.1")],
        stdout=output, stderr=subprocess.STDOUT, cwd=localrun.ROOT) for i in range(procs)]


def _finish(procs: list[subprocess.Popen[bytes]]) -> tuple[int, int]:
    messages = readings = 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        m = _PUBLISHED.search(out)
        if m is None or p.returncode != 0:
            raise RuntimeError(f"devkit simulate failed: {out.decode(errors='replace')}")
        messages += int(m.group(1))
        readings += int(m.group(2))
    return messages, readings


def _holds(system: System, messages: int) -> bool:
    return system.committed() >= messages


def _sparkplug_rate(system: System, *, scenario: str, messages: int, procs: int,
                    log: Log) -> list[Row]:
    """Readings per second into ``system``: for the bridge decoded, typed and committed; for a
    peer the metric values carried by the messages its cloud side holds, none decoded."""
    system.start()
    try:
        meter = CpuMeter(pids=system.pids())
        t0 = time.monotonic()
        sent, readings = _finish(sparkplug_load(system.mqtt_port, messages, procs))
        if isinstance(system, Bridge):
            assert system.agent is not None
            agent = system.agent

            def drained() -> bool:
                st = agent.status()
                return (st["committed_messages"] >= sent and not st["spool"]["readings"]
                        and not st["uplink"]["in_flight"])
            done = until(drained, 600)
            if not done:
                raise TimeoutError("bridge: not every Sparkplug message committed in 600 s")
        else:
            # As for JSON: a peer that has not committed everything by the deadline is rated
            # on what it holds then (its share of the values, births and data alike).
            timeout = max(120.0, messages / 50)
            if not until(partial(_holds, system, sent), timeout):
                held = min(system.committed(), sent)
                log(f"  {system.name}: only {held:,} of {sent:,} messages committed after "
                    f"{timeout:.0f} s")
                readings = readings * held // sent
        elapsed = time.monotonic() - t0
        used = meter.stop()
        rows = checked(scenario, system, log)
    finally:
        system.stop()
    rate = readings / elapsed
    log(f"  {system.name}: {sent:,} messages ({readings:,} values) in {elapsed:.2f} s = "
        f"{rate:,.0f} readings/s")
    return [Row(scenario, system.name, "readings_per_s", round(rate), "readings/s"), *rows,
            *cpu_rows(scenario, system.name, used, system.edge_roles, readings)]


def run_sparkplug(*, work: Path, messages: int, procs: int, log: Log) -> list[Row]:
    scenario = "throughput_sparkplug"
    work.mkdir(parents=True, exist_ok=True)
    broker = localrun.Mosquitto(work).start()
    try:
        t0 = time.monotonic()
        _, readings = _finish(sparkplug_load(broker.port, messages, procs))
        solo = readings / (time.monotonic() - t0)
    finally:
        broker.stop()
    log(f"  load generator alone ({procs} x devkit simulate): {solo:,.0f} readings/s")
    rows = [Row(scenario, "load_generator", "readings_per_s", round(solo), "readings/s")]
    tested: list[System] = [Bridge(workdir=work / "sparkplug", codec="sparkplug"),
                            *peers(work / "sparkplug-peers")]
    for system in tested:
        rows += _sparkplug_rate(system, scenario=scenario, messages=messages, procs=procs,
                                log=log)
    return rows


def main() -> None:
    """``python -m bench.throughput --sparkplug N``: the Sparkplug scenario for the bridge
    alone (no peers), ``N`` messages: the figure a change to the agent's Sparkplug path is
    measured by, back to back with the commit before it."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.throughput")
    ap.add_argument("--sparkplug", type=int, default=20_000, help="DDATA messages to publish")
    ap.add_argument("--procs", type=int, default=2, help="devkit simulate processes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sparkplug-") as tmp:
        _sparkplug_rate(Bridge(workdir=Path(tmp), codec="sparkplug"),
                        scenario="throughput_sparkplug", messages=args.sparkplug,
                        procs=args.procs, log=print)


if __name__ == "__main__":
    main()
