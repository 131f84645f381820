"""The MQTT source and intake against a real mosquitto: acks, sessions, redelivery."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import struct
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.edge.codecs import Publish, make_decoder
from bridge.edge.intake import ClockSync, Intake, IntakePolicy
from bridge.edge.sources.base import Message
from bridge.edge.sources.mqtt import MqttSource
from bridge.edge.sources.paho import FastClient
from bridge.edge.spool import AsyncSpool, Spool
from bridge.shared.config import MqttSourceConfig
from bridge.shared.telemetry import AgentMetrics
from devkit.localrun import Mosquitto
from tests.conftest import publish_raw


class CrashBeforeAck:
    """The real source, except acks never reach the broker: a crash between commit and ack."""

    def __init__(self, inner: MqttSource) -> None:
        self.inner = inner
        self.info = inner.info
        self.subscribed = inner.subscribed

    async def start(self) -> None:
        await self.inner.start()

    async def take(self, max_messages: int) -> list[Message]:
        return await self.inner.take(max_messages)

    async def ack(self, messages: list[Message]) -> None:
        pass

    def publish(self, message: Publish) -> None:
        self.inner.publish(message)

    async def stop(self) -> None:
        await self.inner.stop()


def source_config(port: int) -> MqttSourceConfig:
    return MqttSourceConfig(name="plant", host="127.0.0.1", port=port, topics=("plant/#",),
                            client_id="bridge-test-redelivery", session_expiry_s=300,
                            receive_maximum=100, keepalive_s=30, username=None, password=None)


async def wait_until(cond, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(source, spool: AsyncSpool, metrics: AgentMetrics):
    intake = Intake(source=source, spool=spool, site_id="site-a",
                    decoder=make_decoder(codec="json"), metrics=metrics, clock=ClockSync(),
                    policy=IntakePolicy(commit_max=50, ring_size=200))
    await source.start()
    task = asyncio.create_task(intake.run())
    try:
        yield intake
    finally:
        intake.stop()
        await task
        await source.stop()


async def test_a_redelivered_message_already_in_the_spool_is_acked_not_stored_twice(
        tmp_path: Path):
    broker = Mosquitto(tmp_path).start()
    try:
        cfg = source_config(broker.port)
        payloads = [("plant/p/flow", b'{"value": %d, "seq": %d}' % (i, i)) for i in range(20)]

        def open_spool() -> AsyncSpool:
            return AsyncSpool(Spool(path=tmp_path / "spool.db", site_id="site-a",
                                    max_bytes=1 << 24))

        spool, metrics = open_spool(), AgentMetrics()
        first = MqttSource(config=cfg, metrics=metrics)
        async with running(CrashBeforeAck(first), spool, metrics):
            await asyncio.wait_for(first.subscribed.wait(), 10)
            await asyncio.to_thread(publish_raw, broker.port, payloads)
            await wait_until(lambda: spool.figures().readings == 20)
        await spool.close()

        # "Restart": the spool reopens from disk; the broker redelivers the 20 unacked (DUP=1).
        spool, metrics = open_spool(), AgentMetrics()
        second = MqttSource(config=cfg, metrics=metrics)
        skipped = metrics.source_redelivered_skipped.labels("plant")
        async with running(second, spool, metrics):
            await wait_until(lambda: skipped._value.get() == 20)
            assert spool.figures().readings == 20
            # The same payloads published again, unflagged, are new readings and are kept.
            await asyncio.to_thread(publish_raw, broker.port, payloads[:5])
            await wait_until(lambda: spool.figures().readings == 25)
        await spool.close()

        # Everything was acked this time: a third session gets nothing back.
        spool, metrics = open_spool(), AgentMetrics()
        third = MqttSource(config=cfg, metrics=metrics)
        async with running(third, spool, metrics) as intake:
            await asyncio.wait_for(third.subscribed.wait(), 10)
            await asyncio.to_thread(publish_raw, broker.port, [("plant/p/flow", b"1")])
            await wait_until(lambda: spool.figures().readings == 26)
            assert intake.committed_messages == 1
        await spool.close()
    finally:
        broker.stop()


async def test_a_broker_that_overruns_receive_maximum_cannot_flood_the_agent(tmp_path: Path):
    """mosquitto 2.0.11 sends past the client's Receive Maximum once acks flow (#2301).

    Without the agent's own bound, the inbox grew to 145,000 messages in a full-speed run.
    """
    broker = Mosquitto(tmp_path).start()
    limit, total = 20, 600
    try:
        cfg = dataclasses.replace(source_config(broker.port), receive_maximum=limit,
                                  client_id="bridge-test-bound")
        source = MqttSource(config=cfg, metrics=AgentMetrics())
        await source.start()
        await asyncio.wait_for(source.subscribed.wait(), 10)
        items = [("plant/p/flow", b"%d" % i) for i in range(total)]
        await asyncio.to_thread(publish_raw, broker.port, items)  # queued for our session
        inbox = source._inbox
        got: list[bytes] = []
        peak = 0
        while len(got) < total:
            want = min(limit, total - len(got))
            await wait_until(lambda: len(inbox) >= want)  # noqa: B023 - awaited here
            peak = max(peak, len(inbox))
            taken = await source.take(5)
            got += [m.payload for m in taken]
            await source.ack(taken)  # each ack is what makes the broker overrun its quota
            peak = max(peak, len(inbox))
        await source.stop()
        assert got == [p for _, p in items], "all of them, in order"
        assert peak == limit, "the bound was reached and never passed"
    finally:
        broker.stop()


async def test_payloads_of_every_size_arrive_whole_and_in_order_across_a_broker_restart(
        tmp_path: Path):
    """The buffered reads: packets split across 64 KiB reads, and a fresh buffer per connection."""
    broker = Mosquitto(tmp_path).start()
    rng = random.Random(7)
    sizes = [0, 1, 127, 128, 16383, 16384, 65535, 65536, 65537, 200_000]
    sizes += [rng.randrange(0, 3000) for _ in range(300)]
    items = [("plant/p/blob", rng.randbytes(n)) for n in sizes]
    try:
        cfg = dataclasses.replace(source_config(broker.port), client_id="bridge-test-sizes")
        source = MqttSource(config=cfg, metrics=AgentMetrics())
        await source.start()

        async def roundtrip() -> list[bytes]:
            await asyncio.wait_for(source.subscribed.wait(), 30)
            await asyncio.to_thread(publish_raw, broker.port, items)
            got: list[bytes] = []
            while len(got) < len(items):
                taken = await source.take(50)
                got += [m.payload for m in taken]
                await source.ack(taken)
            return got

        assert await roundtrip() == [p for _, p in items]
        broker.stop()
        await wait_until(lambda: not source.subscribed.is_set())
        broker.start()  # same port; the source reconnects on its own
        assert await roundtrip() == [p for _, p in items]
        await source.stop()
    finally:
        broker.stop()


async def test_publish_properties_from_the_plant_are_skipped_and_the_payload_kept(tmp_path: Path):
    """v5 properties a SCADA may set (user properties, content type, expiry) precede the payload."""
    broker = Mosquitto(tmp_path).start()
    try:
        cfg = dataclasses.replace(source_config(broker.port), client_id="bridge-test-props")
        source = MqttSource(config=cfg, metrics=AgentMetrics())
        await source.start()
        await asyncio.wait_for(source.subscribed.wait(), 10)

        def publish_with_properties() -> None:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            client.connect("127.0.0.1", broker.port)
            client.loop_start()
            try:
                for i in range(3):
                    props = Properties(PacketTypes.PUBLISH)
                    props.UserProperty = [("site", "plant-7"), ("unit", "x" * (100 * i + 1))]
                    props.ContentType = "application/json"
                    props.MessageExpiryInterval = 3600
                    props.PayloadFormatIndicator = 1
                    client.publish("plant/é/flow", b'{"value": %d}' % i, qos=1,
                                   properties=props).wait_for_publish(10)
            finally:
                client.disconnect()
                client.loop_stop()

        await asyncio.to_thread(publish_with_properties)
        got: list[Message] = []
        while len(got) < 3:
            got += await source.take(10)
        assert [(m.topic, m.payload, m.qos) for m in got] == [
            ("plant/é/flow", b'{"value": %d}' % i, 1) for i in range(3)]
        await source.ack(got)
        await source.stop()
    finally:
        broker.stop()


def publish_packet(mid: int, payload: bytes) -> bytes:
    """A v5 QoS 1 PUBLISH (no properties), as a broker sends it."""
    topic = b"plant/p/flow"
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + b"\x00" + payload
    size, n = b"", len(body)
    while True:
        n, byte = n >> 7, n & 0x7F
        size += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return bytes([0x32]) + size + body


def test_acks_queued_during_a_long_burst_go_out_before_the_burst_ends():
    """While the broker keeps sending, a packet straddling every 64 KiB read means the read
    buffer never drains; acks must still be written between packets (they piled up to 120,000
    and the agent's RSS with them)."""
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = FastClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5,
                     manual_ack=True)
    client._sock = ours
    client._thread = threading.current_thread()  # as under loop_start: acks are only queued
    burst = b"".join(publish_packet(mid, b"x" * 97) for mid in range(1, 1801))  # ~200 KiB
    assert len(burst) > 3 * FastClient._BUF
    broker.sendall(burst)
    acked_by: dict[int, bytes] = {}

    def deliver(topic: str, payload: bytes, dup: bool, mid: int, qos: int) -> None:
        if mid == 1:
            client.ack(1, 1)
        if mid == 1500:  # far past the first read: the ack must be on the wire by now
            with contextlib.suppress(BlockingIOError):
                acked_by[mid] = broker.recv(64, socket.MSG_DONTWAIT)

    client.on_publish_received = deliver
    assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert acked_by.get(1500, b"")[:4] == bytes([0x40, 0x02, 0x00, 0x01]), "PUBACK for mid 1"
    ours.close()
    broker.close()


def test_the_installed_paho_has_every_internal_the_fast_client_uses() -> None:
    import importlib.metadata

    from bridge.edge.sources import paho

    paho.check_paho()
    assert importlib.metadata.version("paho-mqtt") == paho.TESTED


def test_a_paho_without_an_internal_is_one_clear_error_naming_its_version() -> None:
    from bridge.edge.sources import paho
    from bridge.shared.errors import DependencyError

    class Renamed(mqtt.Client):
        _packet_read = None  # type: ignore[assignment]  # as if a release renamed it

    with pytest.raises(DependencyError, match=r"paho-mqtt 2\.2\.0 lacks internals .*"
                                              r"_packet_read.*paho-mqtt==2\.2\.0"):
        paho.check_paho(Renamed)
