"""``${VAR}`` and ``${VAR:-default}`` in TOML string values, resolved from the environment.

As Telegraf, Vector and the OpenTelemetry Collector do, so that secrets and per-host values
stay out of the file. Only string values are expanded (never keys, numbers or booleans), once
(a value that a variable brings in is not expanded again), and ``$${`` writes a literal
``${``. ``${VAR:-default}`` takes the default when VAR is unset or empty; ``${VAR}`` with VAR
unset is an error naming the file, the key and the variable, never its value.

A value that came from the environment may be a secret: ``scrub`` replaces each such value
in an error message by the ``${VAR}`` that brought it, so no config error prints it (logs
and ``/status`` already redact passwords and URLs' credentials, ``bridge.shared.errors.redact``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from bridge.shared.errors import ConfigError

NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(r"\$\$\{|\$\{(" + NAME + r")(?::-([^}]*))?\}|\$\{")


# What the file being loaded took from the environment (set by the loader around a load, so
# that its errors can be scrubbed wherever in the load they are raised).
SEEN: ContextVar[dict[str, str] | None] = ContextVar("interpolated", default=None)


def expand(raw: Any, environ: Mapping[str, str], file: str = "", where: str = ""
           ) -> dict[str, str]:
    """Expand every string value of the parsed TOML ``raw`` in place; return the values that
    came from the environment, each with the ``${VAR}`` that brought it (for ``scrub``).
    ``ConfigError`` (naming ``file`` and the key) for a reference that cannot be resolved."""
    secrets: dict[str, str] = {}
    items = list(raw.items()) if isinstance(raw, dict) else \
        list(enumerate(raw)) if isinstance(raw, list) else []
    for k, v in items:
        key = f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k)
        if isinstance(v, str):
            if "$" in v:
                raw[k] = _string(v, file, key, environ, secrets)
        elif isinstance(v, dict | list):
            secrets.update(expand(v, environ, file, key))
    return secrets


def _string(value: str, file: str, key: str, environ: Mapping[str, str],
            secrets: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name is None:
            raise ConfigError(file, key, "a '${' that is not '${NAME}' or '${NAME:-default}' "
                                     "(NAME: letters, digits, '_'; write '$${' for a literal "
                                     "'${')")
        got = environ.get(name)
        if got is None or (got == "" and default is not None):
            if default is None:
                raise ConfigError(file, key, f"environment variable {name} is not set (give "
                                         f"it a value, or a default: ${{{name}:-default}})")
            return default
        if got:
            secrets[got] = f"${{{name}}}"
        return got

    return _TOKEN.sub(one, value)


def scrub(message: str, secrets: Mapping[str, str]) -> str:
    """``message`` with every value that came from the environment replaced by its
    ``${VAR}`` (longest first, so a value inside another is not half replaced)."""
    for value in sorted(secrets, key=len, reverse=True):
        message = message.replace(value, secrets[value])
    return message
