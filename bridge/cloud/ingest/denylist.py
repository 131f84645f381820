"""Revoked certificates: a deny-list of serials and fingerprints, reloaded when the file changes.

File format (``[revocation] deny_list``; ``bridge pki revoke`` appends to it): one entry per
line, ``#`` starts a comment, blank lines are ignored. An entry is

* ``serial:<hex>``: the certificate serial number in hex (our CA issues 159-bit random
  serials, so a serial names one certificate), or
* ``sha256:<hex>``: the SHA-256 fingerprint of the certificate's DER, 64 hex digits, with or
  without ``:`` between the bytes (the form ``openssl x509 -fingerprint -sha256`` prints).

Invariants: a certificate on the list is refused on every call (PushBatch, Subscribe, Status,
also on channels opened before it was listed), with PERMISSION_DENIED and ``reason=revoked``;
an entry is never dropped by a failed reload. The file is stat'ed at most every
``interval_s`` (0.2 s) from the call path, so a change takes effect within that of the next
call. A reload that cannot read the file or finds a bad line keeps the previous list, logs
``ingest.deny_list_failed`` and counts ``bridge_ingest_deny_list_reloads_total{outcome=
"error"}``: a typo must not un-revoke anything. At start the same problems are a
``ConfigError`` (the node does not start with a list it cannot read).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from bridge.shared.errors import ConfigError
from bridge.shared.files import MISSING, Stamp, stamp
from bridge.shared.telemetry import event

_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Revoked:
    serials: frozenset[int]
    fingerprints: frozenset[str]  # lower-case hex, no separators

    def __len__(self) -> int:
        return len(self.serials) + len(self.fingerprints)


def parse(text: str, *, source: str) -> Revoked:
    """The entries of a deny-list file; ``ConfigError`` naming the line for anything else."""
    serials: set[int] = set()
    prints: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, sep, value = line.partition(":")
        kind, value = kind.strip().lower(), value.strip().lower()
        if kind == "serial" and sep and _HEX.fullmatch(value):
            serials.add(int(value, 16))
        elif kind == "sha256" and sep and _HEX.fullmatch(value.replace(":", "")) and \
                len(value.replace(":", "")) == 64:
            prints.add(value.replace(":", ""))
        else:
            raise ConfigError(source, f"line {n}", "expected 'serial:<hex>' or "
                              f"'sha256:<64 hex>', got {line[:80]!r}")
    return Revoked(frozenset(serials), frozenset(prints))


class DenyList:
    """The ingest's view of the deny-list file: ``revoked(serial, fingerprint)`` per call."""

    def __init__(self, *, path: Path, interval_s: float = 0.2) -> None:
        self.path = path
        self.interval_s = interval_s
        self.reloads = {"ok": 0, "error": 0}
        try:
            self._stamp = stamp(path)
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), "", f"cannot read the deny-list: {exc}") from exc
        self.entries = parse(text, source=str(path))
        self._failed: Stamp | None = None  # the file state last refused
        self._next_check = time.monotonic() + interval_s

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the file if it changed (at most every ``interval_s``, unless ``force``: a
        SIGHUP); a bad state of the file (a missing file included) is reported and counted
        once, and the previous entries stay in force."""
        now = time.monotonic()
        if now < self._next_check and not force:
            return
        self._next_check = now + self.interval_s
        now_stamp = stamp(self.path)
        if now_stamp in (self._stamp, self._failed):
            return
        try:
            if now_stamp == MISSING:
                raise OSError(f"{self.path}: no such file")
            entries = parse(self.path.read_text(encoding="utf-8"), source=str(self.path))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            self._failed = now_stamp
            self.reloads["error"] += 1
            event("ingest.deny_list_failed", level=logging.ERROR, path=str(self.path),
                  reason=str(exc)[:300], kept=len(self.entries))
            return
        self._stamp, self._failed = now_stamp, None
        before = len(self.entries)
        self.entries = entries
        self.reloads["ok"] += 1
        event("ingest.deny_list_reloaded", path=str(self.path), entries=len(entries),
              before=before)

    def revoked(self, serial: int, fingerprint: str) -> bool:
        self.refresh()
        return serial in self.entries.serials or fingerprint in self.entries.fingerprints
