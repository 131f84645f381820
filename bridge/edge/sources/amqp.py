"""AMQP 0-9-1 source on aiormq: a durable queue, manual acks after the spool commit.

* The queue (and, when configured, the exchange and its bindings) is declared on every
  connection, so a broker that lost its definitions gets them back. Publishers should send
  persistent messages (``delivery_mode=2``) for them to survive a broker restart.
* ``basic_qos(prefetch_count)`` bounds the unacked messages RabbitMQ sends us: inbound flow
  control and the backpressure path, as ``ReceiveMaximum`` is for MQTT.
* Acks go out as one ``basic_ack(tag, multiple=True)`` per spool commit, for the last message
  of the batch; tags are delivered in order on a channel, so this acks exactly the batch.
* aiormq does not reconnect. ``_run`` rebuilds connection, channel, qos and consumer after any
  failure, with capped, jittered, wakeable backoff (``bridge.common.Backoff``). A new
  connection is a new *generation*: tags of a dead channel are never acked on the new one
  (RabbitMQ would close the channel with PRECONDITION_FAILED); those messages come back with
  ``redelivered`` set and the spool's redelivery ring recognises the ones already stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiormq
import aiormq.abc
from yarl import URL

from bridge.edge.codecs import Publish
from bridge.edge.envelope import SourceInfo
from bridge.edge.sources.base import Inbox, Message
from bridge.shared.config import AmqpSourceConfig
from bridge.shared.pacing import Backoff
from bridge.shared.telemetry import AgentMetrics, event

_CONNECT_TIMEOUT_S = 10.0


class AmqpSource:
    def __init__(self, *, config: AmqpSourceConfig, metrics: AgentMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.info = SourceInfo(name=config.name, protocol="amqp", broker=config.url)
        self.subscribed = asyncio.Event()
        self.reconnect_max_s = config.reconnect_max_s
        self.generation = 0
        self._inbox = Inbox()
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._stopping = asyncio.Event()
        self._running = False
        self._finished = asyncio.Event()
        self._backoff = Backoff(base_s=0.2, cap_s=config.reconnect_max_s)
        self._ssl = config.tls.context() if config.tls is not None else None
        if self._ssl is None and config.password not in (None, "guest"):
            event("source.cleartext_credentials", level=logging.WARNING, source=config.name,
                  broker=config.url, reason="a password is sent to the broker unencrypted; "
                  "use amqps:// with [sources.tls]")

    def _url(self) -> URL:
        c = self.config
        return URL.build(scheme="amqps" if c.tls else "amqp", user=c.username,
                         password=c.password, host=c.host,
                         port=c.port, path="/" if c.vhost == "/" else "/" + c.vhost,
                         query={"heartbeat": str(c.heartbeat_s), "name": f"bridge {c.name}"},
                         encoded=False)

    async def run(self) -> None:
        """Connect, consume and reconnect until ``stop``; returns once the connection closed."""
        self._inbox.bind(asyncio.get_running_loop())
        self._running = True
        try:
            await self._run()
        finally:
            self._finished.set()

    async def _run(self) -> None:
        name = self.config.name
        while not self._stopping.is_set():
            connection: aiormq.abc.AbstractConnection | None = None
            try:
                connection = await asyncio.wait_for(
                    aiormq.connect(self._url(), context=self._ssl), _CONNECT_TIMEOUT_S)
                channel = await self._consume(connection)
                self.metrics.source_connects.labels(name, "false").inc()
                self.metrics.source_up.labels(name).set(1)
                self._backoff.reset()
                self.subscribed.set()
                event("source.subscribed", source=name, broker=self.info.broker,
                      queue=self.config.queue, generation=self.generation)
                stop = asyncio.ensure_future(self._stopping.wait())
                try:
                    await asyncio.wait({connection.closing, channel.closing, stop},
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                if self._stopping.is_set():
                    break
                reason = _reason(channel.closing if channel.closing.done()
                                 else connection.closing)
                self.metrics.source_failures.labels(name, "lost").inc()
                event("source.disconnected", level=logging.WARNING, source=name,
                      broker=self.info.broker, reason=reason)
            except (aiormq.AMQPError, OSError, TimeoutError, ConnectionError) as exc:
                self.metrics.source_failures.labels(name, "connect_failed").inc()
                event("source.connect_failed", level=logging.ERROR, source=name,
                      broker=self.info.broker, reason=f"{type(exc).__name__}: {exc}"[:300],
                      attempt=self._backoff.attempt + 1)
            finally:
                self.subscribed.clear()
                self.metrics.source_up.labels(name).set(0)
                self._channel = None
                if connection is not None and not connection.is_closed:
                    with contextlib.suppress(Exception):
                        await connection.close()
            if not self._stopping.is_set():
                await self._backoff.sleep()

    async def _consume(self, connection: aiormq.abc.AbstractConnection
                       ) -> aiormq.abc.AbstractChannel:
        c = self.config
        channel = await connection.channel(publisher_confirms=False)
        await channel.basic_qos(prefetch_count=c.prefetch)
        await channel.queue_declare(c.queue, durable=c.durable)
        if c.exchange:
            await channel.exchange_declare(c.exchange, exchange_type=c.exchange_type,
                                           durable=c.durable)
            for key in c.bindings:
                await channel.queue_bind(c.queue, c.exchange, routing_key=key)
        self.generation += 1
        generation = self.generation

        async def on_message(msg: aiormq.abc.DeliveredMessage) -> None:
            self._inbox.put(Message(topic=msg.routing_key or c.queue, payload=msg.body,
                                    redelivered=bool(msg.redelivered), generation=generation,
                                    token=msg.delivery_tag or 0, qos=1))

        await channel.basic_consume(c.queue, on_message, no_ack=False)
        self._channel = channel
        return channel

    async def take(self, max_messages: int) -> list[Message]:
        return await self._inbox.take(max_messages)

    async def ack(self, messages: list[Message]) -> None:
        channel = self._channel
        last = next((m for m in reversed(messages) if m.generation == self.generation), None)
        if channel is None or last is None or channel.is_closed:
            return  # the broker redelivers them on the next connection
        try:
            await channel.basic_ack(last.token, multiple=True)
        except (aiormq.AMQPError, ConnectionError) as exc:
            event("source.ack_failed", level=logging.WARNING, source=self.config.name,
                  reason=f"{type(exc).__name__}: {exc}"[:300], messages=len(messages))

    def publish(self, message: Publish) -> None:
        # Sparkplug commands are MQTT; an AMQP source has no edge node to ask.
        self.metrics.source_published.labels(self.config.name, "unsupported").inc()
        event("source.publish_unsupported", level=logging.WARNING, source=self.config.name,
              topic=message.topic, reason="AMQP sources do not publish")

    async def stop(self) -> None:
        self._stopping.set()
        self._backoff.wake()
        if self._running:
            await self._finished.wait()


def _reason(fut: asyncio.Future[object]) -> str:
    if not fut.done() or fut.cancelled():
        return "closed"
    exc = fut.exception()
    return "closed" if exc is None else f"{type(exc).__name__}: {exc}"[:300]
