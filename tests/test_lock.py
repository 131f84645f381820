"""The service's runtime dependencies are locked with hashes, the lock agrees with
pyproject.toml, and the image installs from it and nothing else."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile --generate-hashes file."""
    out: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9._-]+)==([^\s\\]+)", line):
            name = str(canonicalize_name(m.group(1)))
            out[name] = (m.group(2), [])
        elif m := re.match(r"^\s+--hash=sha256:([0-9a-f]{64})", line):
            out[name][1].append(m.group(1))
        elif line.strip() and not line.lstrip().startswith("#"):
            assert line.startswith(" ") or line.endswith("\\"), f"unexpected line {line!r}"
    return out


def test_every_runtime_dependency_is_pinned_with_hashes_within_its_pyproject_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lock = locked(ROOT / "requirements.lock")
    assert lock and all(hashes for _, hashes in lock.values()), "an entry without a hash"
    for dep in map(Requirement, deps):
        name = str(canonicalize_name(dep.name))
        assert name in lock, f"{name} is not in requirements.lock: regenerate it"
        assert dep.specifier.contains(lock[name][0]), (name, lock[name][0], str(dep.specifier))


def test_the_build_lock_pins_setuptools_within_the_build_requirement():
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    lock = locked(ROOT / "requirements-build.lock")
    for req in map(Requirement, build):
        version, hashes = lock[str(canonicalize_name(req.name))]
        assert hashes and req.specifier.contains(version)


def test_the_image_installs_only_from_the_locks():
    text = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    installs = [i.rstrip("\\ ") for i in re.findall(r"pip install [^\n&]*", text)]
    assert installs == [
        "pip install --no-cache-dir --require-hashes -r requirements-build.lock",
        "pip install --no-cache-dir --require-hashes -r requirements.lock",
        "pip install --no-cache-dir --no-deps --no-build-isolation .",
    ]


def test_the_image_is_built_on_a_base_named_by_digest_only():
    text = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert re.search(r"^ARG BASE_IMAGE$", text, re.M), "no default: the builder names it"
    assert '*@sha256:*) ;;' in text and "exit 1" in text  # a tag alone stops the build
