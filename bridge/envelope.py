"""Decoded payload -> ``bridge.v1.Envelope``; request ids; batch wire encoding. Pure, no I/O.

A reading's identity is ``(site_id, epoch, seq)`` (DESIGN.md, "Identity of a reading"); this
module is the only place that composes it into bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass

from bridge._pb import bridge_pb2 as pb
from bridge.codecs import Decoded

PROTOCOLS = {"mqtt": pb.PROTOCOL_MQTT, "amqp": pb.PROTOCOL_AMQP}


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceInfo:
    """What every envelope from one source shares."""

    name: str
    protocol: str
    broker: str


def build_envelope(*, site_id: str, epoch: int, seq: int, source: SourceInfo, topic: str,
                   decoded: Decoded, codec: str, gateway_time_ns: int,
                   clock_synced: bool) -> bytes:
    env = pb.Envelope(site_id=site_id, epoch=epoch, seq=seq, codec=codec,
                      gateway_time_ns=gateway_time_ns, clock_synced=clock_synced)
    src = env.source
    src.protocol = PROTOCOLS[source.protocol]
    src.broker = source.broker
    src.topic = topic
    src.name = source.name
    if decoded.source_time_ns is not None:
        env.source_time_ns = decoded.source_time_ns
    if decoded.source_seq is not None:
        env.source_seq = decoded.source_seq
    if decoded.raw:
        env.raw = decoded.raw
    if decoded.labels:
        env.labels.update(decoded.labels)
    for dv in decoded.values:
        v = env.values.add(signal=dv.signal, unit=dv.unit, quality=dv.quality,
                           historical=dv.historical)
        value = dv.value
        if value is None:
            v.is_null = True
        elif isinstance(value, bool):
            v.boolean = value
        elif isinstance(value, int):
            v.integer = value
        elif isinstance(value, float):
            v.number = value
        else:
            v.text = value
        if dv.source_time_ns is not None:
            v.source_time_ns = dv.source_time_ns
    return env.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_batch(batch_id: str, envelopes: list[bytes]) -> bytes:
    """Serialise a ``bridge.v1.Batch`` from already-serialised envelopes without re-parsing.

    Field 1 (batch_id) and repeated field 2 (envelopes), both length-delimited: the same bytes
    ``Batch(batch_id=..., envelopes=[...]).SerializeToString()`` produces.
    """
    bid = batch_id.encode()
    parts = [b"\x0a", _varint(len(bid)), bid]
    for blob in envelopes:
        parts.append(b"\x12")
        parts.append(_varint(len(blob)))
        parts.append(blob)
    return b"".join(parts)


class ClockSync:
    """Whether the kernel considers the wall clock synchronised (adjtimex), cached for 10 s."""

    _TIME_ERROR = 5

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(name, use_errno=True) if name else None
        self._checked = 0.0
        self._synced = False

    def synced(self) -> bool:
        now = time.monotonic()
        if now - self._checked > 10.0:
            self._checked = now
            self._synced = self._query()
        return self._synced

    def _query(self) -> bool:
        if self._libc is None:
            return False
        buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        state = self._libc.adjtimex(buf)
        return bool(state >= 0 and state != self._TIME_ERROR)
