"""Durable file primitives for the spill directory: a private directory, full writes, fsynced renames.

Guarantee: a file written here is complete when it appears under its final
name (written in full, fsynced, then renamed; :func:`fsync_dir` makes the
rename itself survive a crash). The directory is ours alone: created 0o700,
tightened if others may write it, refused if another user owns it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["ensure_private_dir", "fsync_dir", "write_all", "atomic_write"]

log = logging.getLogger("iai_queue.spill")


def ensure_private_dir(path: Path) -> bool:
    """Create ``path`` (and missing parents) 0o700; check an existing one. True when it was tightened.

    Like ssh's StrictModes: a directory of ours that others may write is
    tightened to 0o700 (and logged); one owned by another user is refused
    (PermissionError), since its files could be planted.
    """
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700)  # whatever the umask
        except FileExistsError:
            pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"spill directory {str(path)!r} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(f"spill directory {str(path)!r} is owned by uid {st.st_uid}, not by this "
                              f"process's uid {os.getuid()}: refused (its files could be planted)")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
        log.warning("spill.dir_tightened dir=%s mode=%o", path, stat.S_IMODE(st.st_mode),
                    extra={"event": "spill.dir_tightened", "dir": str(path), "mode": oct(stat.S_IMODE(st.st_mode))})
        return True
    return False


def fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        return  # no directory fsync there (Windows)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` by a fsynced temp file renamed into place (the directory is not fsynced)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
