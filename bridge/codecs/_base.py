"""Types shared by the decoders."""

from __future__ import annotations

from dataclasses import dataclass, field


class DecodeError(Exception):
    """The payload cannot become a reading; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass(slots=True)
class DecodedValue:
    signal: str
    value: float | int | bool | str
    unit: str = ""
    quality: int = 0  # bridge.v1.Quality
    source_time_ns: int | None = None


@dataclass(slots=True)
class Decoded:
    values: list[DecodedValue] = field(default_factory=list)
    source_time_ns: int | None = None
    source_seq: int | None = None
    raw: bytes = b""
