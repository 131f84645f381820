"""What the agent needs from a plant broker connection.

A source hands over messages in receive order and acks them later, in the same order, once the
spool has committed them. ``ack`` must ignore messages from a connection that has since been
replaced (an MQTT packet id or an AMQP delivery tag means nothing on a new connection): the
broker redelivers those (flagged), and the spool's redelivery ring recognises them.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Protocol

from bridge.codecs import Publish
from bridge.envelope import SourceInfo


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

    async def start(self) -> None: ...

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
    """

    def __init__(self) -> None:
        self._pending: collections.deque[Message] = collections.deque()
        self._ready = asyncio.Event()
        self._wake_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def put(self, message: Message) -> None:
        self._pending.append(message)
        if not self._wake_scheduled and self._loop is not None:
            self._wake_scheduled = True
            self._loop.call_soon_threadsafe(self._ready.set)

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
