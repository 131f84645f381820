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
from bridge.shared import defaults as D
from bridge.shared.errors import DecodeError
from bridge.shared.kinds import Codec

if TYPE_CHECKING:
    from bridge.edge.codecs.sparkplug import Notice

DECODERS: dict[Codec, Callable[[str, bytes], Decoded]] = {Codec.JSON: decode_json,
                                                         Codec.RAW: decode_raw}


def make_decoder(*, codec: Codec, mappings: list[JsonMapping] | None = None,
                 notice: Notice | None = None, rebirth: bool = True,
                 rebirth_on_gap: bool = True, rebirth_interval_s: float = D.REBIRTH_INTERVAL_S,
                 rebirth_max_per_s: float = D.REBIRTH_MAX_PER_S,
                 max_edge_nodes: int = D.MAX_EDGE_NODES,
                 max_decompressed_bytes: int = D.MAX_DECOMPRESSED_BYTES) -> Decoder:
    if codec == Codec.SPARKPLUG:
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
    return StatelessDecoder(codec=Codec.JSON if mappings else codec, fn=fn)


__all__ = ["DECODERS", "DecodeError", "Decoded", "DecodedValue", "Decoder",
           "JsonMapping", "Publish", "make_decoder"]
