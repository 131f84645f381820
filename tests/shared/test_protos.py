"""The committed generated code is exactly what the pinned generator produces from protos/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generate(out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), str(out)], check=True,
                   capture_output=True)


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in {".py", ".pyi"}}


def test_committed_generated_code_matches_the_protos(tmp_path: Path):
    _generate(tmp_path)
    committed = _tree(ROOT / "bridge" / "shared" / "_pb")
    fresh = _tree(tmp_path)
    stale = sorted(n for n in fresh.keys() | committed.keys()
                   if fresh.get(n) != committed.get(n))
    assert not stale, f"bridge/shared/_pb is stale for {stale}: run 'make protos' and commit"


def test_a_changed_proto_is_detected_as_stale(tmp_path: Path):
    # Same comparison as above, against output generated from a modified proto.
    protos = tmp_path / "repo" / "protos"
    (tmp_path / "repo" / "tools").mkdir(parents=True)
    shutil.copytree(ROOT / "protos", protos)
    shutil.copy(ROOT / "tools" / "gen_protos.py", tmp_path / "repo" / "tools" / "gen_protos.py")
    proto = protos / "bridge" / "v1" / "bridge.proto"
    proto.write_text(proto.read_text().replace("string codec = 11;",
                                               "string codec = 11;\n  string extra = 99;"))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(tmp_path / "repo" / "tools" / "gen_protos.py"),
                    str(out)], check=True, capture_output=True)
    assert _tree(out) != _tree(ROOT / "bridge" / "shared" / "_pb")
