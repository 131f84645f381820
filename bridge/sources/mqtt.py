"""MQTT v5 source on paho-mqtt 2.x: QoS 1, manual acks in receive order, persistent session.

* Stable ``client_id``, ``clean_start=False`` and ``SessionExpiryInterval``: readings published
  while the agent is down wait in the broker.
* ``ReceiveMaximum`` bounds the unacked messages the broker sends us: this is the inbound flow
  control and the backpressure path (stop acking and the broker stops sending).
* Subscriptions use ``retainHandling=2``: a retained "last value" replayed on every
  (re)subscribe is not a new reading and would double in the stream.
* paho runs its network loop on its own thread; ``on_message`` only appends to a deque and
  wakes the event loop once per burst. Acks go back through paho's thread-safe packet queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.config import MqttSourceConfig
from bridge.envelope import SourceInfo
from bridge.sources.base import Message
from bridge.telemetry import AgentMetrics, event


class MqttSource:
    def __init__(self, *, config: MqttSourceConfig, metrics: AgentMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.info = SourceInfo(name=config.name, protocol="mqtt", broker=config.url)
        self._pending: collections.deque[Message] = collections.deque()
        self._wake_scheduled = False
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self.generation = 0
        self.subscribed = asyncio.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.config.receive_maximum
        self._client.connect_async(self.config.host, self.config.port,
                                   keepalive=self.config.keepalive_s, clean_start=False,
                                   properties=props)
        self._client.loop_start()

    # -- paho thread ---------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            event("source.connect_failed", level=logging.ERROR, source=self.config.name,
                  broker=self.info.broker, reason=str(reason))
            return
        with self._lock:
            self.generation += 1
        session = bool(flags.session_present)
        self.metrics.source_connects.labels(self.config.name, str(session).lower()).inc()
        event("source.connected", source=self.config.name, broker=self.info.broker,
              session_present=session, client_id=self.config.client_id)
        opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe([(t, opts) for t in self.config.topics])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            event("source.subscribe_failed", level=logging.ERROR, source=self.config.name,
                  topics=list(self.config.topics), reasons=failed)
            return
        self.metrics.source_up.labels(self.config.name).set(1)
        event("source.subscribed", source=self.config.name, topics=list(self.config.topics))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.subscribed.set)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.metrics.source_up.labels(self.config.name).set(0)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.subscribed.clear)
        event("source.disconnected", level=logging.WARNING, source=self.config.name,
              reason=str(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._pending.append(Message(topic=msg.topic, payload=bytes(msg.payload),
                                     redelivered=msg.dup, generation=self.generation,
                                     token=msg.mid, qos=msg.qos))
        if not self._wake_scheduled and self._loop is not None:
            self._wake_scheduled = True
            self._loop.call_soon_threadsafe(self._ready.set)

    # -- event loop ----------------------------------------------------------------------

    async def take(self, max_messages: int) -> list[Message]:
        while True:
            self._wake_scheduled = False
            self._ready.clear()
            out: list[Message] = []
            pending = self._pending
            while pending and len(out) < max_messages:
                out.append(pending.popleft())
            if out:
                if pending:
                    self._ready.set()
                return out
            await self._ready.wait()

    def ack(self, messages: list[Message]) -> None:
        with self._lock:
            generation = self.generation
            for m in messages:
                if m.qos and m.generation == generation:
                    self._client.ack(m.token, m.qos)

    async def stop(self) -> None:
        def _stop() -> None:
            self._client.disconnect()
            self._client.loop_stop()

        await asyncio.to_thread(_stop)
        self.metrics.source_up.labels(self.config.name).set(0)
