"""JSON mappings: site-specific JSON shapes to readings, from config alone (no glue code).

A mapping pairs a topic pattern with field paths::

    topic = "plant/{asset}/{signal}"      # {name}: one level, captured; +: one level; #: the rest
    items = "readings"                    # optional: the array holding one reading per element
    value = "v"                           # required
    signal = "tag"                        # optional; else the {signal} capture, else last level
    timestamp = "$.ts"                    # optional; "$." starts at the message root
    timestamp_format = "auto"             # auto, s, ms, us, ns or rfc3339
    unit = "eu"                           # optional
    quality = "q"                         # optional: good/uncertain/bad, a boolean, or a code
    quality_codes = "opc_da"              # how integer qualities read: opc_da or opc_ua
    seq = "$.n"                           # optional: the publisher's sequence number

Paths are dot-separated keys with ``[i]`` indexes (``data.points[0].v``), relative to the item
(or to the message when there is no ``items``); ``$`` alone is the item itself. Every capture
but ``signal`` becomes a label of the envelope. The first mapping whose topic matches decodes
the message; a topic no mapping matches goes to the source's codec. Documented with worked
examples in docs/payloads.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.edge.codecs._base import Decoded, DecodedValue, Scalar
from bridge.edge.codecs.json import QUALITY, load_json, parse_timestamp, scalar
from bridge.shared.errors import DecodeError, MappingError

TIMESTAMP_FORMATS = ("auto", "s", "ms", "us", "ns", "rfc3339")
QUALITY_CODES = ("opc_da", "opc_ua")
_FACTOR = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
_MAX_ITEMS = 10_000
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]|(\.)")
_I64 = 2**63

Path = tuple[str | int, ...]


def compile_path(text: str, field: str) -> tuple[bool, Path]:
    """``"$.a.b[2]"`` -> (from_root, ("a", "b", 2))."""
    from_root = text == "$" or text.startswith("$.")
    rest = text[2:] if text.startswith("$.") else "" if text == "$" else text
    steps: list[str | int] = []
    pos = 0
    expect_key = True
    while pos < len(rest):
        m = _STEP.match(rest, pos)
        if m is None or (m.group(3) and expect_key):
            raise MappingError(f"{field}: cannot read path {text!r} at character {pos + 1}")
        if m.group(1) is not None:
            if not expect_key:
                raise MappingError(f"{field}: path {text!r} needs a '.' before {m.group(1)!r}")
            steps.append(m.group(1))
            expect_key = False
        elif m.group(2) is not None:
            steps.append(int(m.group(2)))
            expect_key = False
        else:
            expect_key = True
        pos = m.end()
    if expect_key and rest:
        raise MappingError(f"{field}: path {text!r} ends with '.'")
    if not rest and text != "$":
        raise MappingError(f"{field}: empty path")
    return from_root, tuple(steps)


def compile_topic(pattern: str, separator: str, field: str) -> re.Pattern[str]:
    levels = pattern.split(separator)
    parts: list[str] = []
    names: set[str] = set()
    one = f"[^{re.escape(separator)}]+"
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise MappingError(f"{field}: '#' must be the last level of {pattern!r}")
            parts.append(".*")
        elif level == "+":
            parts.append(one)
        elif (m := re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", level)) is not None:
            if m.group(1) in names:
                raise MappingError(f"{field}: capture {{{m.group(1)}}} appears twice")
            names.add(m.group(1))
            parts.append(f"(?P<{m.group(1)}>{one})")
        elif "{" in level or "}" in level or "+" in level or "#" in level:
            raise MappingError(f"{field}: level {level!r} of {pattern!r} mixes text and a "
                               "wildcard; a level is text, {name}, + or #")
        else:
            parts.append(re.escape(level))
    if pattern.endswith(separator + "#"):  # "a/#" also matches "a", as in MQTT
        return re.compile(re.escape(separator).join(parts[:-1]) + f"(?:{re.escape(separator)}.*)?")
    return re.compile(re.escape(separator).join(parts))


def _get(doc: Any, path: Path) -> Any:
    for step in path:
        if isinstance(step, int):
            if not isinstance(doc, list) or step >= len(doc):
                raise KeyError(step)
        elif not isinstance(doc, dict) or step not in doc:
            raise KeyError(step)
        doc = doc[step]
    return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class _Field:
    text: str
    from_root: bool
    path: Path

    def get(self, root: Any, item: Any) -> Any:
        return _get(root if self.from_root else item, self.path)


def _field(text: str | None, name: str) -> _Field | None:
    if text is None:
        return None
    from_root, path = compile_path(text, name)
    return _Field(text=text, from_root=from_root, path=path)


class JsonMapping:
    def __init__(self, *, topic: str, value: str, separator: str = "/", where: str = "mapping",
                 items: str | None = None, signal: str | None = None,
                 timestamp: str | None = None, timestamp_format: str = "auto",
                 unit: str | None = None, quality: str | None = None,
                 quality_codes: str = "opc_da", seq: str | None = None) -> None:
        self.pattern = topic
        self.separator = separator
        self.topic = compile_topic(topic, separator, f"{where}.topic")
        if timestamp_format not in TIMESTAMP_FORMATS:
            raise MappingError(f"{where}.timestamp_format: {timestamp_format!r} is not one of "
                               f"{', '.join(TIMESTAMP_FORMATS)}")
        if quality_codes not in QUALITY_CODES:
            raise MappingError(f"{where}.quality_codes: {quality_codes!r} is not one of "
                               f"{', '.join(QUALITY_CODES)}")
        self.items = _field(items, f"{where}.items")
        value_field = _field(value, f"{where}.value")
        assert value_field is not None
        self.value = value_field
        self.signal = _field(signal, f"{where}.signal")
        self.timestamp = _field(timestamp, f"{where}.timestamp")
        self.timestamp_format = timestamp_format
        self.unit = _field(unit, f"{where}.unit")
        self.quality = _field(quality, f"{where}.quality")
        self.quality_codes = quality_codes
        self.seq = _field(seq, f"{where}.seq")

    def _where(self, what: _Field) -> str:
        return f"mapping {self.pattern!r}: {what.text!r}"

    def decode(self, captures: dict[str, str], topic: str, root: Any) -> Decoded:
        labels = {k: v for k, v in captures.items() if k != "signal"}
        default_signal = captures.get("signal") or topic.rsplit(self.separator, 1)[-1] or topic
        if self.items is not None:
            try:
                items = self.items.get(root, root)
            except KeyError as exc:
                raise DecodeError("missing_items", f"{self._where(self.items)} not found") \
                    from exc
            if not isinstance(items, list):
                raise DecodeError("bad_items", f"{self._where(self.items)} is not an array")
            if len(items) > _MAX_ITEMS:
                raise DecodeError("too_many_values", f"{len(items)} items > {_MAX_ITEMS}")
        else:
            items = [root]
        values = [self._reading(root, item, default_signal, i) for i, item in enumerate(items)]
        seq = None
        if self.seq is not None:
            raw = self._optional(self.seq, root, root)
            if raw is not None:
                if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 2**64:
                    raise DecodeError("bad_seq", f"{self._where(self.seq)} must be an unsigned "
                                      "64-bit integer")
                seq = raw
        return Decoded(values=values, labels=labels, source_seq=seq)

    def _optional(self, f: _Field, root: Any, item: Any) -> Any:
        try:
            return f.get(root, item)
        except KeyError:
            return None

    def _reading(self, root: Any, item: Any, default_signal: str, i: int) -> DecodedValue:
        where = f"item {i}" if self.items is not None else "payload"
        try:
            raw_value = self.value.get(root, item)
        except KeyError as exc:
            raise DecodeError("missing_value", f"{where}: {self._where(self.value)} not found") \
                from exc
        value: Scalar | None = None if raw_value is None else scalar(raw_value, where)
        signal = default_signal
        if self.signal is not None:
            s = self._optional(self.signal, root, item)
            if not isinstance(s, str) or not s:
                raise DecodeError("bad_signal", f"{where}: {self._where(self.signal)} must be a "
                                  "non-empty string")
            signal = s
        unit = ""
        if self.unit is not None:
            u = self._optional(self.unit, root, item)
            if u is not None and not isinstance(u, str):
                raise DecodeError("bad_unit", f"{where}: {self._where(self.unit)} must be a string")
            unit = u or ""
        quality = 0
        if self.quality is not None:
            q = self._optional(self.quality, root, item)
            if q is not None:
                quality = self._quality(q, where)
        ts = None
        if self.timestamp is not None:
            t = self._optional(self.timestamp, root, item)
            if t is not None:
                ts = self._time(t, where)
        return DecodedValue(signal=signal, value=value, unit=unit, quality=quality,
                            source_time_ns=ts)

    def _quality(self, q: Any, where: str) -> int:
        if isinstance(q, bool):
            return 1 if q else 3
        if isinstance(q, str) and q.lower() in QUALITY:
            return QUALITY[q.lower()]
        if isinstance(q, int) and 0 <= q < 2**32:
            if self.quality_codes == "opc_ua":  # StatusCode: the top two bits
                return {0: 1, 1: 2}.get(q >> 30, 3)
            if q <= 0xFF:  # OPC DA quality: the top two of eight bits, 11 good, 01 uncertain
                return {3: 1, 1: 2}.get(q >> 6, 3)
        raise DecodeError("bad_quality", f"{where}: quality {str(q)[:40]!r} is not good/"
                          f"uncertain/bad, a boolean or an {self.quality_codes} code")

    def _time(self, t: Any, where: str) -> int:
        fmt = self.timestamp_format
        if fmt == "auto":
            return parse_timestamp(t)
        if fmt == "rfc3339":
            if not isinstance(t, str):
                raise DecodeError("bad_timestamp", f"{where}: timestamp must be an RFC 3339 "
                                  "string")
            return parse_timestamp(t)
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise DecodeError("bad_timestamp", f"{where}: timestamp must be a number of {fmt}")
        ns = t * _FACTOR[fmt]
        if math.isnan(ns) or not -_I64 <= ns < _I64:  # NaN, inf, out of range
            raise DecodeError("bad_timestamp", f"{where}: timestamp {t!r} {fmt} out of range")
        return ns if isinstance(ns, int) else round(ns)


class MappedJson:
    """The mappings of one source, falling back to its codec for topics none matches."""

    def __init__(self, *, mappings: list[JsonMapping],
                 fallback: Callable[[str, bytes], Decoded]) -> None:
        self.mappings = mappings
        self.fallback = fallback

    def decode(self, topic: str, payload: bytes) -> Decoded:
        for mapping in self.mappings:
            m = mapping.topic.fullmatch(topic)
            if m is None:
                continue
            return mapping.decode(m.groupdict(), topic, load_json(payload))
        return self.fallback(topic, payload)
