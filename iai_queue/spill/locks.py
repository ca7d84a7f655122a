"""Advisory file locks (``flock``): who is alive, who may replay.

The kernel drops a process's ``flock`` when it dies, so "the lock is free"
means "its holder is gone" — no pid files, no clocks.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["try_flock", "unlock", "lock_held", "flocked"]

_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def try_flock(path: Path) -> Optional[int]:
    """An fd holding an exclusive flock on ``path`` (created if missing), or None if someone else holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
    fcntl.flock(fd, fcntl.LOCK_EX)


def lock_held(lock: Path) -> Optional[bool]:
    """Whether someone holds ``lock``; opened read-only so that looking creates nothing. None: unknown."""
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
