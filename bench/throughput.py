"""Throughput: a fixed number of QoS 1 readings published at full speed, timed from the first
publish to the moment the cloud side holds all of them.

JSON (``throughput_json``): ~100-byte readings from several ``mosquitto_pub`` processes
(``bench.load.Blast``), the same load for every system and ceiling. Sparkplug
(``throughput_sparkplug``): DDATA with 50 metrics each, from ``bridge simulate`` processes
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
from bench.load import Blast
from bench.results import Row
from bench.systems import Bridge, System, peers
from bridge.dev import localrun

SITE = "bench-site"
Log = Callable[[str], None]


def system_rate(system: System, *, work: Path, count: int, procs: int, log: Log,
                timeout: float) -> float:
    system.start()
    blast = Blast(workdir=work, port=system.mqtt_port, site=SITE, count=count, procs=procs)
    try:
        t0 = blast.start()
        ok = until(lambda: system.committed() >= count, timeout)
        elapsed = time.monotonic() - t0
        got = system.committed()
    finally:
        blast.stop()
        system.stop()
    if not ok:
        log(f"  {system.name}: only {got:,} of {count:,} committed after {timeout:.0f} s")
    rate = got / elapsed
    log(f"  {system.name}: {got:,} readings in {elapsed:.2f} s = {rate:,.0f} msgs/s")
    return rate


def _alone(*, work: Path, count: int, procs: int, log: Log, label: str,
           prepare: Callable[[int], Callable[[Blast], object]], count_acks: bool = False
           ) -> float:
    """The load generator into a private mosquitto, timed until ``prepare(port)``'s returned
    wait (given the running load) comes back."""
    broker = localrun.Mosquitto(work).start()
    try:
        wait = prepare(broker.port)
        blast = Blast(workdir=work, port=broker.port, site=SITE, count=count, procs=procs,
                      count_acks=count_acks)
        try:
            t0 = blast.start()
            wait(blast)
            elapsed = time.monotonic() - t0
        finally:
            blast.stop()
    finally:
        broker.stop()
    rate = count / elapsed
    log(f"  {label}: {rate:,.0f} msgs/s")
    return rate


def broker_ceiling(*, work: Path, count: int, procs: int, log: Log) -> float:
    def prepare(port: int) -> Callable[[Blast], object]:
        # A persistent session subscribed beforehand (-E: exit once the SUBACK is in), so the
        # subscriber can start with the load and miss nothing.
        argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-c", "-i",
                "broker-ceiling", "-t", "substation/#"]
        subprocess.run([*argv, "-E"], check=True, timeout=10)
        return lambda _: subprocess.run([*argv, "-C", str(count)], check=True, timeout=600,
                                        stdout=subprocess.DEVNULL)

    return _alone(work=work, count=count, procs=procs, log=log,
                  label="broker_ceiling (mosquitto_sub)", prepare=prepare)


def paho_ceiling(*, work: Path, count: int, procs: int, log: Log) -> float:
    def prepare(port: int) -> Callable[[Blast], object]:
        drain = subprocess.Popen([sys.executable, "-m", "bench.paho_drain", str(port),
                                  str(count)], stdout=subprocess.PIPE)
        assert drain.stdout is not None
        drain.stdout.readline()  # "subscribed"
        return lambda _: drain.wait(600)

    return _alone(work=work, count=count, procs=procs, log=log, label="paho_ceiling",
                  prepare=prepare)


def load_solo(*, work: Path, count: int, procs: int, log: Log) -> float:
    def prepare(port: int) -> Callable[[Blast], object]:
        def wait(blast: Blast) -> None:
            if not until(lambda: blast.acked() >= count, 600):
                raise TimeoutError(f"the broker acknowledged {blast.acked():,} of {count:,}")
        return wait

    return _alone(work=work, count=count, procs=procs, log=log, count_acks=True,
                  label=f"load generator alone ({procs} x mosquitto_pub)", prepare=prepare)


def run_json(*, work: Path, count: int, procs: int, log: Log) -> list[Row]:
    scenario = "throughput_json"
    work.mkdir(parents=True, exist_ok=True)
    rows = [Row(scenario, "load_generator", "msgs_per_s",
                round(load_solo(work=work, count=count, procs=procs, log=log)), "msgs/s"),
            Row(scenario, "broker_ceiling", "msgs_per_s",
                round(broker_ceiling(work=work, count=count, procs=procs, log=log)), "msgs/s"),
            Row(scenario, "paho_ceiling", "msgs_per_s",
                round(paho_ceiling(work=work, count=count, procs=procs, log=log)), "msgs/s")]
    for system in [Bridge(workdir=work), *peers(work)]:
        rate = system_rate(system, work=work, count=count, procs=procs, log=log,
                           timeout=max(120.0, count / 500))
        rows.append(Row(scenario, system.name, "msgs_per_s", round(rate), "msgs/s"))
    return rows


# The same load for every system, shaped for NATS's MQTT listener: no space in the group id
# and MQTT 3.1.1 (it speaks no 5). nats-server 2.9 still refuses the '.' of ``spBv1.0``
# (see ``run_sparkplug``).
SPARKPLUG_GROUP = "BridgeSim"
_PUBLISHED = re.compile(rb"published (\d+) messages, (\d+) readings")


def _sparkplug_load(port: int, messages: int, procs: int) -> list[subprocess.Popen[bytes]]:
    per = -(-messages // procs)
    return [subprocess.Popen(
        [*localrun.bridge_argv("simulate", "--broker", f"mqtt://127.0.0.1:{port}",
                               "--payload", "sparkplug", "--metrics-per-message", "50",
                               "--devices", "4", "--rate", "0", "--count", str(per),
                               "--site", f"edge{i}", "--group", SPARKPLUG_GROUP,
                               "--mqtt-version", "3.1.1")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(procs)]


def _finish(procs: list[subprocess.Popen[bytes]]) -> tuple[int, int]:
    messages = readings = 0
    for p in procs:
        out, _ = p.communicate(timeout=600)
        m = _PUBLISHED.search(out)
        if m is None or p.returncode != 0:
            raise RuntimeError(f"bridge simulate failed: {out.decode(errors='replace')}")
        messages += int(m.group(1))
        readings += int(m.group(2))
    return messages, readings


def _holds(system: System, messages: int) -> bool:
    return system.committed() >= messages


def run_sparkplug(*, work: Path, messages: int, procs: int, log: Log) -> list[Row]:
    scenario = "throughput_sparkplug"
    work.mkdir(parents=True, exist_ok=True)
    broker = localrun.Mosquitto(work).start()
    try:
        t0 = time.monotonic()
        _, readings = _finish(_sparkplug_load(broker.port, messages, procs))
        solo = readings / (time.monotonic() - t0)
    finally:
        broker.stop()
    log(f"  load generator alone ({procs} x bridge simulate): {solo:,.0f} readings/s")
    bridge = Bridge(workdir=work / "sparkplug", codec="sparkplug")
    bridge.start()
    try:
        assert bridge.agent is not None
        agent = bridge.agent
        t0 = time.monotonic()
        sent, readings = _finish(_sparkplug_load(bridge.mqtt_port, messages, procs))

        def drained() -> bool:
            st = agent.status()
            return (st["committed_messages"] >= sent and not st["spool"]["readings"]
                    and not st["uplink"]["in_flight"])

        if not until(drained, 600):
            raise TimeoutError("the agent did not commit every Sparkplug message in 600 s")
        elapsed = time.monotonic() - t0
    finally:
        bridge.stop()
    rate = readings / elapsed
    log(f"  bridge: {readings:,} Sparkplug values in {elapsed:.2f} s = {rate:,.0f} readings/s")
    rows = [Row(scenario, "load_generator", "readings_per_s", round(solo), "readings/s"),
            Row(scenario, "bridge", "readings_per_s", round(rate), "readings/s")]
    for peer in peers(work / "sparkplug-peers"):
        # A peer forwards each message as opaque bytes: its rate is the metric values carried
        # by the messages its cloud side holds, none of them decoded.
        peer.start()
        try:
            t0 = time.monotonic()
            try:
                sent, readings = _finish(_sparkplug_load(peer.mqtt_port, messages, procs))
            except RuntimeError as exc:
                if "no CONNACK" not in str(exc):
                    raise
                # nats-server 2.9 refuses every topic with a '.', so every Sparkplug topic
                # (spBv1.0/...), the will included: it carries no Sparkplug at all.
                log(f"  {peer.name}: refused the Sparkplug edge node: 0 readings/s ({exc})")
                rows.append(Row(scenario, peer.name, "readings_per_s", 0, "readings/s"))
                continue
            if not until(partial(_holds, peer, sent), 600):
                raise TimeoutError(f"{peer.name}: the cloud side did not receive every message")
            elapsed = time.monotonic() - t0
        finally:
            peer.stop()
        rate = readings / elapsed
        log(f"  {peer.name}: {sent:,} messages ({readings:,} values) in {elapsed:.2f} s = "
            f"{rate:,.0f} readings/s forwarded")
        rows.append(Row(scenario, peer.name, "readings_per_s", round(rate), "readings/s"))
    return rows
