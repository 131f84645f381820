"""The ``raw`` codec: keep the payload bytes as they are, decode nothing."""

from __future__ import annotations

from bridge.edge.codecs._base import Decoded


def decode_raw(topic: str, payload: bytes) -> Decoded:
    return Decoded(raw=payload)
