"""The ``json`` codec: the default shape of a JSON reading.

Accepted payloads (documented with examples in docs/payloads.md):

* an object with ``value``: one value; ``signal`` (or ``name``) defaults to the topic's last
  level; optional ``unit``, ``quality`` (``good``/``uncertain``/``bad``), ``ts`` (or
  ``timestamp``) and ``seq`` (the publisher's sequence number);
* an object with ``values``: a list of such objects sharing the outer ``ts`` and ``seq``;
* a bare number, boolean or string: one value named after the topic's last level.

Timestamps are epoch numbers (seconds, milliseconds, microseconds or nanoseconds, told apart
by magnitude) or RFC 3339 strings.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import orjson

from bridge.edge.codecs._base import Decoded, DecodedValue
from bridge.shared.errors import DecodeError

QUALITY = {"good": 1, "uncertain": 2, "bad": 3, "GOOD": 1, "UNCERTAIN": 2, "BAD": 3}
_MAX_VALUES = 10_000
_I64 = 2**63


def parse_timestamp(value: Any) -> int:
    """Epoch seconds/ms/µs/ns (by magnitude) or RFC 3339, to Unix nanoseconds."""
    if isinstance(value, bool):
        raise DecodeError("bad_timestamp", f"timestamp must be a number or string, got {value!r}")
    if isinstance(value, int | float):
        v = abs(value)
        if math.isnan(v) or math.isinf(v):
            raise DecodeError("bad_timestamp", f"timestamp {value!r} is not finite")
        factor = 10**9 if v < 1e11 else 10**6 if v < 1e14 else 10**3 if v < 1e17 else 1
        # Integers stay exact; a float carries only its own precision.
        out = value * factor if isinstance(value, int) else round(value * factor)
        if not -_I64 <= out < _I64:
            raise DecodeError("bad_timestamp", f"timestamp {value!r} out of range")
        return out
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise DecodeError("bad_timestamp", f"not an RFC 3339 time: {value[:64]!r}") from exc
        if parsed.tzinfo is None:
            raise DecodeError("bad_timestamp", f"timestamp {value[:64]!r} has no UTC offset")
        try:
            delta = parsed - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        except OverflowError as exc:  # year 1 with a positive offset
            raise DecodeError("bad_timestamp", f"timestamp {value[:64]!r} out of range") from exc
        ns = (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
        if not -_I64 <= ns < _I64:  # int64 nanoseconds span 1677-09-21 .. 2262-04-11
            raise DecodeError("bad_timestamp", f"timestamp {value[:64]!r} is outside what "
                              "int64 nanoseconds can hold (1677..2262)")
        return ns
    raise DecodeError("bad_timestamp", f"timestamp must be a number or string, got "
                      f"{type(value).__name__}")


def scalar(value: Any, where: str) -> float | int | bool | str:
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not -_I64 <= value < _I64:
            raise DecodeError("bad_value", f"{where}: integer out of 64-bit range")
        return value
    if isinstance(value, float):
        return value
    raise DecodeError("bad_value", f"{where}: value must be a number, boolean or string, got "
                      f"{type(value).__name__}")


def _value(obj: dict[str, Any], default_signal: str, where: str) -> DecodedValue:
    if "value" not in obj:
        raise DecodeError("missing_value", f"{where}: no 'value' key")
    signal = obj.get("signal", obj.get("name", default_signal))
    if not isinstance(signal, str) or not signal:
        raise DecodeError("bad_signal", f"{where}: signal must be a non-empty string")
    unit = obj.get("unit", "")
    if not isinstance(unit, str):
        raise DecodeError("bad_unit", f"{where}: unit must be a string")
    quality = obj.get("quality")
    if quality is None:
        q = 0
    elif isinstance(quality, str) and quality in QUALITY:
        q = QUALITY[quality]
    else:
        raise DecodeError("bad_quality", f"{where}: quality must be good, uncertain or bad")
    ts = obj.get("ts", obj.get("timestamp"))
    return DecodedValue(signal=signal, value=scalar(obj["value"], where), unit=unit, quality=q,
                        source_time_ns=None if ts is None else parse_timestamp(ts))


def _seq(obj: dict[str, Any]) -> int | None:
    seq = obj.get("seq")
    if seq is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**64:
        raise DecodeError("bad_seq", "seq must be an unsigned 64-bit integer")
    return seq


def load_json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        reason = "invalid_utf8" if "utf-8" in str(exc).lower() else "invalid_json"
        raise DecodeError(reason, str(exc)[:200]) from exc


def decode_json(topic: str, payload: bytes) -> Decoded:
    doc = load_json(payload)
    default_signal = topic.rsplit("/", 1)[-1] or topic
    if isinstance(doc, dict):
        seq = _seq(doc)
        if "values" in doc:
            items = doc["values"]
            if not isinstance(items, list) or not items:
                raise DecodeError("bad_values", "'values' must be a non-empty list")
            if len(items) > _MAX_VALUES:
                raise DecodeError("too_many_values", f"{len(items)} values > {_MAX_VALUES}")
            outer_ts = doc.get("ts", doc.get("timestamp"))
            values = []
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise DecodeError("bad_values", f"values[{i}] must be an object")
                values.append(_value(item, default_signal, f"values[{i}]"))
            return Decoded(values=values, source_seq=seq,
                           source_time_ns=None if outer_ts is None else parse_timestamp(outer_ts))
        v = _value(doc, default_signal, "payload")
        ts, v.source_time_ns = v.source_time_ns, None
        return Decoded(values=[v], source_seq=seq, source_time_ns=ts)
    if isinstance(doc, bool | int | float | str):
        return Decoded(values=[DecodedValue(signal=default_signal,
                                            value=scalar(doc, "payload"))])
    raise DecodeError("bad_shape", f"expected an object or a scalar, got {type(doc).__name__}")
