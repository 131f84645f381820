"""The ``sparkplug`` codec: Sparkplug B (spBv1.0) as an MQTT host application reads it.

Topics are ``spBv1.0/<group>/<type>/<edge_node>[/<device>]``. The decoder keeps, per edge node,
what its last NBIRTH (and each device's DBIRTH) declared, because DATA messages carry only
aliases and no datatypes:

* **NBIRTH** resets the node: its ``bdSeq``, its alias table (alias -> name, datatype), its seq,
  and forgets every device (devices must be born again after their node).
* **DBIRTH** sets one device's alias table; the node must be born.
* **NDATA/DDATA** values are resolved through those tables. DATA from a node or device that is
  not born, or with an alias no birth declared, cannot be typed: ``DecodeError``
  (``data_before_birth``, ``unknown_alias``), so the message is dead-lettered, and a rebirth is
  requested (``Node Control/Rebirth`` NCMD, at most once per node per ``rebirth_interval_s``).
* **NDEATH** takes the node (and its devices) offline only when its ``bdSeq`` matches the one
  of the current birth: a will left over from an earlier connection is skipped as
  ``stale_death``. **DDEATH** takes a device offline. Deaths are stored as envelopes without
  values, so consumers see when values went stale.
* **seq** (0..255, wrapping, one counter per edge node over all its messages but NDEATH) is
  checked: a jump is counted and logged as ``seq_gap`` and, with ``rebirth_on_gap``, triggers a
  rebirth request. The message itself is kept.
* NCMD/DCMD (when subscribed) are stored as what they are, resolved by name. ``spBv1.0/STATE/..``
  host messages are skipped (``host_state``).

Typed values: integers of every width (two's complement on the wire), Float, Double, Boolean,
String/Text/UUID, DateTime (integer ms, unit ``unix_ms``); ``is_null`` gives a null value and
``is_historical`` marks it historical. Metrics of other types (Bytes, File, DataSet, Template,
arrays) are not turned into values; the envelope then keeps the whole payload in ``raw`` and
names those metrics in the ``unsupported`` label, so nothing is lost.

**Compression** (Eclipse Tahu's edge libraries, ``compress`` option): the payload's ``uuid`` is
``SPBV1.0_COMPRESSED``, its ``body`` holds the real payload compressed, and a String metric
``algorithm`` names the method: ``GZIP`` or ``DEFLATE`` (zlib-wrapped, as Tahu writes it; raw
deflate is accepted too). The decoder inflates at most ``max_decompressed_bytes`` and decodes
the inner payload as if it had arrived itself. More than that is ``decompression_bomb``; an
algorithm it does not know is ``unknown_compression``; a body that does not inflate is
``bad_compression``; a compressed payload inside a compressed one is ``nested_compression``.
All are dead letters: never a reading made of the wrapper.

**Bounds**: at most ``max_edge_nodes`` edge nodes are tracked per source (a birth from one more
is ``too_many_edge_nodes``; data from an unknown node beyond the bound is dead-lettered
without tracking it), and rebirth requests leave at most ``rebirth_max_per_s`` a second (a
burst of ten times that), so a flood of unknown nodes grows neither state nor NCMDs; the
suppressed requests are one ``rebirth_suppressed`` notice per commit group, with their count.

The alias tables are the decoder's state: ``take_state`` hands the changed nodes to the intake,
which commits them with the messages that changed them; ``restore`` reloads them at start.
Without that, a restart would dead-letter every DATA message until each node was reborn.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.message import DecodeError as ProtobufDecodeError

from bridge.edge.codecs._base import Decoded, DecodedValue, Publish, Scalar
from bridge.shared import defaults as D
from bridge.shared._pb import sparkplug_b_pb2 as sp
from bridge.shared.errors import DecodeError
from bridge.shared.pacing import TokenBucket

NAMESPACE = "spBv1.0"
NODE_TYPES = {"NBIRTH", "NDEATH", "NDATA", "NCMD"}
DEVICE_TYPES = {"DBIRTH", "DDEATH", "DDATA", "DCMD"}
REBIRTH_METRIC = "Node Control/Rebirth"
COMPRESSED_UUID = "SPBV1.0_COMPRESSED"
_ZLIB_WBITS = {"GZIP": (16 + zlib.MAX_WBITS,), "DEFLATE": (zlib.MAX_WBITS, -zlib.MAX_WBITS)}
_MAX_NS_MS = (2**63 - 1) // 1_000_000
_I64 = 2**63
_SIGNED: dict[int, int] = {sp.Int8: 8, sp.Int16: 16, sp.Int32: 32, sp.Int64: 64}
_UNSIGNED: dict[int, int] = {sp.UInt8: 8, sp.UInt16: 16, sp.UInt32: 32, sp.UInt64: 64}
_INT_FIELDS = {"int_value", "long_value"}
_FLOAT_FIELDS = {"float_value", "double_value"}
_STRINGS = {sp.String, sp.Text, sp.UUID}

Notice = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class _MetricTable:
    """One birth certificate: alias -> (name, datatype), and name -> datatype."""

    by_alias: dict[int, tuple[str, int]] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)

    def learn(self, metrics: Any) -> None:
        for m in metrics:
            if not m.name:
                continue
            dtype = m.datatype if m.HasField("datatype") else sp.Unknown
            self.types[m.name] = dtype
            if m.HasField("alias"):
                self.by_alias[m.alias] = (m.name, dtype)

    def dump(self) -> list[list[Any]]:
        aliased = {name: alias for alias, (name, _) in self.by_alias.items()}
        return [[name, aliased.get(name), dtype] for name, dtype in self.types.items()]

    @classmethod
    def load(cls, rows: list[list[Any]]) -> _MetricTable:
        t = cls()
        for name, alias, dtype in rows:
            t.types[name] = dtype
            if alias is not None:
                t.by_alias[alias] = (name, dtype)
        return t


@dataclass(slots=True)
class _Node:
    bd_seq: int | None = None
    online: bool = False
    table: _MetricTable = field(default_factory=_MetricTable)
    devices: dict[str, _MetricTable] = field(default_factory=dict)  # born devices only
    last_seq: int | None = None  # not persisted: after a restart the next seq is accepted
    last_rebirth: float = float("-inf")

    def dump(self) -> bytes:
        return orjson.dumps({"bd": self.bd_seq, "online": self.online, "m": self.table.dump(),
                             "d": {k: v.dump() for k, v in self.devices.items()}})

    @classmethod
    def load(cls, blob: bytes) -> _Node:
        doc = orjson.loads(blob)
        return cls(bd_seq=doc["bd"], online=doc["online"], table=_MetricTable.load(doc["m"]),
                   devices={k: _MetricTable.load(v) for k, v in doc["d"].items()})


def _float32(v: float) -> float:
    """The shortest decimal that is the same float32: 0.1f arrives as 0.10000000149011612."""
    for digits in (6, 7, 8, 9):
        short = float(f"{v:.{digits}g}")
        if struct.unpack("f", struct.pack("f", short))[0] == v:
            return short
    return v


def _value(m: Any, dtype: int, name: str) -> tuple[Scalar | None, str] | None:
    """(value, unit) of a metric, or None when its type is not a scalar we type."""
    if m.is_null:
        return None, ""
    kind = m.WhichOneof("value")
    if kind is None:
        return None, ""
    v = getattr(m, kind)
    if dtype in _SIGNED or dtype in _UNSIGNED:
        if kind not in _INT_FIELDS:
            raise DecodeError("type_mismatch", f"metric {name!r}: integer type with {kind}")
        if dtype in _SIGNED:
            bits = _SIGNED[dtype]
            v &= (1 << bits) - 1
            return (v - (1 << bits) if v >> (bits - 1) else v), ""
        if v >> _UNSIGNED[dtype]:
            raise DecodeError("bad_value", f"metric {name!r}: {v} out of range for "
                              f"{sp.DataType.Name(dtype)}")  # type: ignore[arg-type]
        if v >= _I64:  # the envelope's integer is sint64: refused by name, never wrapped
            raise DecodeError("bad_value", f"metric {name!r}: UInt64 {v} is above the "
                              "envelope's int64 range")
        return v, ""
    if dtype in (sp.Float, sp.Double):
        if kind not in _FLOAT_FIELDS:
            raise DecodeError("type_mismatch", f"metric {name!r}: float type with {kind}")
        return (_float32(v) if kind == "float_value" else v), ""
    if dtype == sp.Boolean:
        if kind != "boolean_value":
            raise DecodeError("type_mismatch", f"metric {name!r}: Boolean with {kind}")
        return v, ""
    if dtype in _STRINGS:
        if kind != "string_value":
            raise DecodeError("type_mismatch", f"metric {name!r}: string type with {kind}")
        return v, ""
    if dtype == sp.DateTime:
        if kind not in _INT_FIELDS:
            raise DecodeError("type_mismatch", f"metric {name!r}: DateTime with {kind}")
        if v >= _I64:
            raise DecodeError("bad_timestamp", f"metric {name!r}: DateTime {v} ms is out of "
                              "range")
        return v, "unix_ms"
    return None


def _ms_to_ns(ms: int, metric: str | None = None) -> int:
    """``ms`` in ns; the message names ``metric`` (the payload's own timestamp when None),
    built only when it is raised: this runs for every metric."""
    if ms > _MAX_NS_MS:
        what = "payload timestamp" if metric is None else f"metric {metric!r} timestamp"
        raise DecodeError("bad_timestamp", f"{what} {ms} ms is out of range")
    return ms * 1_000_000


def _inflate(body: bytes, algorithm: str, limit: int) -> bytes:
    """``body`` decompressed, at most ``limit`` bytes (``DecodeError`` otherwise)."""
    tries = _ZLIB_WBITS.get(algorithm.upper())
    if tries is None:
        raise DecodeError("unknown_compression", f"compression algorithm {algorithm[:40]!r} "
                          "is not GZIP or DEFLATE")
    err = ""
    for wbits in tries:
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(body, limit)
        except zlib.error as exc:
            err = str(exc)
            continue
        if d.unconsumed_tail:
            raise DecodeError("decompression_bomb", f"{algorithm} body inflates past "
                              f"max_decompressed_bytes={limit}")
        if not d.eof:
            err = "truncated stream"
            continue
        return out
    raise DecodeError("bad_compression", f"{algorithm} body does not inflate: {err}")


def _unwrap(msg: Any, limit: int) -> Any:
    """The inner payload of a Tahu-compressed payload; ``msg`` itself when not compressed."""
    if msg.uuid != COMPRESSED_UUID:
        return msg
    algorithm = "DEFLATE"  # Tahu's default when the metric is missing
    for m in msg.metrics:
        if m.name == "algorithm":
            if m.WhichOneof("value") != "string_value":
                raise DecodeError("unknown_compression", "the 'algorithm' metric is not a "
                                  "string")
            algorithm = m.string_value
    raw = _inflate(msg.body, algorithm, limit)
    try:
        inner = sp.Payload.FromString(raw)
    except (ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError("invalid_protobuf", f"the decompressed body is not a Sparkplug B "
                          f"payload: {exc}") from exc
    if inner.uuid == COMPRESSED_UUID:
        raise DecodeError("nested_compression", "a compressed payload inside a compressed one")
    return inner


def _bd_seq(payload: Any) -> int | None:
    for m in payload.metrics:
        if m.name == "bdSeq":
            kind = m.WhichOneof("value")
            if kind in _INT_FIELDS:
                return int(getattr(m, kind))
    return None


class SparkplugDecoder:
    codec = "sparkplug"

    def __init__(self, *, rebirth: bool = True, rebirth_on_gap: bool = True,
                 rebirth_interval_s: float = D.REBIRTH_INTERVAL_S, notice: Notice | None = None,
                 max_decompressed_bytes: int = D.MAX_DECOMPRESSED_BYTES,
                 max_edge_nodes: int = D.MAX_EDGE_NODES,
                 rebirth_max_per_s: float = D.REBIRTH_MAX_PER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_decompressed_bytes = max_decompressed_bytes
        self.max_edge_nodes = max_edge_nodes
        self._rebirths = TokenBucket(rate=rebirth_max_per_s,
                                     burst=max(1.0, 10 * rebirth_max_per_s), clock=clock) \
            if rebirth_max_per_s > 0 else None
        self.rebirth = rebirth
        self.rebirth_on_gap = rebirth_on_gap
        self.rebirth_interval_s = rebirth_interval_s
        self._notice = notice or (lambda kind, fields: None)
        self._clock = clock
        self.nodes: dict[tuple[str, str], _Node] = {}
        self._changed: set[tuple[str, str]] = set()
        self._requests: list[Publish] = []
        self._suppressed: Counter[str] = Counter()  # rebirth requests not sent, by reason

    # -- state and requests (see bridge.edge.codecs._base.Decoder) --------------------------

    def take_state(self) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {
            f"{g}/{n}": self.nodes[(g, n)].dump() for g, n in sorted(self._changed)}
        self._changed.clear()
        return out

    def restore(self, state: dict[str, bytes]) -> None:
        for key, blob in state.items():
            group, _, node = key.partition("/")
            try:
                self.nodes[(group, node)] = _Node.load(blob)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                # A birth we cannot read is a birth we do not have: the next DATA asks again.
                self._notice("state_unreadable", {"node": key, "detail": str(exc)[:200]})

    def take_requests(self) -> list[Publish]:
        """Rebirth requests to send; suppressed ones are reported here, once per commit
        group with their count (a flood must not log once per message)."""
        for reason, n in sorted(self._suppressed.items()):
            self._notice("rebirth_suppressed", {"reason": reason, "count": n})
        self._suppressed.clear()
        out, self._requests = self._requests, []
        return out

    def stamped(self, topic: str, payload: bytes) -> bool:
        try:
            msg = _unwrap(sp.Payload.FromString(payload), self.max_decompressed_bytes)
        except (ProtobufDecodeError, RuntimeError, ValueError, DecodeError):
            return False
        return bool(msg.HasField("seq") and msg.HasField("timestamp"))

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, topic: str, payload: bytes) -> Decoded:
        parts = topic.split("/")
        if len(parts) >= 3 and parts[0] == NAMESPACE and parts[1] == "STATE":
            return Decoded(skip="host_state")
        if len(parts) not in (4, 5) or parts[0] != NAMESPACE or not all(parts[1:]):
            raise DecodeError("bad_topic", f"not a Sparkplug B topic: {topic[:200]!r}")
        _, group, mtype, node_id = parts[:4]
        device = parts[4] if len(parts) == 5 else None
        if (mtype not in NODE_TYPES or device is not None) and (
                mtype not in DEVICE_TYPES or device is None):
            raise DecodeError("bad_topic", f"unknown Sparkplug message type {mtype[:40]!r} "
                              f"for this topic level count: {topic[:200]!r}")
        try:
            msg = sp.Payload.FromString(payload)
        except (ProtobufDecodeError, RuntimeError, ValueError) as exc:
            raise DecodeError("invalid_protobuf", f"not a Sparkplug B payload: {exc}") from exc
        msg = _unwrap(msg, self.max_decompressed_bytes)
        labels = {"group": group, "edge_node": node_id, "message_type": mtype}
        if device is not None:
            labels["device"] = device
        key = (group, node_id)
        node = self.nodes.get(key)
        seq = msg.seq if msg.HasField("seq") else None
        if seq is not None and seq > 255:
            raise DecodeError("bad_seq", f"seq {seq} is outside 0..255")

        if mtype == "NBIRTH":
            if node is None and len(self.nodes) >= self.max_edge_nodes:
                raise DecodeError("too_many_edge_nodes", f"birth of {group}/{node_id}: this "
                                  f"source already tracks max_edge_nodes={self.max_edge_nodes}")
            node = self.nodes[key] = _Node(bd_seq=_bd_seq(msg), online=True)
            node.table.learn(msg.metrics)
            node.last_seq = seq
            self._changed.add(key)
            table = node.table
        elif mtype == "NDEATH":
            bd = _bd_seq(msg)
            if node is None or not node.online:
                return self._decoded(msg, labels, [], None)
            if node.bd_seq is not None and bd is not None and bd != node.bd_seq:
                self._notice("stale_death", {"topic": topic, "bd_seq": bd,
                                             "current_bd_seq": node.bd_seq})
                return Decoded(skip="stale_death")
            node.online = False
            node.devices.clear()
            node.last_seq = None
            self._changed.add(key)
            return self._decoded(msg, labels, [], None)
        elif mtype in ("NCMD", "DCMD"):
            table = _MetricTable()  # commands name their metrics; typed by their own datatype
        else:
            if node is None or not node.online:
                self._request_rebirth(group, node_id, node, "data_before_birth")
                raise DecodeError("data_before_birth", f"{mtype} from edge node "
                                  f"{group}/{node_id}, which has not sent an NBIRTH")
            self._check_seq(topic, group, node_id, node, seq)
            if mtype == "DBIRTH":
                assert device is not None
                table = node.devices[device] = _MetricTable()
                table.learn(msg.metrics)
                self._changed.add(key)
            elif mtype == "DDEATH":
                assert device is not None
                if node.devices.pop(device, None) is not None:
                    self._changed.add(key)
                return self._decoded(msg, labels, [], None)
            elif mtype == "NDATA":
                table = node.table
            else:  # DDATA
                assert device is not None
                dev = node.devices.get(device)
                if dev is None:
                    self._request_rebirth(group, node_id, node, "data_before_birth")
                    raise DecodeError("data_before_birth", f"DDATA from device {device!r} of "
                                      f"{group}/{node_id}, which has not sent a DBIRTH")
                table = dev
        return self._decoded(msg, labels, self._metrics(msg, table, group, node_id, node), seq,
                             payload=payload)

    def _metrics(self, msg: Any, table: _MetricTable, group: str, node_id: str,
                 node: _Node | None) -> list[tuple[Any, str, int]]:
        out = []
        for m in msg.metrics:
            if m.name:
                name = m.name
                dtype = m.datatype if m.HasField("datatype") else table.types.get(name)
            elif m.HasField("alias"):
                known = table.by_alias.get(m.alias)
                if known is None:
                    self._request_rebirth(group, node_id, node, "unknown_alias")
                    raise DecodeError("unknown_alias", f"alias {m.alias} was not declared by "
                                      f"the birth of {group}/{node_id}")
                name, dtype = known
                if m.HasField("datatype"):
                    dtype = m.datatype
            else:
                raise DecodeError("bad_metric", "a metric has neither a name nor an alias")
            if dtype is None:
                raise DecodeError("unknown_datatype", f"metric {name!r} has no datatype and "
                                  "no birth declared one")
            out.append((m, name, dtype))
        return out

    def _decoded(self, msg: Any, labels: dict[str, str], metrics: list[tuple[Any, str, int]],
                 seq: int | None, payload: bytes = b"") -> Decoded:
        values: list[DecodedValue] = []
        unsupported: list[str] = []
        for m, name, dtype in metrics:
            typed = _value(m, dtype, name)
            if typed is None:
                unsupported.append(name)
                continue
            value, unit = typed
            values.append(DecodedValue(
                signal=name, value=value, unit=unit, historical=m.is_historical,
                source_time_ns=_ms_to_ns(m.timestamp, name) if m.HasField("timestamp")
                else None))
        out = Decoded(values=values, labels=labels, source_seq=seq,
                      source_time_ns=_ms_to_ns(msg.timestamp)
                      if msg.HasField("timestamp") else None)
        if unsupported:
            out.raw = payload
            shown = ",".join(unsupported[:20])
            out.labels["unsupported"] = shown + (",..." if len(unsupported) > 20 else "")
        return out

    def _check_seq(self, topic: str, group: str, node_id: str, node: _Node,
                   seq: int | None) -> None:
        if seq is None:
            return
        if node.last_seq is not None and seq != (node.last_seq + 1) % 256:
            self._notice("seq_gap", {"topic": topic, "expected": (node.last_seq + 1) % 256,
                                     "got": seq})
            if self.rebirth_on_gap:
                self._request_rebirth(group, node_id, node, "seq_gap")
        node.last_seq = seq

    def _request_rebirth(self, group: str, node_id: str, node: _Node | None,
                         reason: str) -> None:
        if not self.rebirth:
            return
        now = self._clock()
        if node is None:
            if len(self.nodes) >= self.max_edge_nodes:
                self._suppressed["max_edge_nodes"] += 1
                return
            node = self.nodes[(group, node_id)] = _Node()
        if now - node.last_rebirth < self.rebirth_interval_s:
            return
        if self._rebirths is not None and self._rebirths.take(1) > 0:
            self._suppressed["rebirth_max_per_s"] += 1
            return
        node.last_rebirth = now
        cmd = sp.Payload(timestamp=time.time_ns() // 1_000_000)
        cmd.metrics.add(name=REBIRTH_METRIC, datatype=sp.Boolean, boolean_value=True)
        self._requests.append(Publish(topic=f"{NAMESPACE}/{group}/NCMD/{node_id}",
                                      payload=cmd.SerializeToString()))
        self._notice("rebirth_requested", {"group": group, "edge_node": node_id,
                                           "reason": reason})
