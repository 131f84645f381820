"""MQTT v5 source on paho-mqtt 2.x: QoS 1, manual acks in receive order, persistent session.

* Stable ``client_id``, ``clean_start=False`` and ``SessionExpiryInterval``: readings published
  while the agent is down wait in the broker.
* ``ReceiveMaximum`` bounds the unacked messages the broker sends us: this is the inbound flow
  control and the backpressure path (stop acking and the broker stops sending). Brokers do not
  all honour it (mosquitto 2.0.11 overruns it once acks flow), so the inbox also holds at most
  ``receive_maximum`` messages: beyond that paho's thread waits and stops reading the socket.
* Subscriptions use ``retainHandling=2``: a retained "last value" replayed on every
  (re)subscribe is not a new reading and would double in the stream.
* paho runs its network loop on its own thread; ``on_message`` only appends to the inbox and
  wakes the event loop once per burst. Acks go back through paho's thread-safe packet queue.
* With ``[sources.sparkplug] host_id``, the source is the Sparkplug Primary Host Application:
  every connection sets a will ``spBv1.0/STATE/<host_id>`` = ``{"online": false, "timestamp":
  T}`` and, once subscribed, publishes ``{"online": true, "timestamp": T}`` there (QoS 1,
  retained), with a new T per connection as Sparkplug 3.0 requires. Edge nodes that see the
  host offline keep their data (store and forward) until it is back. A clean stop publishes
  the offline state itself.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.edge.codecs import Publish
from bridge.edge.envelope import SourceInfo
from bridge.edge.sources.base import Inbox, Message
from bridge.edge.sources.paho import FastClient, check_paho
from bridge.shared.config import MqttSourceConfig
from bridge.shared.errors import ConfigError
from bridge.shared.files import Stamp, stamp
from bridge.shared.telemetry import AgentMetrics, event

# Payload bytes waiting in the inbox before paho's thread stops reading (besides the count
# bound): large messages between max_payload_bytes and max_packet_bytes cannot pile up in RAM.
INBOX_BYTES = 64 << 20
RECONNECT_MAX_S = 30.0  # paho's reconnect delay cap



class MqttSource:
    def __init__(self, *, config: MqttSourceConfig, metrics: AgentMetrics) -> None:
        check_paho()  # a paho without the internals FastClient uses: one clear error, now
        self.config = config
        self.metrics = metrics
        self.info = SourceInfo(name=config.name, protocol="mqtt", broker=config.url)
        # The agent's own inbound bound (see Inbox): the broker may overrun Receive Maximum.
        self._inbox = Inbox(limit=config.receive_maximum, max_wait_s=config.keepalive_s / 2,
                            max_bytes=max(INBOX_BYTES, 2 * config.max_packet_bytes))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        sp = config.decode.sparkplug
        self.state_topic = f"spBv1.0/STATE/{sp.host_id}" if sp and sp.host_id else None
        self._state_ts = 0
        self._stopped = asyncio.Event()  # set at the end of stop(): run() returns
        self._stopping = False  # our own offline STATE at stop must not be re-asserted
        self.generation = 0
        self.subscribed = asyncio.Event()
        self.reconnect_max_s = RECONNECT_MAX_S
        self._connacked = False  # a CONNACK since the last (re)connect attempt
        client = FastClient(CallbackAPIVersion.VERSION2, client_id=config.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls is not None:
            client.tls_set_context(config.tls.context())
            client.tls_refresh = self._tls_refresh
            self._tls_stamp = self._tls_files_stamp()
        elif config.password is not None:
            event("source.cleartext_credentials", level=logging.WARNING, source=config.name,
                  broker=config.url, reason="a password is sent to the broker unencrypted; "
                  "use mqtts:// with [sources.tls]")
        client.bind_interface = config.interface
        client.on_connect_fail = self._on_connect_fail
        client.reconnect_delay_set(min_delay=1, max_delay=int(RECONNECT_MAX_S))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message  # QoS 2 only (we subscribe at QoS 1)
        client.on_publish_received = self._on_publish_received
        self._client = client
        self._set_will()

    def _state(self, online: bool) -> bytes:
        return orjson.dumps({"online": online, "timestamp": self._state_ts})

    def _set_will(self) -> None:
        """A new STATE timestamp for the next connection, and its will."""
        if self.state_topic is not None:
            self._state_ts = time.time_ns() // 1_000_000
            self._client.will_set(self.state_topic, self._state(False), qos=1, retain=True)

    async def run(self) -> None:
        """Connect (paho's network thread then reads and reconnects) until ``stop``."""
        await self.start()
        await self._stopped.wait()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox.bind(self._loop)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.config.receive_maximum
        # Only the hard bound, far above max_payload_bytes: a broker discards a message larger
        # than this without a trace (MQTT v5 3.1.2.11.4), and pretends to have delivered it.
        # Everything between the two bounds reaches the intake and is dead-lettered as
        # oversize (prefix kept, full size recorded), so it is seen.
        props.MaximumPacketSize = self.config.max_packet_bytes
        self._client.connect_async(self.config.host, self.config.port,
                                   keepalive=self.config.keepalive_s, clean_start=False,
                                   properties=props)
        self._client.loop_start()

    # -- paho thread ---------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self.metrics.source_failures.labels(self.config.name, "connect_failed").inc()
            event("source.connect_failed", level=logging.ERROR, source=self.config.name,
                  broker=self.info.broker, reason=str(reason))
            return
        with self._lock:
            self.generation += 1
        self._connacked = True
        session = bool(flags.session_present)
        self.metrics.source_connects.labels(self.config.name, str(session).lower()).inc()
        event("source.connected", source=self.config.name, broker=self.info.broker,
              session_present=session, client_id=self.config.client_id)
        opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        subs = [(t, opts) for t in self.config.topics]
        if self.state_topic is not None:
            # To see ourselves reported offline (re-assert). QoS 0 and no-local: not a reading
            # source (nothing to store or ack), and our own STATE publishes never come back.
            subs.append((self.state_topic, SubscribeOptions(
                qos=0, noLocal=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)))
        client.subscribe(subs)

    def _tls_files_stamp(self) -> tuple[Stamp, ...]:
        tls = self.config.tls
        assert tls is not None
        return tuple(stamp(p) for p in (tls.ca, tls.cert, tls.key) if p is not None)

    def _tls_refresh(self) -> ssl.SSLContext | None:
        """paho thread, before each connection: renewed plant certificates are used from the
        next handshake on; a set that does not load keeps the one in use (and says so)."""
        assert self.config.tls is not None
        stamp = self._tls_files_stamp()
        if stamp == self._tls_stamp:
            return None
        self._tls_stamp = stamp
        try:
            ctx = self.config.tls.context()
        except ConfigError as exc:
            event("source.tls_reload_failed", level=logging.ERROR, source=self.config.name,
                  reason=str(exc), keeping="the certificates already in use")
            return None
        event("source.tls_reloaded", source=self.config.name, cert=str(self.config.tls.cert))
        return ctx

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """No connection (refused, unreachable, a bound interface down, TLS refused): paho
        retries on its own; this says why, each time."""
        self._connect_failed(self._client.last_error or "connection failed")

    def _connect_failed(self, reason: str) -> None:
        self.metrics.source_failures.labels(self.config.name, "connect_failed").inc()
        event("source.connect_failed", level=logging.ERROR, source=self.config.name,
              broker=self.info.broker, interface=self.config.interface, reason=reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            event("source.subscribe_failed", level=logging.ERROR, source=self.config.name,
                  topics=list(self.config.topics), reasons=failed)
            return
        self.metrics.source_up.labels(self.config.name).set(1)
        event("source.subscribed", source=self.config.name, topics=list(self.config.topics))
        if self.state_topic is not None:
            self._publish(self.state_topic, self._state(True), qos=1, retain=True)
            event("sparkplug.state_online", source=self.config.name, topic=self.state_topic,
                  timestamp=self._state_ts)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.subscribed.set)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self.metrics.source_up.labels(self.config.name).set(0)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.subscribed.clear)
        detail = self._client.last_error or None
        self._client.last_error = ""
        if not self._connacked and reason.is_failure:
            # Dropped before any CONNACK: the connection never worked (a TLS 1.3 broker that
            # wants a client certificate says so only after the handshake).
            self._connect_failed(detail or str(reason))
            self._set_will()
            return
        self._connacked = False
        if reason.is_failure:  # not our own clean disconnect at stop
            self.metrics.source_failures.labels(self.config.name, "lost").inc()
        event("source.disconnected", level=logging.WARNING, source=self.config.name,
              reason=str(reason), detail=detail)
        self._set_will()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_publish_received(msg.topic, bytes(msg.payload), msg.dup, msg.mid, msg.qos)

    def _on_publish_received(self, topic: str, payload: bytes, dup: bool, mid: int,
                             qos: int) -> None:
        if topic == self.state_topic:
            if not self._stopping:
                self._reassert(payload)
            if qos == 0:
                return  # our own STATE subscription: nothing to store, nothing to ack
        self._inbox.put(Message(topic=topic, payload=payload, redelivered=dup,
                                generation=self.generation, token=mid, qos=qos))

    def _reassert(self, payload: bytes) -> None:
        """Sparkplug 3.0: a Primary Host that sees itself reported offline says online again."""
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or doc.get("online") is not False:
            return
        ts = doc.get("timestamp")
        if isinstance(ts, int) and ts < self._state_ts:
            return  # an earlier session's will (queued in our session): already superseded
        assert self.state_topic is not None
        self.metrics.sparkplug_events.labels(self.config.name, "state_reasserted").inc()
        event("sparkplug.state_reasserted", level=logging.WARNING, source=self.config.name,
              topic=self.state_topic, seen_timestamp=doc.get("timestamp"),
              timestamp=self._state_ts)
        self._publish(self.state_topic, self._state(True), qos=1, retain=True)

    def _publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        outcome = "queued" if info.rc == mqtt.MQTT_ERR_SUCCESS else "failed"
        self.metrics.source_published.labels(self.config.name, outcome).inc()
        if outcome == "failed":
            event("source.publish_failed", level=logging.WARNING, source=self.config.name,
                  topic=topic, reason=mqtt.error_string(info.rc))

    # -- event loop ----------------------------------------------------------------------

    async def take(self, max_messages: int) -> list[Message]:
        return await self._inbox.take(max_messages)

    async def ack(self, messages: list[Message]) -> None:
        with self._lock:
            generation = self.generation
            for m in messages:
                if m.qos and m.generation == generation:
                    self._client.ack(m.token, m.qos)

    def publish(self, message: Publish) -> None:
        self._publish(message.topic, message.payload, qos=message.qos, retain=message.retain)

    async def stop(self) -> None:
        def _stop() -> None:
            self._stopping = True
            if self.state_topic is not None and self._client.is_connected():
                # A clean stop sends no will: say offline ourselves, as the will would.
                info = self._client.publish(self.state_topic, self._state(False), qos=1,
                                            retain=True)
                info.wait_for_publish(timeout=2.0)
            self._client.disconnect()
            self._client.loop_stop()

        self._inbox.close()  # a put blocked on a full inbox must not hold up loop_stop
        await asyncio.to_thread(_stop)
        self.metrics.source_up.labels(self.config.name).set(0)
        self._stopped.set()
