"""The TOML reader: a table that tracks the keys it consumed, so unknown keys are errors, and
names every value by its key path (``uplink.endpoints[1].target``) in its errors."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.config.model import parse_hostport
from bridge.errors import ConfigError

_REQUIRED: Any = object()
# A test seam (tests/test_config_docs.py): called with (key path, kind, default) for every key
# a loader reads, so the documented table of keys can be checked against what is read.
observer: Callable[[str, str, Any], None] | None = None


class _Table:
    """One TOML table being read; tracks consumed keys to report unknown ones."""

    def __init__(self, data: dict[str, Any], *, file: str, path: str, base: Path) -> None:
        self._data, self._file, self._path, self._base = data, file, path, base
        self._seen: set[str] = set()

    @property
    def file(self) -> str:
        return self._file

    @property
    def where(self) -> str:
        return self._path

    def _key(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self._file, self._key(key) if key else self._path, message)

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        self._seen.add(key)
        if observer is not None:
            observer(re.sub(r"\[\d+\]", "[]", self._key(key)), what,
                     None if default is _REQUIRED else default)
        if key not in self._data:
            if default is _REQUIRED:
                raise self.error(key, "required key is missing")
            return default
        value = self._data[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {what}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {what}, got {type(value).__name__} {value!r}")
        return value

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, (str,), "a string")
        if isinstance(value, str) and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        value = self._get(key, default, (int,), "an integer")
        if isinstance(value, int):
            if minimum is not None and value < minimum:
                raise self.error(key, f"must be >= {minimum}, got {value}")
            if maximum is not None and value > maximum:
                raise self.error(key, f"must be <= {maximum}, got {value}")
        return value

    def number(self, key: str, default: Any = _REQUIRED, *, minimum: float | None = None) -> Any:
        value = self._get(key, default, (int, float), "a number")
        if value is not None:
            value = float(value)
            if minimum is not None and value < minimum:
                raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def boolean(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default, (bool,), "true or false")

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _REQUIRED) -> Any:
        value = self.string(key, default)
        if value is not None and value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def path(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.string(key, default)
        if isinstance(value, str):
            p = Path(value).expanduser()
            return p if p.is_absolute() else (self._base / p)
        return value

    def str_list(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, (list,), "a list of strings")
        if isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, str) or not item:
                    raise ConfigError(self._file, f"{self._key(key)}[{i}]",
                                      f"expected a non-empty string, got {item!r}")
            return tuple(value)
        return value

    def table(self, key: str, *, required: bool = False) -> _Table:
        value = self._get(key, _REQUIRED if required else {}, (dict,), "a table")
        return _Table(value, file=self._file, path=self._key(key), base=self._base)

    def tables(self, key: str) -> list[_Table]:
        value = self._get(key, [], (list,), "an array of tables ([[...]])")
        out = []
        for i, item in enumerate(value):
            path = f"{self._key(key)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(self._file, path, "expected a table")
            out.append(_Table(item, file=self._file, path=path, base=self._base))
        return out

    def has(self, key: str) -> bool:
        return key in self._data

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (see docs/configuration.md)")


def _hostport(t: _Table, key: str, default: Any = _REQUIRED, *,
              default_port: int | None = None, listen: bool = False) -> Any:
    value = t.string(key, default)
    if value is None:
        return None
    try:
        parse_hostport(value, default_port=default_port, listen=listen)
    except ValueError as exc:
        raise t.error(key, str(exc)) from exc
    return value


def _read(path: Path) -> _Table:
    file = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(file, "", "file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(file, "", f"cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"invalid TOML: {exc}") from exc
    return _Table(data, file=file, path="", base=path.resolve().parent)
