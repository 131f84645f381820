"""A SCADA stand-in: realistic substation and water-plant signals published as JSON over MQTT.

Every message carries ``seq`` (the publisher's sequence number, from 1), so a run can account
for each reading at the far end. Publishing is QoS 1; a message counts as published only once
the broker has acknowledged it (PUBACK).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

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


def run(*, host: str, port: int, site: str, count: int, rate: float, profile: str = "grid",
        progress: Progress | None = None, stop: threading.Event | None = None,
        timeout_s: float = 60.0) -> Progress:
    """Publish ``count`` messages at ``rate`` per second (0 = as fast as the broker takes)."""
    prog = progress or Progress()
    lock = threading.Condition()
    done = threading.Event()
    window = 1000  # unacknowledged messages at most: paho's queue stays small and fast

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

    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{site}-{time.time_ns()}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.on_publish = on_publish
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise ConnectionError(f"simulator: no CONNACK from {host}:{port}")
        rng = random.Random(f"{site}")
        t0 = time.monotonic()
        wall0 = time.time()
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
            topic, payload = message(profile=profile, site=site, n=n, t0=wall0, rng=rng)
            client.publish(topic, payload, qos=1)
            prog.sent += 1
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
