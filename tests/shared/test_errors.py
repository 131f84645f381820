"""One exception tree: everything the bridge raises on purpose is a BridgeError, user errors
are reported by the CLI in one line."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import bridge
from bridge.cli import main
from bridge.shared import errors


def _bridge_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(bridge.__path__, "bridge.")
            if "._pb" not in m.name and m.name != "bridge.__main__"]


def test_every_public_exception_class_of_the_package_is_in_the_tree() -> None:
    found = []
    for name in _bridge_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == name and not attr.startswith("_")):
                found.append(obj)
                assert issubclass(obj, errors.BridgeError), f"{name}.{attr}"
    from bridge.edge.envelope import EnvelopeError

    assert EnvelopeError in found  # the scan sees classes outside bridge.shared.errors


def test_the_tree_documents_every_class_it_defines() -> None:
    doc = errors.__doc__ or ""
    for attr, obj in vars(errors).items():
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert attr in doc, attr


def test_a_user_error_is_one_line_on_stderr_and_exit_2(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["agent", "--config", str(tmp_path / "nope.toml"), "--check"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
