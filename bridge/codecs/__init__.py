"""Payload decoders: bytes in, decoded values out. Pure functions, no I/O; fuzzed in tests.

A decoder raises ``DecodeError`` with a short machine-readable ``reason`` (the dead-letter
reason and metric label) and a human ``detail``. Nothing else may escape a decoder: the agent
treats any other exception as a bug and still dead-letters the message (reason ``codec_bug``).
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.codecs._base import Decoded, DecodedValue, DecodeError
from bridge.codecs.json import decode_json
from bridge.codecs.raw import decode_raw

Decoder = Callable[[str, bytes], Decoded]

DECODERS: dict[str, Decoder] = {"json": decode_json, "raw": decode_raw}

__all__ = ["DECODERS", "DecodeError", "Decoded", "DecodedValue", "Decoder"]
