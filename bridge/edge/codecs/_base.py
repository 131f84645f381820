"""Types shared by the decoders, and the ``Decoder`` seam the intake calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from bridge.shared.errors import DecodeError

Scalar = float | int | bool | str


@dataclass(slots=True)
class DecodedValue:
    signal: str
    value: Scalar | None  # None: the publisher said "null" (is_null on the wire)
    unit: str = ""
    quality: int = 0  # bridge.v1.Quality
    source_time_ns: int | None = None
    historical: bool = False


@dataclass(slots=True)
class Decoded:
    values: list[DecodedValue] = field(default_factory=list)
    source_time_ns: int | None = None
    source_seq: int | None = None
    raw: bytes = b""
    labels: dict[str, str] = field(default_factory=dict)
    # Set when the message is acknowledged but stores nothing (a Sparkplug host STATE, a
    # stale NDEATH): the reason is counted and logged, never silent.
    skip: str | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """A message a decoder asks the agent to publish to the plant broker (a rebirth request)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


class Decoder(Protocol):
    """Bytes in, a reading out. Only ``DecodeError`` may escape ``decode``.

    Stateful decoders (Sparkplug alias tables) report what changed through ``take_state``: the
    intake writes it in the same spool transaction as the messages that changed it, so state
    and acked messages never disagree after a crash; ``restore`` gets it back at start.
    """

    codec: str  # recorded in Envelope.codec

    def decode(self, topic: str, payload: bytes) -> Decoded: ...

    def take_state(self) -> dict[str, bytes | None]: ...

    def restore(self, state: dict[str, bytes]) -> None: ...

    def take_requests(self) -> list[Publish]: ...

    def stamped(self, topic: str, payload: bytes) -> bool:
        """Does the payload carry the publisher's own identity (its seq, and for Sparkplug the
        payload timestamp)? Then a byte-identical repeat is a retransmission, not a reading.
        Pure: must not change the decoder's state."""
        ...


class StatelessDecoder:
    """A pure ``(topic, payload) -> Decoded`` function as a ``Decoder``."""

    def __init__(self, *, codec: str, fn: Callable[[str, bytes], Decoded]) -> None:
        self.codec = codec
        self.decode = fn

    def take_state(self) -> dict[str, bytes | None]:
        return {}

    def restore(self, state: dict[str, bytes]) -> None:
        pass

    def take_requests(self) -> list[Publish]:
        return []

    def stamped(self, topic: str, payload: bytes) -> bool:
        try:
            return self.decode(topic, payload).source_seq is not None
        except DecodeError:
            return False
