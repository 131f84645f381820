"""A SCADA stand-in: realistic substation and water-plant signals over MQTT or AMQP.

Three ways to publish, all numbering their messages n = 1, 2, ... so that a run can account
for every reading at the far end:

* ``json`` over MQTT: one reading per message, ``seq`` = n;
* ``sparkplug`` over MQTT: a Sparkplug B edge node (one per site) with devices; NBIRTH, a
  DBIRTH per device, then DDATA with many metrics per message, by alias. Every message has a
  ``Sim/Message`` metric = n, the message counter many field devices publish. The node sets its
  NDEATH as will and answers ``Node Control/Rebirth`` commands with new births;
* ``json`` over AMQP (``run_amqp``): persistent messages with publisher confirms.

Publishing is QoS 1 (AMQP: confirmed); a message counts as published only once the broker has
acknowledged it.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiormq
import aiormq.abc
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.shared._pb import sparkplug_b_pb2 as sp

# (signal, unit, generator(t, rng)) per profile; t in seconds.
Signal = tuple[str, str, Callable[[float, random.Random], float | bool]]

GRID: list[Signal] = [
    ("bus_voltage", "kV", lambda t, r: round(110.0 + 1.5 * math.sin(t / 60) + r.gauss(0, 0.2), 3)),
    ("frequency", "Hz", lambda t, r: round(50.0 + 0.02 * math.sin(t / 7) + r.gauss(0, 0.005), 4)),
    ("breaker_closed", "", lambda t, r: r.random() > 0.001),
    ("transformer_temp", "degC", lambda t, r: round(62.0 + 8 * math.sin(t / 600) + r.gauss(0, 0.3),
                                                     2)),
    ("active_power", "MW", lambda t, r: round(38.0 + 6 * math.sin(t / 300) + r.gauss(0, 0.5), 2)),
]
WATER: list[Signal] = [
    ("flow", "m3/h", lambda t, r: round(420.0 + 40 * math.sin(t / 900) + r.gauss(0, 3), 1)),
    ("pressure", "bar", lambda t, r: round(4.2 + 0.2 * math.sin(t / 120) + r.gauss(0, 0.02), 3)),
    ("turbidity", "NTU", lambda t, r: round(abs(0.3 + r.gauss(0, 0.05)), 3)),
    ("chlorine_residual", "mg/L", lambda t, r: round(0.8 + 0.1 * math.sin(t / 1800)
                                                     + r.gauss(0, 0.01), 3)),
    ("pump_running", "", lambda t, r: r.random() > 0.02),
]
PROFILES = {"grid": GRID, "water": WATER}


def message(*, profile: str, site: str, n: int, t0: float, rng: random.Random) -> tuple[str, bytes]:
    """The n-th message (n from 1) of a site: its topic and JSON payload."""
    signals = PROFILES[profile]
    name, unit, gen = signals[(n - 1) % len(signals)]
    now = time.time()
    doc: dict[str, object] = {"seq": n, "ts": int(now * 1000), "signal": name,
                              "value": gen(now - t0, rng), "quality": "good"}
    if unit:
        doc["unit"] = unit
    kind = "substation" if profile == "grid" else "plant"
    return f"{kind}/{site}/{name}", orjson.dumps(doc)


@dataclass
class Progress:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    readings: int = 0  # values in the messages sent (one per JSON message)
    values: dict[int, int] = field(default_factory=dict)  # sparkplug: message n -> values
    rebirths: int = 0


SPARKPLUG_GROUP = "Bridge Sim"
MESSAGE_METRIC = "Sim/Message"


class SparkplugEdge:
    """One Sparkplug B edge node: births, DDATA by alias, seq 0..255, bdSeq."""

    def __init__(self, *, site: str, profile: str, devices: int, metrics_per_message: int,
                 rng: random.Random, group: str = SPARKPLUG_GROUP) -> None:
        self.node = site
        self.group = group
        self.rng = rng
        self.signals = PROFILES[profile]
        kind = "Bay" if profile == "grid" else "Pump"
        self.devices = [f"{kind}{i + 1}" for i in range(devices)]
        # metrics_per_message values per DDATA: the message counter plus the device's signals.
        self.metric_names = [MESSAGE_METRIC] + [
            f"{self.signals[i % len(self.signals)][0]}/{i // len(self.signals) + 1}"
            for i in range(max(metrics_per_message - 1, 0))]
        self.bd_seq = 0
        self.seq = 0
        self.next_device = 0

    def topic(self, mtype: str, device: str | None = None) -> str:
        base = f"spBv1.0/{self.group}/{mtype}/{self.node}"
        return base if device is None else f"{base}/{device}"

    def _payload(self) -> sp.Payload:
        p = sp.Payload(timestamp=time.time_ns() // 1_000_000, seq=self.seq)
        self.seq = (self.seq + 1) % 256
        return p

    def _add_values(self, p: sp.Payload, n: int, t: float, *, birth: bool) -> None:
        ms = int(time.time() * 1000)
        for alias, name in enumerate(self.metric_names):
            m = p.metrics.add(alias=alias, timestamp=ms)
            if birth:
                m.name = name
            if name == MESSAGE_METRIC:
                if birth:
                    m.datatype = sp.UInt64
                m.long_value = n
                continue
            _, _, gen = self.signals[(alias - 1) % len(self.signals)]
            v = gen(t, self.rng)
            if isinstance(v, bool):
                if birth:
                    m.datatype = sp.Boolean
                m.boolean_value = v
            else:
                if birth:
                    m.datatype = sp.Double
                m.double_value = v

    def will(self) -> tuple[str, bytes]:
        p = sp.Payload(timestamp=time.time_ns() // 1_000_000)
        p.metrics.add(name="bdSeq", datatype=sp.Int64, long_value=self.bd_seq)
        return self.topic("NDEATH"), p.SerializeToString()

    def nbirth(self, n: int) -> tuple[str, bytes, int]:
        self.seq = 0
        p = self._payload()
        p.metrics.add(name="bdSeq", datatype=sp.Int64, long_value=self.bd_seq)
        p.metrics.add(name="Node Control/Rebirth", datatype=sp.Boolean, boolean_value=False)
        p.metrics.add(name=MESSAGE_METRIC, datatype=sp.UInt64, long_value=n)
        return self.topic("NBIRTH"), p.SerializeToString(), len(p.metrics)

    def dbirth(self, device: str, n: int, t: float) -> tuple[str, bytes, int]:
        p = self._payload()
        self._add_values(p, n, t, birth=True)
        return self.topic("DBIRTH", device), p.SerializeToString(), len(p.metrics)

    def ddata(self, n: int, t: float) -> tuple[str, bytes, int]:
        device = self.devices[self.next_device]
        self.next_device = (self.next_device + 1) % len(self.devices)
        p = self._payload()
        self._add_values(p, n, t, birth=False)
        return self.topic("DDATA", device), p.SerializeToString(), len(p.metrics)

    def messages(self, rebirth: threading.Event, t0: float, *,
                 births: bool = True) -> Iterator[tuple[str, bytes, int]]:
        """Births, then DDATA forever; births again whenever ``rebirth`` is set.

        ``births=False`` starts with DATA, as a node does that was born before its host came.
        """
        n = 0
        born = not births
        while True:
            if not born or rebirth.is_set():
                rebirth.clear()
                n += 1
                yield self.nbirth(n)
                for device in self.devices:
                    n += 1
                    yield self.dbirth(device, n, time.time() - t0)
                born = True
            n += 1
            yield self.ddata(n, time.time() - t0)


def json_messages(*, profile: str, site: str, rng: random.Random, t0: float,
                  first: int = 1) -> Iterator[tuple[str, bytes, int]]:
    n = first - 1
    while True:
        n += 1
        topic, payload = message(profile=profile, site=site, n=n, t0=t0, rng=rng)
        yield topic, payload, 1


def run(*, host: str, port: int, site: str, count: int, rate: float, profile: str = "grid",
        payload: str = "json", metrics_per_message: int = 10, devices: int = 4,
        group: str = SPARKPLUG_GROUP, mqtt_version: str = "5", births: bool = True,
        progress: Progress | None = None,
        stop: threading.Event | None = None, timeout_s: float = 60.0,
        first: int = 1) -> Progress:
    """Publish ``count`` messages at ``rate`` per second (0 = as fast as the broker takes);
    JSON messages carry seq ``first``, ``first + 1``, ... (a second run can follow a first)."""
    prog = progress or Progress()
    lock = threading.Condition()
    done = threading.Event()
    rebirth = threading.Event()
    window = 1000  # unacknowledged messages at most: paho's queue stays small and fast
    rng = random.Random(f"{site}")
    wall0 = time.time()
    edge = None
    if payload == "sparkplug":
        edge = SparkplugEdge(site=site, profile=profile, devices=devices,
                             metrics_per_message=metrics_per_message, rng=rng, group=group)
        source = edge.messages(rebirth, wall0, births=births)
    else:
        source = json_messages(profile=profile, site=site, rng=rng, t0=wall0, first=first)

    def on_publish(client: mqtt.Client, userdata: object, mid: int, reason: object,
                   properties: object) -> None:
        with lock:
            if getattr(reason, "is_failure", False):
                prog.failed += 1
            else:
                prog.acked += 1
            if prog.acked + prog.failed >= count:
                done.set()
            lock.notify_all()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            cmd = sp.Payload.FromString(bytes(msg.payload))
        except Exception:  # noqa: BLE001 - a stand-in edge node ignores what it cannot read
            return
        if any(m.name == "Node Control/Rebirth" and m.boolean_value for m in cmd.metrics):
            prog.rebirths += 1
            rebirth.set()

    connected = threading.Event()

    def on_connect(client: mqtt.Client, userdata: object, flags: object, rc: object,
                   properties: object) -> None:
        if getattr(rc, "is_failure", True):
            return
        if edge is not None:
            client.subscribe(edge.topic("NCMD"), qos=0)
        connected.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{site}-{time.time_ns()}",
                         protocol=mqtt.MQTTv5 if mqtt_version == "5" else mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.on_publish = on_publish
    client.on_connect = on_connect
    client.on_message = on_message
    if edge is not None:
        will_topic, will_payload = edge.will()
        client.will_set(will_topic, will_payload, qos=1)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise ConnectionError(f"simulator: no CONNACK from {host}:{port}")
        t0 = time.monotonic()
        for n in range(1, count + 1):
            if stop is not None and stop.is_set():
                count = prog.sent
                break
            if rate > 0:
                ahead = (n - 1) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            with lock:
                while prog.sent - prog.acked - prog.failed >= window:
                    if not lock.wait(timeout_s):
                        raise TimeoutError(f"simulator: no PUBACK from the broker for "
                                           f"{timeout_s:.0f} s")
            topic, data, values = next(source)
            client.publish(topic, data, qos=1)
            prog.sent += 1
            prog.readings += values
            if edge is not None:
                prog.values[n] = values
        with lock:
            if prog.acked + prog.failed >= count:
                done.set()
        if not done.wait(timeout_s):
            raise TimeoutError(f"simulator: broker acknowledged {prog.acked} of {count} "
                               f"messages within {timeout_s:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()
    return prog


async def _run_amqp(*, url: str, exchange: str, site: str, count: int, rate: float,
                    profile: str, prog: Progress, stop: threading.Event | None,
                    timeout_s: float, first: int) -> None:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        window = asyncio.Semaphore(1000)
        rng = random.Random(f"{site}")
        wall0 = time.time()
        source = json_messages(profile=profile, site=site, rng=rng, t0=wall0, first=first)
        props = aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/json")
        pending: set[asyncio.Task[None]] = set()

        async def confirm(fut: asyncio.Future[aiormq.abc.ConfirmationFrameType | None]) -> None:
            try:
                result = await asyncio.wait_for(fut, timeout_s)
                if isinstance(result, aiormq.spec.Basic.Ack):
                    prog.acked += 1
                else:
                    prog.failed += 1
            except (aiormq.AMQPError, TimeoutError):
                prog.failed += 1
            finally:
                window.release()

        t0 = time.monotonic()
        for n in range(1, count + 1):
            if stop is not None and stop.is_set():
                break
            if rate > 0:
                ahead = (n - 1) / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await asyncio.wait_for(window.acquire(), timeout_s)
            topic, data, values = next(source)
            fut = asyncio.ensure_future(channel.basic_publish(
                data, exchange=exchange, routing_key=topic.replace("/", "."), properties=props))
            task = asyncio.create_task(confirm(fut))
            pending.add(task)
            task.add_done_callback(pending.discard)
            prog.sent += 1
            prog.readings += values
        if pending:
            await asyncio.gather(*pending)
    finally:
        await connection.close()


def run_amqp(*, url: str, exchange: str, site: str, count: int, rate: float,
             profile: str = "grid", progress: Progress | None = None,
             stop: threading.Event | None = None, timeout_s: float = 60.0,
             first: int = 1) -> Progress:
    """Publish ``count`` persistent JSON messages to a topic exchange, with confirms.

    Messages are numbered from ``first`` (their ``seq``), so runs can continue a numbering.
    """
    prog = progress or Progress()
    asyncio.run(_run_amqp(url=url, exchange=exchange, site=site, count=count, rate=rate,
                          profile=profile, prog=prog, stop=stop, timeout_s=timeout_s,
                          first=first))
    return prog
