"""The package reads along the data flow: the import graph has no edge against it.

sources -> intake (with codecs and envelope) -> spool -> uplink -> (the wire) -> ingest ->
consume. Neutral modules (config, telemetry, common, files, pki, service, errors, reload,
generated code) may be imported by every stage. A stage imports neutral modules, stages
upstream of it and the next stage, which it hands its output to (the intake commits into the
spool), on its own side of the wire; never a stage further on, never across the wire.
Nothing but the CLI imports the dev tooling.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "bridge"
NEUTRAL = {"bridge.common", "bridge.config", "bridge.telemetry", "bridge.httpserve",
           "bridge.files", "bridge.certinfo",
           "bridge.pki", "bridge.service", "bridge.errors", "bridge.reload", "bridge._pb"}
# Agent side 1-4, cloud side 5-6.
STAGES = {"bridge.sources": 1, "bridge.codecs": 2, "bridge.intake": 2, "bridge.envelope": 2,
          "bridge.redrive": 2,
          "bridge.spool": 3,
"bridge.uplink": 4, "bridge.netbind": 4,
          "bridge.ingest": 5, "bridge.consume": 6}
WIRING = {"bridge.agent": 4}  # wires the agent side
FREE = {"bridge.cli", "bridge.cli_deadletters", "bridge.__main__", "bridge.dev"}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _group(name: str, table: set[str] | dict[str, int]) -> str | None:
    for key in sorted(table, key=len, reverse=True):
        if name == key or name.startswith(key + "."):
            return key
    return None


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (PKG.parent / node.module.replace(".", "/") / a.name).exists()
                       or (PKG.parent / node.module.replace(".", "/") / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "bridge" or m.startswith("bridge.")}


def _rank(name: str) -> tuple[str, int | None]:
    if name == "bridge":  # the package itself: __version__ only
        return "neutral", None
    if _group(name, FREE):
        return "free", None
    if _group(name, NEUTRAL):
        return "neutral", None
    if (g := _group(name, STAGES)) is not None:
        return "stage", STAGES[g]
    if (g := _group(name, WIRING)) is not None:
        return "wiring", WIRING[g]
    return "unknown", None


MODULES = sorted(p for p in PKG.rglob("*.py") if "_pb" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=_module)
def test_no_module_imports_against_the_flow(path: Path) -> None:
    me = _module(path)
    kind, rank = _rank(me)
    assert kind != "unknown", f"{me} is in no stage: add it to tests/test_layout.py"
    for dep in _imports(path):
        dkind, drank = _rank(dep)
        if dep == "bridge" or kind == "free":
            continue
        assert dkind != "free", f"{me} imports {dep} (dev tooling or the CLI)"
        if dkind == "neutral":
            continue
        if kind == "neutral":
            # config validates codec names and JSON mappings with the codecs' own parser.
            assert me.startswith("bridge.config") and dep.startswith("bridge.codecs"), (me, dep)
            continue
        assert drank is not None and rank is not None
        same_side = (rank <= 4) == (drank <= 4)
        assert same_side and drank <= rank + 1, \
            f"{me} (stage {rank}) imports {dep} (stage {drank})"


@pytest.mark.parametrize("path", MODULES, ids=_module)
def test_no_module_is_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{_module(path)}: {lines} lines"


def test_the_module_map_names_every_module() -> None:
    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Module map"):doc.index("## Decisions")]
    for path in MODULES:
        rel = path.relative_to(PKG.parent).as_posix()
        parent = f"{path.parent.relative_to(PKG.parent).as_posix()}/"
        named = f"`{rel}`" in table or f"`{path.name}`" in table or \
            f"`{path.stem}`" in table or path.name == "__init__.py"
        assert named and (parent == "bridge/" or f"`{parent}" in table or parent in table), rel
