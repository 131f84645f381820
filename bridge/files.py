"""File helpers shared by every stage: private files are created 0600, secrets that others
can read are refused at start (a key or config readable by group or others has already leaked
to every account on the gateway), and ``stamp`` tells a watcher that a file changed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

INSECURE_ENV = "BRIDGE_ALLOW_INSECURE_PERMISSIONS"


def private_file(path: Path) -> None:
    """Create ``path`` mode 0600 if missing; tighten an existing one to 0600.

    SQLite creates its ``-wal`` and ``-shm`` files with the database file's mode, so making
    the database private before SQLite opens it makes all three private.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def exposure(path: Path) -> str | None:
    """``None`` if only the owner may read ``path``; else what is wrong, for an error."""
    if os.environ.get(INSECURE_ENV) == "1":
        return None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # the caller's read reports a missing file with its own message
    if mode & 0o077:
        return (f"{path} is readable or writable by group or others (mode {mode:04o}); run "
                f"`chmod 600 {path}`, or set {INSECURE_ENV}=1 to accept it")
    return None


Stamp = tuple[int, int, int]
MISSING: Stamp = (0, 0, 0)


def stamp(path: Path) -> Stamp:
    """(mtime_ns, size, inode): moves whenever the file is rewritten or replaced (an atomic
    rename included); ``MISSING`` if it is not there. The watchers of changed files (the
    deny-list, the agent's credentials, a plant source's certificates) compare these."""
    try:
        st = path.stat()
    except OSError:
        return MISSING
    return st.st_mtime_ns, st.st_size, st.st_ino
