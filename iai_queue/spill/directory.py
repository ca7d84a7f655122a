"""One queue's view of a spill directory: it writes its own files and claims the ones it may replay.

Where: ``spill_dir``, else env ``IAI_QUEUE_SPILL_DIR``, else
``~/.iai-mcp/.provenance-overflow``. Created on the first spill only.

Durability
    A file is written under its temporary name, fsynced, renamed, and the
    directory fsynced: no reader ever sees half a ``.jsonl`` (primitives in
    :mod:`.durable`).

Claims (several processes, one directory)
    A live queue holds ``flock`` on ``.writer-<writer>.lock``: its files are
    replayed by it alone, which keeps its order. Files of writers that hold no
    lock (dead, stopped, or older writers) are orphans, replayed by whoever
    holds ``.replay.lock``, one process at a time. The kernel drops a dead
    process's locks, so its claims become claimable on their own. A ``.claimed``
    file found by a new holder was cut short by a crash: it is replayed with
    every line verified, so nothing is applied twice. A ``.tmp`` file whose
    writer is gone (its ``flock`` is free) is renamed to its final name
    (:mod:`.housekeeping`, with the removal of dead writers' lock files).

Quarantine
    Bad lines are set aside for an operator, never deleted unread: the file
    names and the guarantee are in :mod:`.quarantine_files`.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .codec import BadLine
from .durable import ensure_private_dir, fsync_dir, write_all
from .housekeeping import recover_tmp_files, remove_stale_writer_locks, writer_alive
from .locks import lock_fd, locks_available, try_flock, unlock
from .quarantine_files import quarantine_bytes, quarantine_lines, quarantine_whole
from .stores import record_store_location
from .names import (REPLAY_LOCK, file_name, file_stem, is_pending_name, is_tmp_name, new_writer_name, parse_name,
                    stem_of, store_tag, writer_lock_name)

__all__ = ["SpillDirectory", "ensure_private_dir", "fsync_dir"]

_TMP_ATTEMPTS = 3


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        st, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (named.st_dev, named.st_ino)


class SpillDirectory:
    """One queue's view of a spill directory: writes its own files, replays files it may claim.

    ``write`` may be called from any thread, and is looked up on the instance
    at every call (a test or host may wrap it, as with the store's append);
    everything else is the replaying worker's.
    """

    def __init__(self, path: os.PathLike[str] | str, *, store_path=None, tag: Optional[str] = None):
        """``tag``: the store's identity for file names (``MemoryStore.identity``: the same on every
        host, credentials never in it); else derived from ``store_path``."""
        self.path = Path(path)
        self.store = tag if tag is not None else store_tag(store_path)
        self._store_path = store_path
        self.writer = new_writer_name()
        self._counter = 0
        self._last_ts = 0
        self._writer_fd: Optional[int] = None
        self._dir_ready = False  # created (or checked), and _last_ts above every file already there
        self._released = False  # a stopped queue's later files are orphans at once: no writer lock re-taken
        self._write_lock = threading.Lock()  # the spill thread, stop() and late enqueues all write

    # -- writing ---------------------------------------------------------------

    def _ensure_dir(self) -> None:
        """Called under the write lock before every write: the directory, our writer lock, our clock."""
        if not self._dir_ready or not self.path.is_dir():
            ensure_private_dir(self.path)
            record_store_location(self.path, self._store_path)  # tag -> location, for operators
            # Order must not depend on clocks agreeing: name our files after every file already here.
            newest = max((p.ts for n in self.names() if (p := parse_name(stem_of(n.lstrip(".").removesuffix(".tmp"))))),
                         default=0)
            self._last_ts = max(self._last_ts, newest)
            self._dir_ready = True
        if self._writer_fd is not None and os.fstat(self._writer_fd).st_nlink == 0:
            unlock(self._writer_fd)  # the directory was removed under us: our lock file with it
            self._writer_fd = None
        if self._writer_fd is None and not self._released:
            # Held while this queue lives: our files are ours to replay, in order.
            self._writer_fd = try_flock(self.path / writer_lock_name(self.writer))

    def hold_writer_lock(self) -> None:
        """Create (or check) the directory and hold our writer lock now (the journal writes from the start)."""
        with self._write_lock:
            self._ensure_dir()
            if self._writer_fd is None:
                raise OSError(f"cannot lock {self.path / writer_lock_name(self.writer)}")

    def next_stem(self) -> str:
        """A stem for a new file of ours, named after every file already here (a journal segment)."""
        with self._write_lock:
            self._ensure_dir()
            self._counter += 1
            self._last_ts = max(time.time_ns(), self._last_ts + 1)
            return file_stem(self._last_ts, self.store, self.writer, self._counter)

    def record_store(self) -> None:
        """Name our store in the directory's tag -> location map, if the directory exists (never creates it)."""
        record_store_location(self.path, self._store_path)

    def quarantine_stem(self, kind: str) -> str:
        """A stem for pairs this queue sets aside: named like our spill files, plus ``-<kind>``."""
        with self._write_lock:
            self._counter += 1
            return file_stem(max(time.time_ns(), self._last_ts + 1), self.store, self.writer, self._counter, kind)

    def write(self, lines: Sequence[bytes], *, before_ts: Optional[int] = None,
              on_named: Optional[Callable[[str], None]] = None) -> Path:
        """Write ``lines`` as a new spill file, durably; returns its path.

        ``before_ts``: name the file older than this timestamp, so it replays
        before files already written (used when older pairs are spilled late).
        ``on_named``: called with the file's name before it becomes visible
        (a replayer may take it the moment it is renamed into place).
        Raises OSError (ENOSPC, EACCES, EROFS, …); nothing is left behind then.
        """
        for _ in range(_TMP_ATTEMPTS):
            with self._write_lock:
                self._ensure_dir()
                ts = max(time.time_ns(), self._last_ts + 1) if before_ts is None else before_ts - 1
                if before_ts is None:
                    self._last_ts = ts
                self._counter += 1
                name = file_name(ts, self.store, self.writer, self._counter)
            tmp = self.path / f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                lock_fd(fd)  # tells a recoverer this tmp is alive
                named = _still_named(fd, tmp)
            except BaseException:
                os.close(fd)
                raise
            if named:
                break
            # A recoverer took the empty tmp between open and lock (our writer lock was released: a
            # stopped queue's late spill looks like a dead writer's to another process): a new one.
            os.close(fd)
        else:
            raise OSError(errno.EAGAIN, f"spill temp files in {self.path} removed {_TMP_ATTEMPTS} times as we wrote")
        try:
            write_all(fd, b"".join(lines))
            os.fsync(fd)
            if on_named is not None:
                on_named(name)
            os.rename(tmp, self.path / name)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
        fsync_dir(self.path)
        return self.path / name

    def reopen(self) -> None:
        """The queue runs (again): its next write takes the writer lock."""
        self._released = False

    def release(self) -> None:
        """Give up the writer lock; our remaining files, and any we write until :meth:`reopen`, are
        orphans for anyone to replay (whoever replaces a stopped queue sees them at once)."""
        self._released = True
        fd, self._writer_fd = self._writer_fd, None
        if fd is not None:
            if not any(self._is_own(n) for n in self.names()):
                try:
                    os.unlink(self.path / writer_lock_name(self.writer))
                except OSError:
                    pass
            unlock(fd)

    def forget_after_fork(self) -> None:
        """In a forked child: close our copy of the writer lock's fd (the parent still holds the lock)."""
        fd, self._writer_fd = self._writer_fd, None
        if fd is not None:
            os.close(fd)

    # -- reading the directory ---------------------------------------------------

    def names(self) -> list[str]:
        """Every name in the directory; empty when it does not exist (yet) or a file is in the way."""
        try:
            return os.listdir(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def regular_names(self) -> list[str]:
        """Names of regular files only: a FIFO, a device or a symlink is never opened or followed."""
        try:
            with os.scandir(self.path) as it:
                return [e.name for e in it if e.is_file(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _is_own(self, name: str) -> bool:
        parts = parse_name(stem_of(name))
        return parts is not None and parts.writer == self.writer

    def own_files(self) -> list[str]:
        """Our pending and claimed files (tmp files included), any order."""
        return [n for n in self.names()
                if self.writer in n and (is_pending_name(n) or n.endswith((".claimed", ".tmp")))]

    def oldest_own_ts(self) -> Optional[int]:
        stamps = [p.ts for n in self.own_files() if (p := parse_name(stem_of(n.lstrip(".").removesuffix(".tmp"))))]
        return min(stamps) if stamps else None

    def has_tmp_files(self) -> bool:
        return any(is_tmp_name(n) for n in self.regular_names())

    def replayable(self) -> list[tuple[str, bool]]:
        """Files this queue may replay now, oldest first: ``(name, own)``.

        Ours, and orphans of our store (or of no known store) whose writer
        holds no lock. The caller must hold the replay lock for orphans.
        Nothing where file locks are unavailable (alive cannot be told from dead).
        """
        if not locks_available():
            return []
        alive: dict[str, bool] = {}
        out = []
        for n in self.regular_names():
            if not (is_pending_name(n) or n.endswith(".claimed")):
                continue
            parts = parse_name(stem_of(n))
            if parts is None:
                out.append((n, False))  # an older writer's file: any store may take it
                continue
            if parts.store != self.store:
                continue
            w = parts.writer
            if w == self.writer:
                out.append((n, True))
                continue
            if w not in alive:
                alive[w] = writer_alive(self.path, w)
            if not alive[w]:
                out.append((n, False))
        out.sort(key=lambda item: stem_of(item[0]))
        return out

    # -- replay --------------------------------------------------------------------

    @contextmanager
    def replay_lock(self) -> Iterator[bool]:
        """Hold the directory's replay lock for the block; yields False while another process holds it."""
        fd = try_flock(self.path / REPLAY_LOCK) if self.path.is_dir() and locks_available() else None
        try:
            yield fd is not None
        finally:
            unlock(fd)

    def recover_tmp_files(self) -> int:
        """Rename spill temp files whose writer is gone to their final name (see :mod:`.housekeeping`).
        Call under the replay lock."""
        return recover_tmp_files(self.path, self.regular_names(), self.writer)

    def remove_stale_writer_locks(self) -> int:
        """Remove lock files of dead writers with no files left. Call under the replay lock."""
        return remove_stale_writer_locks(self.path, self.names(), self.writer)

    def claim(self, name: str) -> tuple[Path, bool]:
        """Move a pending file to its claimed name. Returns (claimed path, recovered):
        ``recovered`` is True for a file that was already claimed, i.e. cut short by a crash."""
        if name.endswith(".claimed"):
            return self.path / name, True
        claimed = self.path / (stem_of(name) + ".claimed")
        os.rename(self.path / name, claimed)
        return claimed, False

    def remove(self, claimed: Path) -> None:
        os.unlink(claimed)

    def quarantine(self, stem: str, bad: Iterable[BadLine], whole: Optional[Path] = None) -> Path:
        """Set bad lines aside as ``<stem>.failed-<unix_ts>.jsonl`` plus a ``.reason`` file (see
        :mod:`.quarantine_files`). ``whole``: move that file there as it is (nothing in it was good)."""
        return quarantine_lines(self.path, stem, bad, whole)

    def set_aside(self, stem: str, src: Path, reason: str, suffix: str) -> Path:
        """Move ``src`` aside unread, as ``<stem>.failed-<unix_ts><suffix>`` plus a ``.reason`` file."""
        return quarantine_whole(self.path, stem, src, reason, suffix)

    def quarantine_bytes(self, stem: str, data: bytes, reasons: str, suffix: str = ".wal") -> Path:
        """Set raw bytes aside, byte for byte, as ``<stem>.failed-<unix_ts><suffix>`` plus a ``.reason`` file."""
        return quarantine_bytes(self.path, stem, data, reasons, suffix)
