"""Every exception the bridge raises on purpose, in one tree.

::

    BridgeError
    ├── UserError            the CLI prints "error: <message>" (one line) and exits 2
    │   ├── ConfigError      a config file or flag; names the file and the key path
    │   ├── UsageError       command-line flags that do not fit together
    │   ├── PkiError         a CA or certificate operation that cannot proceed
    │   ├── SpoolError       a spool file that cannot be used (another site's, no directory)
    │   ├── InUseError       a resource another process owns (a spool, a listen address)
    │   ├── CursorError      a consumer cursor file that cannot be read or written
    │   ├── BindError        an interface or VLAN that cannot be bound
    │   ├── DependencyError  an installed library lacks what the bridge relies on
    │   └── DemoError        ``python -m devkit demo`` cannot run as asked
    ├── SpoolCondition       states of a working spool that its callers handle
    │   ├── SpoolFull        the commit would exceed max_bytes or the disk is full
    │   └── SpoolReset       the file was corrupt and replaced; positions are void
    ├── InputError           bad input from outside, answered without raising further
    │   ├── DecodeError      a payload that cannot become a reading (a dead letter); its
    │   │                    subclass EnvelopeError (envelope.py): a value outside the wire types
    │   └── MappingError     a JSON mapping in the config that is not well formed
    └── Unavailable          a peer or store did not do what was asked; nothing was acked
        ├── TransportError   an uplink call failed (classified: retryable or throttled)
        ├── StoreUnavailable JetStream did not acknowledge a write
        └── SourceUnavailable a cloud could not be read by the consumer

Programming errors (``AssertionError``, ``TypeError`` from a wrong call) are not in the tree:
they are bugs, and the supervisor's restart plus the traceback in the journal is their report.
"""

from __future__ import annotations

import enum
import re

# scheme://user:password@ anywhere in a text: the password is replaced. Messages quote the URL
# a user wrote (a bad port, a wrong scheme) and libraries quote the URL they were given.
_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@'\"]*):[^\s/@'\"]*@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced."""
    return _CREDENTIALS.sub(r"\1:***@", text) if "@" in text else text


class BridgeError(Exception):
    """The root: ``except BridgeError`` catches everything the bridge raises on purpose."""


class UserError(BridgeError):
    """A mistake the user can fix; the message says what and where, in one line, and never a
    password (``redact``)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class ConfigError(UserError):
    """A user mistake in a config file or flags: names where, says what."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file, self.key, self.message = file, key, message
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {message}")


class UsageError(UserError):
    """Command-line flags that do not fit together."""


class PkiError(UserError):
    """A user-facing PKI problem (existing file, bad name, unreadable CA)."""


class SpoolError(UserError):
    """The spool file cannot be used (it belongs to another site, or its directory is unusable)."""


class InUseError(UserError):
    """A resource with one owner is held by another process: a spool (its lock file names the
    holder's PID) or a listen address. Starting anyway would split data between two owners."""


class CursorError(UserError):
    """A consumer cursor file that cannot be read or written."""


class BindError(UserError):
    """An interface or VLAN cannot be used (missing, no kernel support)."""


class DependencyError(UserError):
    """An installed library is not the version the bridge relies on (paho's internals)."""


class DemoError(UserError):
    """The demo cannot run as asked (a flag combination, a missing broker)."""


class SpoolCondition(BridgeError):
    """A state of a working spool that its callers handle (never shown to a user as is)."""


class SpoolFull(SpoolCondition):
    """The commit would exceed ``max_bytes`` or the disk is full; nothing was written."""


class SpoolReset(SpoolCondition):
    """The file was found corrupt and replaced (see Recovery); positions (rids) are void."""


class InputError(BridgeError):
    """Bad input from outside the process, answered (dead letter, refusal) without crashing."""


class DecodeError(InputError):
    """The payload cannot become a reading; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class MappingError(InputError, ValueError):
    """A mapping in the config is not well formed; the message names the field."""


class Unavailable(BridgeError):
    """A peer or a store did not do what was asked; nothing of the request was acknowledged."""


class ErrorKind(enum.Enum):
    RETRYABLE = "retryable"   # try again, on another endpoint if there is one
    THROTTLED = "throttled"   # the endpoint is fine but asks us to slow down
    REFUSED = "refused"       # the endpoint refuses this site's identity: permanent until an
                              # operator acts (revocation, wrong certificate); retried slowly


class TransportError(Unavailable):
    """A failed call: ``code`` (gRPC status name), Envoy-style ``flag``, classification
    (retryable, throttled, or refused: the identity was denied, which no retry cures)."""

    def __init__(self, *, code: str, flag: str, kind: ErrorKind, detail: str,
                 retry_after_s: float | None = None, max_envelopes: int | None = None) -> None:
        """``max_envelopes``: the ingest refused the batch as larger than it takes in one
        call (its ``max-batch-envelopes`` trailer); the sender splits it."""
        self.code, self.flag, self.kind, self.detail = code, flag, kind, detail
        self.retry_after_s = retry_after_s
        self.max_envelopes = max_envelopes
        super().__init__(f"{code} ({flag}): {detail}")


class StoreUnavailable(Unavailable):
    """JetStream did not acknowledge the write (no quorum, no connection): nothing is acked."""


class SourceUnavailable(Unavailable):
    """A cloud could not be read (reported per cloud, like an unreachable ingest node)."""
