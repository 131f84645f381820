"""docs/configuration.md's tables agree with the schemas (bridge/shared/config/schema.py): every key
of a schema is documented in its section, every documented key is in the schema, and the
documented defaults are the schema's."""

from __future__ import annotations

import enum
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bridge.shared.config import schema

DOCS = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
SECTIONS = {"agent": ("## Agent", schema.AgentFile), "ingest": ("## Ingest node",
                                                                schema.IngestFile),
            "consumer": ("## Consumer", schema.ConsumerFile)}
Keys = dict[str, list[Any]]  # key -> its defaults (MQTT and AMQP sources share key names)
# How the type column names each schema type.
WORDS: dict[Any, tuple[str, ...]] = {int: ("integer",), float: ("number",), bool: ("boolean",),
                                     str: ("string", "path", "HOST", "`", "filter", "subject"),
                                     list: ("list", "array")}


def _structs(t: Any) -> list[type[msgspec.Struct]]:
    return [u for u in schema._unwrap(t)
            if isinstance(u, type) and issubclass(u, msgspec.Struct)]


def _keys(struct: type[msgspec.Struct], prefix: str = "") -> Keys:
    out: Keys = {}
    for f in msgspec.structs.fields(struct):
        key = f"{prefix}{f.encode_name}"
        nested = _structs(f.type)
        if nested:
            is_list = typing.get_origin(f.type) is list
            if is_list:  # an array of tables is documented itself, then its keys
                out.setdefault(key, []).append([])
            for sub in nested:
                for k, v in _keys(sub, f"{key}[]." if is_list else f"{key}.").items():
                    out.setdefault(k, []).extend(v)
            if any(issubclass(s, schema.MqttSourceFile | schema.AmqpSourceFile)
                   for s in nested):
                out.setdefault(f"{key}[].type", []).append("mqtt")
            continue
        default = None if f.default is msgspec.NODEFAULT else f.default
        if f.default_factory is not msgspec.NODEFAULT:
            default = f.default_factory()
        out.setdefault(key, []).append(default)
    return out


def _types(struct: type[msgspec.Struct], prefix: str = "") -> dict[str, set[Any]]:
    """key -> the base types a value may have (lists as ``list``, choices as ``str``)."""
    out: dict[str, set[Any]] = {}
    for f in msgspec.structs.fields(struct):
        key = f"{prefix}{f.encode_name}"
        nested = _structs(f.type)
        if nested:
            sep = "[]." if typing.get_origin(f.type) is list else "."
            for sub in nested:
                for k, v in _types(sub, f"{key}{sep}").items():
                    out.setdefault(k, set()).update(v)
            continue
        kinds = {list if typing.get_origin(t) is list else
                 str if typing.get_origin(t) is typing.Literal
                 or (isinstance(t, type) and issubclass(t, enum.Enum)) else t
                 for t in schema._unwrap(f.type) if t is not type(None)}
        if typing.get_origin(f.type) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(f.type)):
            kinds = {list}
        out.setdefault(key, set()).update(kinds)
    return out


def _type_column() -> dict[str, dict[str, list[str]]]:
    return _column(1)


@pytest.mark.parametrize("section", SECTIONS)
def test_documented_types_are_the_schemas_types(section: str) -> None:
    columns = _type_column()[section]
    wrong = []
    for key, kinds in _types(SECTIONS[section][1]).items():
        for kind in kinds:
            words = WORDS[kind]
            if key in columns and not any(w in c for c in columns[key] for w in words):
                wrong.append((key, kind.__name__, columns[key]))
    assert not wrong, f"{section}: docs type != schema type: {wrong}"


def _column(index: int) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> the texts of column ``index`` of its rows (MQTT and AMQP sources
    share key names, so a key may have several rows)."""
    text = DOCS.read_text()
    starts = sorted((text.index(h), name) for name, (h, _) in SECTIONS.items())
    out: dict[str, dict[str, list[str]]] = {}
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        rows: dict[str, list[str]] = {}
        for line in text[start:end].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 4 and cells[0].startswith("`"):
                for key in re.findall(r"`([^`]+)`", cells[0]):
                    rows.setdefault(key, []).append(cells[index])
        out[name] = rows
    return out


def _documented() -> dict[str, dict[str, list[str]]]:
    """Section -> key -> the texts of its default column."""
    return _column(2)


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_of_the_schema_is_documented(section: str) -> None:
    missing = sorted(set(_keys(SECTIONS[section][1])) - set(_documented()[section]))
    assert not missing, f"{section}: in the schema but not in docs/configuration.md: {missing}"


@pytest.mark.parametrize("section", SECTIONS)
def test_every_documented_key_is_in_the_schema(section: str) -> None:
    stale = sorted(set(_documented()[section]) - set(_keys(SECTIONS[section][1])))
    assert not stale, f"{section}: documented but not in the schema: {stale}"


def _literal(token: str) -> Any:
    try:
        return tomllib.loads(f"v = {token}")["v"]
    except tomllib.TOMLDecodeError:
        return token.strip('"')  # a bare word such as info or opc_da


def _same(doc: Any, default: Any) -> bool:
    if isinstance(default, float) and not isinstance(doc, bool):
        return isinstance(doc, (int, float)) and float(doc) == default
    return bool(doc == default)


@pytest.mark.parametrize("section", SECTIONS)
def test_documented_defaults_are_the_schemas_defaults(section: str) -> None:
    documented = _documented()[section]
    wrong = []
    for key, defaults in _keys(SECTIONS[section][1]).items():
        for default in defaults:
            if default is None or default == [] or key not in documented:
                continue  # required, optional or computed: the docs say so in words
            literals = []
            for text in documented[key]:
                tokens = re.findall(r"`([^`]+)`", text)
                if not text.startswith("`") or "<" in tokens[0] or " x " in tokens[0]:
                    literals = []
                    break
                literals.append(_literal(tokens[0]))
            if not literals or not any(_same(doc, default) for doc in literals):
                wrong.append((key, documented[key], default))
    assert not wrong, f"{section}: docs default != schema default: {wrong}"


def test_a_wrong_documented_default_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _documented()
    doctored = {k: dict(v) for k, v in real.items()}
    doctored["agent"]["uplink.max_in_flight"] = ["`5`"]
    monkeypatch.setitem(globals(), "_documented", lambda: doctored)
    with pytest.raises(AssertionError, match=r"uplink\.max_in_flight"):
        test_documented_defaults_are_the_schemas_defaults("agent")


def test_every_table_on_the_configuration_page_starts_with_a_header_row():
    """A table row after prose (no header and separator) renders as plain text."""
    lines = (Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
             ).read_text().splitlines()
    headless = []
    for i, line in enumerate(lines):
        starts = line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
        if starts and not (i + 1 < len(lines) and lines[i + 1].startswith("|---")):
            headless.append(f"line {i + 1}: {line[:60]}")
    assert headless == []
