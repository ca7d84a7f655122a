"""Advisory file locks (``flock``): who is alive, who may replay.

The kernel drops a process's ``flock`` when it dies, so "the lock is free"
means "its holder is gone" — no pid files, no clocks.

POSIX only. Where ``fcntl`` does not exist (Windows) the package still imports
and the queue's memory mode works; taking a lock raises
:class:`SpillLockingUnavailable` (an OSError), so a spill fails like a full
disk would — logged, counted, the entries kept in memory — and nothing is
replayed from a directory whose writers cannot be told alive from dead.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["SpillLockingUnavailable", "try_flock", "unlock", "lock_held", "flocked"]


class SpillLockingUnavailable(OSError):
    """This platform has no ``fcntl.flock``: the spill directory cannot be used (memory mode still works)."""

    def __init__(self) -> None:
        super().__init__(errno.ENOTSUP, "the spill directory needs POSIX file locks (fcntl.flock), which this "
                                        "platform lacks: entries stay in memory")


def locks_available() -> bool:
    return fcntl is not None


def _fcntl():
    if fcntl is None:
        raise SpillLockingUnavailable()
    return fcntl


_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def try_flock(path: Path) -> Optional[int]:
    """An fd holding an exclusive flock on ``path`` (created if missing), or None if someone else holds it."""
    locks = _fcntl()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return None
    try:
        locks.flock(fd, locks.LOCK_EX | locks.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY:
            return None
        raise
    return fd


def unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)  # closing the last fd of the open file drops its flock


@contextmanager
def flocked(path: Path) -> Iterator[Optional[int]]:
    """``try_flock`` as a context manager: yields the fd, or None when someone else holds the lock."""
    fd = try_flock(path)
    try:
        yield fd
    finally:
        unlock(fd)


def lock_fd(fd: int) -> None:
    """Block until ``fd`` holds an exclusive flock (a file we just created: nobody else holds it)."""
    locks = _fcntl()
    locks.flock(fd, locks.LOCK_EX)


def lock_held(lock: Path) -> Optional[bool]:
    """Whether someone holds ``lock``; opened read-only so that looking creates nothing. None: unknown."""
    if fcntl is None:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        return True if exc.errno in _BUSY else None
    finally:
        os.close(fd)
