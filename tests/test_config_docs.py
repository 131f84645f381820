"""docs/configuration.md's tables agree with what the loaders read: every key a loader reads is
documented in its section, every documented key is read, and documented defaults are the
loaders' defaults."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import load_agent, load_consumer, load_ingest, table
from bridge.files import INSECURE_ENV

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "configuration.md"
EXAMPLES = ROOT / "examples"
SECTIONS = {"agent": "## Agent", "ingest": "## Ingest node", "consumer": "## Consumer"}
Seen = dict[str, tuple[str, list[Any]]]  # key -> (kind, every default it was read with)


def _documented() -> dict[str, dict[str, list[str]]]:
    """Section -> key -> the texts of its default column (MQTT and AMQP share key names)."""
    text = DOCS.read_text()
    out: dict[str, dict[str, list[str]]] = {}
    starts = sorted((text.index(h), name) for name, h in SECTIONS.items())
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        rows: dict[str, list[str]] = {}
        for line in text[start:end].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 4 or not cells[0].startswith("`"):
                continue
            for key in re.findall(r"`([^`]+)`", cells[0]):
                rows.setdefault(key, []).append(cells[2])
        out[name] = rows
    return out


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Seen]]:
    """What each loader reads, over the examples plus a config with the rarer tables."""
    mp = pytest.MonkeyPatch()
    mp.setenv(INSECURE_ENV, "1")
    d = tmp_path_factory.mktemp("cfg")
    for name in ("ca.pem", "c.pem", "k.pem"):
        (d / name).write_text("")
    extra = d / "agent.toml"
    extra.write_text('site_id = "s"\n[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n'
                     '[spool]\npath = "s.db"\n[[spool.priority]]\ntopic = "a/#"\n'
                     'class = "alarm"\n[[sources]]\ntopics = ["#"]\n[uplink]\n'
                     '[[uplink.endpoints]]\nname = "a"\ntarget = "h:1"\n')
    out: dict[str, Seen] = {"agent": {}, "ingest": {}, "consumer": {}}
    current: Seen = {}

    def observe(key: str, what: str, default: Any) -> None:
        current.setdefault(key, (what, []))[1].append(default)

    table.observer = observe
    try:
        for kind, loader, files in (
                ("agent", load_agent, [EXAMPLES / "agent.toml", EXAMPLES / "agent-amqp.toml",
                                       EXAMPLES / "agent-sparkplug.toml", extra]),
                ("ingest", load_ingest, [EXAMPLES / "ingest.toml",
                                         EXAMPLES / "ingest-jetstream.toml"]),
                ("consumer", load_consumer, [EXAMPLES / "consumer.toml"])):
            current = out[kind]
            for f in files:
                loader(f)  # type: ignore[operator]
        yield out
    finally:
        table.observer = None
        mp.undo()


def _tables(seen: Seen) -> set[str]:
    """Plain tables (``[tls]``) are containers, documented by their keys."""
    return {k for k, (what, _) in seen.items() if what == "a table"}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_a_loader_reads_is_documented(seen: dict[str, Seen], section: str) -> None:
    documented = _documented()[section]
    missing = sorted(set(seen[section]) - _tables(seen[section]) - set(documented))
    assert not missing, f"{section}: read but not in docs/configuration.md: {missing}"


@pytest.mark.parametrize("section", SECTIONS)
def test_every_documented_key_is_read(seen: dict[str, Seen], section: str) -> None:
    stale = sorted(set(_documented()[section]) - set(seen[section]))
    assert not stale, f"{section}: documented but never read: {stale}"


def _literal(token: str) -> Any:
    try:
        return tomllib.loads(f"v = {token}")["v"]
    except tomllib.TOMLDecodeError:
        return token.strip('"')  # a bare word such as info or opc_da


def _same(doc: Any, default: Any) -> bool:
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(default, float) and not isinstance(doc, bool):
        return isinstance(doc, (int, float)) and float(doc) == default
    return bool(doc == default)


@pytest.mark.parametrize("section", SECTIONS)
def test_documented_defaults_are_the_loaders_defaults(seen: dict[str, Seen],
                                                      section: str) -> None:
    documented = _documented()[section]
    wrong = []
    for key, (_, defaults) in seen[section].items():
        for default in defaults:
            if key not in documented or default in (None, (), [], {}):
                continue
            literals = []
            for text in documented[key]:
                tokens = re.findall(r"`([^`]+)`", text)
                if not text.startswith("`") or "<" in tokens[0] or " x " in tokens[0]:
                    literals = []  # described in words or computed: nothing literal to compare
                    break
                literals.append(_literal(tokens[0]))
            if literals and not any(_same(doc, default) for doc in literals):
                wrong.append((key, documented[key], default))
    assert not wrong, f"{section}: docs default != loader default: {wrong}"
