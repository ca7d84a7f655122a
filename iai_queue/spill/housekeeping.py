"""What dead writers leave behind in a spill directory: half-written ``.tmp`` files and lock files.

Guarantee: dead or alive is told by the writer's ``flock``, never by age (a
tmp file not named by this library gets a short grace instead, as it may be
between ``open()`` and ``flock()``). A ``.tmp`` file whose writer is gone is
renamed to its final name — it was fsynced before the writer could die
mid-rename — and an empty one is removed; a lock file is removed only when its
writer is dead and no file of it is left. Both run under the replay lock.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .durable import fsync_dir
from .locks import try_flock, unlock
from .names import is_tmp_name, is_writer_of_this_process, parse_name, stem_of, writer_lock_name

__all__ = ["writer_alive", "recover_tmp_files", "remove_stale_writer_locks"]

log = logging.getLogger("iai_queue.spill")

_FOREIGN_TMP_AGE_S = 2.0  # a tmp not named by this library: younger than this may be between open() and flock()


def writer_alive(path: Path, writer: str) -> bool:
    """True while ``writer`` holds its lock in ``path`` (a dead process's ``flock`` is dropped by the kernel)."""
    lock = path / writer_lock_name(writer)
    if not lock.exists():
        return False
    fd = try_flock(lock)
    if fd is None:
        return True
    unlock(fd)
    return False


def recover_tmp_files(path: Path, regular_names: list[str], own_writer: str) -> int:
    """Rename spill temp files whose writer is gone to their final name. Call under the replay lock.

    Dead or alive is told by the writer's lock, never by age; an empty tmp
    of a dead writer (killed before it wrote) is removed.
    """
    recovered = 0
    now = time.time()
    alive: dict[str, bool] = {}
    for n in regular_names:
        if not is_tmp_name(n):
            continue
        p = path / n
        parts = parse_name(stem_of(n[1:-len(".tmp")]))
        if parts is not None:
            if parts.writer not in alive:
                # A writer of this process is alive whatever its lock says: a stopped queue has
                # released its lock, yet may still be writing (an empty tmp between open and flock).
                alive[parts.writer] = (parts.writer == own_writer or is_writer_of_this_process(parts.writer)
                                       or writer_alive(path, parts.writer))
            if alive[parts.writer]:
                continue
        else:
            try:
                if now - p.stat().st_mtime < _FOREIGN_TMP_AGE_S:
                    continue
            except FileNotFoundError:
                continue
        fd = try_flock(p)
        if fd is None:
            continue  # its writer is still writing
        try:
            if os.fstat(fd).st_size == 0:
                os.unlink(p)
                log.info("spill.remove_empty_tmp", extra={"event": "spill.remove_empty_tmp", "file": n})
                continue
            final = path / n[1:-len(".tmp")]
            os.rename(p, final)
            recovered += 1
            log.warning("spill.recover_tmp", extra={"event": "spill.recover_tmp", "file": final.name})
        finally:
            unlock(fd)
    if recovered:
        fsync_dir(path)
    return recovered


def remove_stale_writer_locks(path: Path, names: list[str], own_writer: str) -> int:
    """Remove lock files of dead writers with no files left. Call under the replay lock."""
    writers_with_files = {p.writer for n in names if not n.startswith(".writer-")
                          and (p := parse_name(stem_of(n.lstrip(".").removesuffix(".tmp"))))}
    removed = 0
    for n in names:
        if not (n.startswith(".writer-") and n.endswith(".lock")):
            continue
        writer = n[len(".writer-"):-len(".lock")]
        if writer == own_writer or writer in writers_with_files:
            continue
        fd = try_flock(path / n)
        if fd is None:
            continue  # alive
        try:
            os.unlink(path / n)
            removed += 1
        except OSError:
            pass
        finally:
            unlock(fd)
    return removed
