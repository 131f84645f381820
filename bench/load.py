"""Load generators: C publishers at full speed, and a paced Python publisher that keeps records.

``Blast`` runs several ``mosquitto_pub -l`` processes (QoS 1) over prepared lines. Their stdin
stays open after the last line: mosquitto_pub 2.0 disconnects at end of input without waiting
for its in-flight messages (measured: 3,414 of 200,000 arrived), so EOF is never sent until
the run is over. With ``count_acks`` progress is read from its ``-d`` log (one ``PUBACK`` line
per acknowledged message) under ``stdbuf -oL`` (stdio would hold the last block back): that
costs two writes per message, so a rate measured this way is a lower bound for the generator.

``Paced`` publishes at a fixed rate from one paho client, stamps each payload with its publish
time in microseconds (``ts``, which the agent's JSON codec reads as the source time), keeps the
set of sequence numbers the broker acknowledged, and survives a broker restart (paho resends
what was in flight): faults are counted against exactly what was acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

SIGNALS = (("feeder_voltage", "kV", 11.02), ("line_current", "A", 412.5),
           ("active_power", "MW", 7.81), ("frequency", "Hz", 50.002))


def payload(seq: int, ts_us: int) -> bytes:
    """A ~100-byte JSON reading, as a substation RTU gateway would publish it."""
    name, unit, base = SIGNALS[seq % len(SIGNALS)]
    return orjson.dumps({"seq": seq, "ts": ts_us, "signal": name,
                         "value": round(base * (1 + (seq % 97) / 1000), 4), "unit": unit,
                         "quality": "good"})


def topic(site: str, lane: int) -> str:
    return f"substation/{site}/lane{lane}"


def write_lines(path: Path, first: int, count: int) -> None:
    now = int(time.time() * 1e6)
    with path.open("wb") as f:
        f.writelines(payload(n, now) + b"\n" for n in range(first, first + count))


class Blast:
    """``procs`` mosquitto_pub processes publishing ``count`` readings in total, QoS 1."""

    def __init__(self, *, workdir: Path, port: int, site: str, count: int, procs: int = 4,
                 first: int = 1, count_acks: bool = False) -> None:
        exe = shutil.which("mosquitto_pub")
        if exe is None:
            raise FileNotFoundError("mosquitto_pub is not installed (apt-get install "
                                    "mosquitto-clients)")
        self._exe, self.port, self.count, self._count_acks = exe, port, count, count_acks
        self._files: list[tuple[Path, str]] = []
        per = -(-count // procs)
        for i in range(procs):
            n = min(per, count - i * per)
            if n <= 0:
                break
            f = workdir / f"load-{site}-{first + i * per}-{n}.jsonl"
            if not f.exists():
                write_lines(f, first + i * per, n)
            self._files.append((f, topic(site, i)))
        self._procs: list[subprocess.Popen[bytes]] = []
        self._acked = [0] * len(self._files)
        self._threads: list[threading.Thread] = []

    def start(self) -> float:
        """Start publishing; returns the monotonic start time."""
        t0 = time.monotonic()
        for i, (f, t) in enumerate(self._files):
            argv = [self._exe, "-h", "127.0.0.1", "-p", str(self.port), "-q", "1", "-t", t,
                    # No '.' in the id: nats-server 2.10+ refuses it ("invalid character").
                    "-l", "-i", f"load-{self.port}-{i}-{time.time_ns()}"]
            if self._count_acks:
                argv = ["stdbuf", "-oL", *argv, "-d"]
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE if self._count_acks else
                                 subprocess.DEVNULL)
            self._procs.append(p)
            for target in (self._feed, self._count) if self._count_acks else (self._feed,):
                th = threading.Thread(target=target, args=(i, p, f), daemon=True)
                th.start()
                self._threads.append(th)
        return t0

    def _feed(self, i: int, p: subprocess.Popen[bytes], f: Path) -> None:
        assert p.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError), f.open("rb") as src:
            shutil.copyfileobj(src, p.stdin, 1 << 20)
            p.stdin.flush()

    def _count(self, i: int, p: subprocess.Popen[bytes], f: Path) -> None:
        assert p.stdout is not None
        tail = b""
        while chunk := os.read(p.stdout.fileno(), 1 << 16):
            data = tail + chunk
            self._acked[i] += data.count(b"PUBACK")
            tail = data[-8:]
            self._acked[i] -= tail.count(b"PUBACK")  # counted again with the next chunk

    def acked(self) -> int:
        return sum(self._acked)

    def stop(self) -> None:
        for p in self._procs:
            with contextlib.suppress(OSError):
                if p.stdin:
                    p.stdin.close()
            p.terminate()
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


class Paced:
    """One paho client publishing ``count`` readings at ``rate``/s, recording what was acked."""

    def __init__(self, *, port: int, site: str, count: int, rate: float, first: int = 1) -> None:
        self.port, self.site, self.count, self.rate, self.first = port, site, count, rate, first
        self.acked: set[int] = set()
        self.sent = 0
        self._inflight: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-publisher", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Paced:
        self._thread.start()
        return self

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        try:
            self._publish()
        except BaseException as exc:  # noqa: BLE001 - surfaced by join()
            self.error = exc

    def _publish(self) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                             client_id=f"paced-{self.site}-{self.first}-{time.time_ns()}",
                             clean_session=False)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 1)
        connected = threading.Event()
        early: dict[int, bool] = {}

        def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
            connected.set()

        def on_publish(c: mqtt.Client, u: object, mid: int, rc: object, p: object) -> None:
            ok = not getattr(rc, "is_failure", False)
            with self._lock:
                seq = self._inflight.pop(mid, None)
                if seq is None:
                    early[mid] = ok  # acked before publish() returned its mid
                elif ok:
                    self.acked.add(seq)

        client.on_connect, client.on_publish = on_connect, on_publish
        client.connect("127.0.0.1", self.port, keepalive=5)
        client.loop_start()
        try:
            if not connected.wait(10):
                raise ConnectionError(f"load generator: no CONNACK from port {self.port}")
            t0 = time.monotonic()
            for i in range(self.count):
                if self._stop.is_set():
                    break
                ahead = i / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
                seq = self.first + i
                # Never hold our lock across publish(): paho calls on_publish with its own
                # message lock held, so that would deadlock.
                info = client.publish(topic(self.site, 0), payload(seq, time.time_ns() // 1000),
                                      qos=1)
                with self._lock:
                    if info.mid in early:
                        if early.pop(info.mid):
                            self.acked.add(seq)
                    else:
                        self._inflight[info.mid] = seq
                self.sent += 1
            deadline = time.monotonic() + 60
            while self._inflight and time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(0.05)
        finally:
            client.disconnect()
            client.loop_stop()
