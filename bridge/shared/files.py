"""File helpers shared by every stage: private files are created 0600, secrets that others
can read are refused at start (a key or config readable by group or others has already leaked
to every account on the gateway), ``stamp`` tells a watcher that a file changed, and
``OwnerLock`` gives a file exactly one owning process."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import stat
from pathlib import Path

from bridge.shared.errors import InUseError

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


def exposure(path: Path, *, euid: int | None = None, egid: int | None = None) -> str | None:
    """``None`` if no other account may read ``path``; else what is wrong, for an error.

    Only the owner may have access, with one exception: group access when the group is this
    process's own and no other account belongs to it (no supplementary member, no account
    with it as primary group) and the process is not root. That is a Kubernetes pod's
    ``fsGroup`` (kubelet makes a secret volume's files ``root:<fsGroup>`` and group-readable)
    and a gateway's ``bridge`` group from sysusers: still no other account can read the key.
    ``euid``/``egid`` stand for the process's ids in tests.
    """
    if os.environ.get(INSECURE_ENV) == "1":
        return None
    try:
        st = path.stat()
    except OSError:
        return None  # the caller's read reports a missing file with its own message
    mode = stat.S_IMODE(st.st_mode)
    uid = os.geteuid() if euid is None else euid
    gid = os.getegid() if egid is None else egid
    if mode & 0o077 and not (mode & 0o007) and _group_is_ours_alone(st.st_gid, uid, gid):
        return None
    if mode & 0o077:
        return (f"{path} is readable or writable by group or others (mode {mode:04o}); run "
                f"`chmod 600 {path}`, or set {INSECURE_ENV}=1 to accept it")
    return None


def _group_is_ours_alone(group: int, uid: int, gid: int) -> bool:
    if uid == 0 or group != gid:
        return False
    try:
        if grp.getgrgid(group).gr_mem:
            return False
    except KeyError:
        pass  # no entry (a container's numeric fsGroup): no named members
    return not any(p.pw_gid == group and p.pw_uid != uid for p in pwd.getpwall())


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


class OwnerLock:
    """An exclusive ``flock`` on ``<path>.lock``, holding the owner's PID as text.

    Why a lock and not a PID file alone: the kernel releases a ``flock`` when its holder dies,
    kill -9 included, so a stale file never blocks a restart, and two processes can never both
    believe they own the resource. The PID in the file is only for the error message. The lock
    lives beside the resource, not in it: recovery may move a corrupt spool file aside, and
    the ownership must not move with it.
    """

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``InUseError`` naming the resource and the holder's PID."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise InUseError(f"{self.what} is in use by another process (PID {holder}, lock "
                             f"{self.path}); it has exactly one owner: stop that process "
                             "first, or give this one its own") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases the ``flock``)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
