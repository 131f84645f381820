"""What the agent needs from a plant broker connection.

A source hands over messages in receive order and acks them later, in the same order, once the
spool has committed them. ``ack`` must ignore messages from a connection that has since been
replaced: the broker redelivers those (flagged), and the spool's redelivery ring recognises them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from bridge.envelope import SourceInfo


@dataclass(slots=True)
class Message:
    topic: str
    payload: bytes
    redelivered: bool
    generation: int   # which connection delivered it
    token: int        # MQTT packet id / AMQP delivery tag
    qos: int


class Source(Protocol):
    info: SourceInfo

    async def start(self) -> None: ...

    async def take(self, max_messages: int) -> list[Message]:
        """Wait for at least one message; return up to ``max_messages`` in receive order."""
        ...

    def ack(self, messages: list[Message]) -> None: ...

    async def stop(self) -> None: ...
