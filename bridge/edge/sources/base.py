"""What the agent needs from a plant broker connection.

A source hands over messages in receive order and acks them later, in the same order, once the
spool has committed them. ``ack`` must ignore messages from a connection that has since been
replaced (an MQTT packet id or an AMQP delivery tag means nothing on a new connection): the
broker redelivers those (flagged), and the spool's redelivery ring recognises them.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass
from typing import Protocol

from bridge.edge.codecs import Publish
from bridge.edge.envelope import SourceInfo


@dataclass(slots=True)
class Message:
    topic: str        # MQTT topic, or AMQP routing key
    payload: bytes
    redelivered: bool
    generation: int   # which connection delivered it
    token: int        # MQTT packet id / AMQP delivery tag
    qos: int


class Source(Protocol):
    info: SourceInfo
    subscribed: asyncio.Event  # set while connected and consuming
    reconnect_max_s: float     # the cap of its reconnect backoff (the agent's readiness)

    async def run(self) -> None:
        """Connect, consume and reconnect until ``stop``; returns once stopped (a task of the
        agent's TaskGroup)."""
        ...

    async def take(self, max_messages: int) -> list[Message]:
        """Wait for at least one message; return up to ``max_messages`` in receive order."""
        ...

    async def ack(self, messages: list[Message]) -> None: ...

    def publish(self, message: Publish) -> None:
        """Send a message to the plant broker, best effort (Sparkplug rebirth requests)."""
        ...

    async def stop(self) -> None: ...


class Inbox:
    """Messages a network callback delivered, taken by the intake in receive order.

    ``put`` may be called from another thread (paho's network loop): it only appends and wakes
    the event loop once per burst, so a fast broker costs one wake-up per batch, not per message.

    With ``limit``, ``put`` from that other thread blocks while ``limit`` messages wait, so the
    network thread stops reading the socket and TCP pushes back on the broker. This is the
    agent's own inbound bound: mosquitto 2.0.11 overruns the client's MQTT v5 Receive Maximum
    once acks flow (eclipse-mosquitto/mosquitto#2301; measured here: 14,408 unacked against a
    Receive Maximum of 1,000), and without a bound a broker holding a long backlog would pour
    all of it into the agent's memory, while the network thread, busy parsing, starves the
    intake of the GIL. A blocked ``put`` gives up after ``max_wait_s`` and appends anyway, so
    the network loop still answers keepalives while the spool applies backpressure (at most
    one extra message per ``max_wait_s``).
    """

    def __init__(self, *, limit: int | None = None, max_wait_s: float = 10.0,
                 max_bytes: int | None = None) -> None:
        """``max_bytes``: payload bytes waiting, a second bound beside ``limit`` (a message
        is always let in when nothing waits, however large). One producer thread per inbox.

        The bytes waiting are ``_bytes_in - _bytes_out``, each counter written by one side
        only (``put``'s thread, ``take`` on the loop), so the per-message path takes no lock.
        """
        self._pending: collections.deque[Message] = collections.deque()
        self._bytes_in = 0
        self._bytes_out = 0
        self._max_bytes = max_bytes
        self._ready = asyncio.Event()
        self._wake_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limit = limit
        self._max_wait_s = max_wait_s
        self._room = threading.Condition()
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __len__(self) -> int:
        return len(self._pending)

    def _full(self) -> bool:
        if self._limit is not None and len(self._pending) >= self._limit:
            return True
        return self._max_bytes is not None and bool(self._pending) and \
            self._bytes_in - self._bytes_out >= self._max_bytes

    def put(self, message: Message) -> None:
        pending, limit, cap = self._pending, self._limit, self._max_bytes
        if (limit is not None and len(pending) >= limit) or (
                cap is not None and pending and self._bytes_in - self._bytes_out >= cap):
            with self._room:  # what _full() says, inline: this runs for every message
                self._room.wait_for(lambda: self._closed or not self._full(),
                                    timeout=self._max_wait_s)
        self._bytes_in += len(message.payload)
        self._pending.append(message)
        if not self._wake_scheduled and self._loop is not None:
            self._wake_scheduled = True
            self._loop.call_soon_threadsafe(self._ready.set)

    def close(self) -> None:
        """Release a blocked ``put`` for good (the source is stopping)."""
        with self._room:
            self._closed = True
            self._room.notify_all()

    async def take(self, max_messages: int) -> list[Message]:
        while True:
            self._wake_scheduled = False
            self._ready.clear()
            out: list[Message] = []
            pending = self._pending
            taken = 0
            while pending and len(out) < max_messages:
                m = pending.popleft()
                taken += len(m.payload)
                out.append(m)
            self._bytes_out += taken
            if out and (self._limit is not None or self._max_bytes is not None):
                with self._room:
                    self._room.notify_all()
            if out:
                if pending:
                    self._ready.set()
                return out
            await self._ready.wait()
