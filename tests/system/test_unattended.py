"""Ninety days unattended, on a simulated clock: one agent process, a cloud outage of five days
inside it, a certificate that nears expiry and is renewed, and a spool at both its bounds:
bytes (a burst as the outage starts, more than the spool may hold) and age (what is left of the
outage's first days is past the three-day bound when the cloud returns). Readings inside the
bounds arrive once; the rest are named gaps, never silent ones.

The agent runs in this process with its real sources, spool, sender and uplink against a real
mosquitto and a real ingest process; only the clocks the bounds read are injected (the spool
clock, and the wall clock the certificate checks read). Network time stays real.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.cloud import consume
from bridge.edge.agent import Agent
from bridge.edge.spool.clock import SpoolClock
from bridge.shared import certinfo, pki
from bridge.shared.config import load_agent
from devkit import localrun, simulate

DAY = 86400.0
STEP = 6 * 3600.0          # the simulated clock advances six hours at a time...
PER_STEP = 6               # ...and the plant publishes one reading an hour
BURST = 9000               # as the outage starts: more than the 1 MiB spool holds
MAX_AGE = 3 * DAY          # the spool's bound: older readings become a named gap
OUTAGE = (50 * DAY, 55 * DAY)
ROTATE_AT = 40 * DAY
SITE = "site-m"


class SimClock:
    def __init__(self, wall0: float) -> None:
        self.wall0, self.t = wall0, 0.0
        self._lock = threading.Lock()

    def advance(self, dt: float) -> None:
        with self._lock:
            self.t += dt

    def wall(self) -> float:
        return self.wall0 + self.t

    def boottime(self) -> float:
        return 1000.0 + self.t


class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[float, str, dict]] = []  # (sim time, event, fields)
        self.clock: SimClock | None = None

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "event", None)
        if name and self.clock is not None:
            self.seen.append((self.clock.t, name, dict(getattr(record, "fields", {}))))

    def named(self, name: str) -> list[tuple[float, dict]]:
        return [(t, f) for t, n, f in self.seen if n == name]


class Plant:
    """A SCADA publisher: QoS 1, each reading's seq its own number, acked by the broker."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plant-months",
                                  protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.seq = 0
        self.rng = random.Random(7)

    def publish(self, n: int) -> None:
        infos = []
        for _ in range(n):
            self.seq += 1
            topic, payload = simulate.message(profile="grid", site=SITE, n=self.seq, t0=0.0,
                                              rng=self.rng)
            infos.append(self.client.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()  # while the loop runs: it sends DISCONNECT and closes
        self.client.loop_stop()


async def _until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_ninety_days_with_an_outage_a_renewal_and_a_bound_lose_nothing_silently(
        tmp_path: Path, broker: localrun.Mosquitto):
    own = localrun.Pki(tmp_path / "pki", [])
    first = pki.issue_site(own.dir, own.dir, site_id=SITE, days=60)  # expires inside the run
    assert first.key_path is not None
    node = localrun.ingest(tmp_path, own, "aws").start()
    localrun.wait_healthy(node.target, own.consumer())
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'site_id = "{SITE}"\n[tls]\nca = "{own.ca}"\ncert = "{first.cert_path}"\n'
        f'key = "{first.key_path}"\ncheck_s = 0.1\n'
        f'[spool]\npath = "{tmp_path / "spool.db"}"\nmax_age_s = {MAX_AGE}\n'
        "max_bytes = 1048576\nbackpressure_s = 0.0\nreserve_bytes = 0\n"
        f'[[sources]]\nname = "plant"\nurl = "mqtt://127.0.0.1:{broker.port}"\n'
        'topics = ["#"]\n'
        f'[uplink]\nfailback_after_s = 1.0\n[[uplink.endpoints]]\nname = "aws"\n'
        f'target = "{node.target}"\n')
    config = load_agent(cfg)
    _, first_not_after = certinfo.read_pem(first.cert_path.read_bytes())[0]
    sim = SimClock(wall0=first_not_after - 60 * DAY)  # day 0 is the day the cert was issued
    events = Events()
    events.clock = sim
    log = logging.getLogger("bridge")
    level = log.level
    log.setLevel(logging.INFO)  # setLevel, not an attribute: it also clears the level cache
    log.addHandler(events)
    published_at: dict[int, float] = {}  # seq -> simulated time it was published

    async def months() -> None:
        agent = Agent(config=config, wall=sim.wall, spool_clock=SpoolClock(
            boottime=sim.boottime, wall=sim.wall, boot_id=lambda: "simulated-boot"))
        epoch = agent.spool.epoch
        stop = asyncio.Event()
        run = asyncio.create_task(agent.run(stop))
        plant = await asyncio.to_thread(Plant, broker.port)
        try:
            await _until(agent.sources[0].subscribed.is_set, "the source")
            cloud_up = True
            while sim.t < 90 * DAY:
                sim.advance(STEP)
                if cloud_up and OUTAGE[0] <= sim.t < OUTAGE[1]:
                    await asyncio.to_thread(node.proc.stop)  # the cloud goes away for days
                    cloud_up = False
                if not cloud_up and sim.t >= OUTAGE[1]:
                    # The bounds task expires on its own every 2 s of real time; the clock
                    # jumps faster than that, so run it once more before the cloud returns.
                    agent.metrics.spool_dropped.labels("ttl").inc(await agent.spool.expire())
                    await asyncio.to_thread(node.start)
                    cloud_up = True
                if abs(sim.t - ROTATE_AT) < STEP / 2:
                    renewal = tmp_path / "renewal"
                    renewal.mkdir()
                    pki.issue_site(own.dir, renewal, site_id=SITE)
                    os.replace(renewal / f"site-{SITE}.key", first.key_path)
                    os.replace(renewal / f"site-{SITE}.pem", first.cert_path)
                    await _until(lambda: agent.credentials.reloads == 1, "the renewal")
                count = BURST if not cloud_up and sim.t < OUTAGE[0] + STEP else PER_STEP
                for seq in range(plant.seq + 1, plant.seq + count + 1):
                    published_at[seq] = sim.t
                await asyncio.to_thread(plant.publish, count)
                await _until(lambda: agent.status()["committed_messages"] >= plant.seq,
                             "the spool to take the readings")
                # In real time the watcher looks every check_s (thousands of times in six
                # hours); here the clock outruns it, so look once per step as well.
                await agent.credentials.check()
                if cloud_up:
                    await _until(lambda: not (agent.spool.figures().readings
                                              or agent.sender.in_flight), "delivery", 120)
            assert agent.spool.epoch == epoch, "one spool, one epoch, all along"
        finally:
            stop.set()
            await run
            await asyncio.to_thread(plant.close)

    try:
        asyncio.run(months())
        merger = consume.Merger()
        errors = asyncio.run(consume.read_all(targets=[node.target], tls=own.consumer(),
                                              merger=merger))
        assert not errors
        stream = merger.drain()
    finally:
        log.removeHandler(events)
        log.setLevel(level)
        node.proc.stop()

    readings = [c for c in stream if not c.envelope.HasField("dropped")]
    gaps = [c.envelope.dropped for c in stream if c.envelope.HasField("dropped")]
    seen = Counter(c.envelope.source_seq for c in readings)
    assert len(published_at) == (90 * 4 - 1) * PER_STEP + BURST
    assert not [s for s, n in seen.items() if n > 1], "nothing doubled"
    missing = set(published_at) - set(seen)
    # Everything missing is named: gaps of exactly that many readings, by both bounds.
    assert {g.reason for g in gaps} == {"ttl", "spool_full"}, gaps
    assert sum(g.count for g in gaps) == len(missing) > 0
    # What is missing was published during the outage, more than the age bound before its
    # end; everything inside the bounds (the rest) arrived.
    assert all(OUTAGE[0] <= published_at[s] <= OUTAGE[1] - MAX_AGE + STEP for s in missing)
    inside = [s for s, t in published_at.items() if not OUTAGE[0] <= t < OUTAGE[1] - MAX_AGE]
    assert not [s for s in inside if s not in seen]
    # The certificate: warned at 30 days left (day 30), renewed at day 40, never an error.
    expiring = events.named("tls.cert_expiring")
    assert expiring and all(f["band"] == "warning" and f["cert"] == "client"
                            for _, f in expiring), expiring
    assert 30 * DAY <= expiring[0][0] <= 30 * DAY + STEP
    assert all(t <= ROTATE_AT + STEP for t, _ in expiring), "no warning after the renewal"
    (reloaded_at, reloaded), = events.named("tls.reloaded")
    assert abs(reloaded_at - ROTATE_AT) <= STEP and reloaded["expires_in_days"] > 700
    assert events.named("uplink.failover") == [] and events.named("uplink.no_healthy_upstream")
