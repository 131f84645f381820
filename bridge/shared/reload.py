"""SIGHUP: re-read the config file, apply what can change in a running process, and name the
keys that need a restart, as Mosquitto, NATS, Telegraf and Vector do on SIGHUP.

``Reloader.reload`` loads and checks the file with the same loader as start-up (a bad file is
reported, ``<component>.reload_failed``, and the running configuration stays), compares it with
the running one key by key (``changed_keys``, in the config file's own key names), calls the
appliers of the reloadable keys and reports the rest by name (``<component>.reloaded`` with
``applied`` and ``restart_needed``). Extra work that every reload does whatever changed
(re-reading certificates and the deny-list) is ``refresh``; what it names is reported as
applied. Shared by the agent and the ingest, so it sits beside them, in no stage.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from prometheus_client import Counter

from bridge.shared.errors import UserError
from bridge.shared.telemetry import event

C = TypeVar("C")

# Field names of the config dataclasses that are not the file's key names.
_RENAMED = {"log_level": "log.level", "tls_check_s": "tls.check_s",
            "metrics_listen": "metrics.listen", "health_listen": "health.listen",
            "store_path": "store.path", "deny_list": "revocation.deny_list",
            "rate_limit_per_s": "rate_limit.readings_per_s",
            "rate_limit_burst": "rate_limit.burst",
            "max_batch_envelopes": "limits.max_batch_envelopes",
            "max_tombstone_span": "limits.max_tombstone_span",
            "max_epochs_per_site": "limits.max_epochs_per_site",
            "max_gaps_per_stream": "limits.max_gaps_per_stream",
            "max_batch_bytes": "limits.max_batch_bytes",
            "max_in_flight_per_site": "limits.max_in_flight_per_site", "jetstream": "store",
            "host": "url", "port": "url"}
_FLATTENED = {"decode"}  # a source's decode settings are keys of the source itself
_DEFAULT_EQ: Any = object.__eq__  # identity: such objects are compared by their attributes


def _comparable(value: Any) -> Any:
    """Something ``==`` compares by content (parsed JSON mappings have no ``__eq__``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple((f.name, _comparable(getattr(value, f.name)))
                     for f in dataclasses.fields(value))
    if isinstance(value, tuple | list):
        return tuple(_comparable(v) for v in value)
    if hasattr(value, "__dict__") and type(value).__eq__ is _DEFAULT_EQ:
        return tuple(sorted((k, _comparable(v)) for k, v in vars(value).items()))
    return value


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The config keys whose values differ between two loaded configs, in file order."""
    out: list[str] = []
    for f in dataclasses.fields(old):
        if f.name == "file":
            continue
        name = _RENAMED.get(f.name, f.name)
        key = prefix if f.name in _FLATTENED else f"{prefix}.{name}" if prefix else name
        a, b = getattr(old, f.name), getattr(new, f.name)
        if _comparable(a) == _comparable(b):
            continue
        if dataclasses.is_dataclass(a) and type(a) is type(b) and name != "store":
            out += changed_keys(a, b, key)
        elif isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and \
                all(dataclasses.is_dataclass(x) and type(x) is type(y)
                    for x, y in zip(a, b, strict=True)):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                out += changed_keys(x, y, f"{key}[{i}]")
        else:
            out.append(key)
    return list(dict.fromkeys(out))


class Reloader(Generic[C]):
    """Applies a re-read config to a running process (see the module docstring)."""

    def __init__(self, *, component: str, running: C, load: Callable[[], C],
                 appliers: Mapping[str, Callable[[C], None]],
                 refresh: Callable[[], Awaitable[list[str]]], counter: Counter) -> None:
        self.component, self.running, self._load = component, running, load
        self._applied: C = running  # the values the reloadable keys have now
        self._appliers, self._refresh, self._counter = appliers, refresh, counter

    async def reload(self) -> tuple[list[str], list[str]]:
        """(applied, restart_needed); both empty if the file could not be used."""
        try:
            new = self._load()
        except UserError as exc:
            self._counter.labels("failed").inc()
            event(f"{self.component}.reload_failed", level=logging.ERROR, reason=str(exc),
                  keeping="the running configuration")
            return [], []
        # Reloadable keys against what they are now; the rest against what the process
        # started with (it keeps naming them until a restart applies them).
        applied = [k for k in changed_keys(self._applied, new) if k in self._appliers]
        for key in applied:
            self._appliers[key](new)
        self._applied = new
        restart = [k for k in changed_keys(self.running, new) if k not in self._appliers]
        applied += await self._refresh()
        self._counter.labels("restart_needed" if restart else "ok").inc()
        event(f"{self.component}.reloaded",
              level=logging.WARNING if restart else logging.INFO, applied=applied,
              restart_needed=restart,
              action=f"restart the {self.component} to apply: {', '.join(restart)}"
              if restart else None)
        return applied, restart
