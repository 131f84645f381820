"""The package reads along the wire: the directory tree says where each module belongs, and
the import graph has no edge against the flow.

``bridge/edge/`` holds the gateway's stages in flow order (sources -> codecs, intake, envelope,
redrive -> spool -> uplink, with ``agent`` wiring them); ``bridge/cloud/`` the cloud's
(ingest -> store -> consume); ``bridge/shared/`` what both sides use (the wire schema,
config, telemetry, errors, PKI, files, pacing, gRPC client settings, sockets, the HTTP
endpoint, systemd, SIGHUP). Only the command line sits at the top. A stage imports shared
modules, stages upstream of it and the next stage, which it hands its output to, on its own
side; never a stage further on, never across the wire. Shared modules import no stage, but
config validates JSON mappings with the codecs' own parser. The development harness
(``devkit/``) is outside the package, and nothing in it is imported by the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "bridge"
# Each side's stages in flow order; a stage is a module or package directly under its side.
FLOW = {
    "edge": [{"sources"}, {"codecs", "intake", "redelivery", "envelope", "redrive"}, {"spool"},
             {"uplink", "agent"}],
    "cloud": [{"ingest"}, {"store"}, {"consume"}],
}
TOP = {"__init__", "__main__", "cli", "cli_deadletters", "edge", "cloud", "shared", "py"}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (ROOT / node.module.replace(".", "/") / a.name).exists()
                       or (ROOT / node.module.replace(".", "/") / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in {"bridge", "devkit"}}


def _place(name: str) -> tuple[str, int | None]:
    """(side, rank): side is edge, cloud, shared or cli; rank is the stage's place in FLOW."""
    parts = name.split(".")
    if parts[0] == "devkit":
        return "devkit", None
    if (len(parts) <= 2 and parts[-1] in {"bridge", *FLOW}) or parts[1] == "shared":
        # the package itself (__version__ only) and each side's package (a docstring)
        return "shared", None
    if len(parts) == 2 and parts[1] in {"cli", "cli_deadletters", "__main__"}:
        return "cli", None
    if len(parts) < 3 or parts[1] not in FLOW:
        return "unknown", None
    for rank, stages in enumerate(FLOW[parts[1]]):
        if parts[2] in stages:
            return parts[1], rank
    return "unknown", None


MODULES = sorted(p for p in PKG.rglob("*.py") if "_pb" not in p.parts)


def test_the_top_of_the_package_holds_only_the_sides_and_the_command_line() -> None:
    stray = sorted(p.name for p in PKG.iterdir()
                   if p.name != "__pycache__" and p.stem not in TOP and p.name != "py.typed")
    assert not stray, f"{stray}: put each under bridge/edge, bridge/cloud or bridge/shared"


@pytest.mark.parametrize("side", sorted(FLOW))
def test_every_stage_on_a_side_is_in_the_flow(side: str) -> None:
    named = set().union(*FLOW[side])
    present = {p.stem for p in (PKG / side).iterdir()
               if p.name not in {"__init__.py", "__pycache__"}}
    assert present == named, f"bridge/{side}: {present ^ named} not in FLOW, or gone"


@pytest.mark.parametrize("path", MODULES, ids=_module)
def test_no_module_imports_against_the_flow(path: Path) -> None:
    me = _module(path)
    side, rank = _place(me)
    assert side != "unknown", f"{me} is in no stage of FLOW"
    for dep in _imports(path):
        dside, drank = _place(dep)
        assert dside != "devkit", f"{me} imports {dep}: the dev harness is not shipped"
        if side == "cli" or dside == "shared":
            continue
        assert dside != "cli", f"{me} imports {dep} (the command line)"
        if side == "shared":
            assert me.startswith("bridge.shared.config") and \
                dep.startswith("bridge.edge.codecs"), f"shared {me} imports the stage {dep}"
            continue
        assert dside == side, f"{me} ({side}) imports {dep} across the wire ({dside})"
        assert rank is not None and drank is not None and drank <= rank + 1, \
            f"{me} (stage {rank}) imports {dep} (stage {drank})"


@pytest.mark.parametrize("path", MODULES, ids=_module)
def test_no_module_is_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{_module(path)}: {lines} lines"


def test_the_module_map_names_every_module() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Module map"):doc.index("## Decisions")]
    for path in MODULES:
        rel = path.relative_to(ROOT).as_posix()
        parent = f"{path.parent.relative_to(ROOT).as_posix()}/"
        named = f"`{rel}`" in table or f"`{path.name}`" in table or \
            f"`{path.stem}`" in table or path.name == "__init__.py"
        assert named and (parent == "bridge/" or f"`{parent}" in table or parent in table), rel
