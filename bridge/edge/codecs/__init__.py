"""Payload decoders: bytes in, decoded values out. No I/O; every decoder is fuzzed in tests.

A decoder raises ``DecodeError`` with a short machine-readable ``reason`` (the dead-letter
reason and metric label) and a human ``detail``. Nothing else may escape a decoder: the agent
treats any other exception as a bug and still dead-letters the message (reason ``intake_error``).

``json`` and ``raw`` are pure functions; ``sparkplug`` keeps birth certificates (see
``bridge.edge.codecs.sparkplug``); JSON mappings (``bridge.edge.codecs.mapping``) sit in front of a
source's codec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bridge.edge.codecs._base import Decoded, DecodedValue, Decoder, Publish, StatelessDecoder
from bridge.edge.codecs.json import decode_json
from bridge.edge.codecs.mapping import JsonMapping, MappedJson
from bridge.edge.codecs.raw import decode_raw
from bridge.shared.errors import DecodeError

if TYPE_CHECKING:
    from bridge.edge.codecs.sparkplug import Notice

CODECS = ("json", "raw", "sparkplug")
DECODERS: dict[str, Callable[[str, bytes], Decoded]] = {"json": decode_json, "raw": decode_raw}


def make_decoder(*, codec: str, mappings: list[JsonMapping] | None = None,
                 notice: Notice | None = None, rebirth: bool = True,
                 rebirth_on_gap: bool = True, rebirth_interval_s: float = 10.0,
                 rebirth_max_per_s: float = 10.0, max_edge_nodes: int = 10_000,
                 max_decompressed_bytes: int = 16 << 20) -> Decoder:
    if codec == "sparkplug":
        # Imported here: its generated schema and decoder cost a JSON-only agent 1.8 MB of RSS.
        from bridge.edge.codecs.sparkplug import SparkplugDecoder

        return SparkplugDecoder(rebirth=rebirth, rebirth_on_gap=rebirth_on_gap,
                                rebirth_interval_s=rebirth_interval_s, notice=notice,
                                rebirth_max_per_s=rebirth_max_per_s,
                                max_edge_nodes=max_edge_nodes,
                                max_decompressed_bytes=max_decompressed_bytes)
    fn = DECODERS[codec]
    if mappings:
        fn = MappedJson(mappings=mappings, fallback=fn).decode
    return StatelessDecoder(codec="json" if mappings else codec, fn=fn)


__all__ = ["CODECS", "DECODERS", "DecodeError", "Decoded", "DecodedValue", "Decoder",
           "JsonMapping", "Publish", "make_decoder"]
