"""JournalWriter: one queue's segments — append, roll, fsync, retire.

Guarantees (write-ahead mode):

- Process death: :meth:`JournalWriter.append_locked` returns only after one
  ``os.write`` of the whole record to a segment opened ``O_APPEND``: the bytes
  are in the kernel's page cache and outlive the process (SIGKILL, OOM kill,
  a segfault). A short or failed write is cut back (``ftruncate``) to the
  last whole record, so a live segment never holds half a record.
- Power loss (``fsync-interval``): a background thread fsyncs every
  ``fsync_interval`` (group commit, like Redis ``appendfsync everysec``);
  :meth:`wait_synced` blocks until a given call is on stable storage
  (``fsync-always`` waits in every enqueue).
- Segments roll at ``segment_bytes``; a closed segment is deleted only when
  every record in it is at or below the done-watermark (every call up to it
  is in the store), and the watermark is checkpointed first.
- A removed directory (an operator's ``rm -rf``): the thread notices the
  segment is unlinked, and the next append recreates the directory and
  re-writes the records the store does not have yet into a new segment.

Locking: ``lock`` guards every field; the hot path holds it for one encode
and one ``os.write``. fsync runs on a ``dup`` of the fd, outside the lock.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

from ..jsoncodec import encode
from .checkpoint import remove_checkpoint, write_checkpoint
from .format import FRAME, JournalHeader, frame, segment_start
from .reader import Record, scan_records

__all__ = ["Durability", "JournalFailed", "JournalWriter", "Segment"]

_frame_pack = FRAME.pack
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class Durability(Enum):
    """What an accepted entry survives before the store has it (see README, "Choosing a durability level")."""

    MEMORY = "memory"  # nothing is journaled: the default, today's behaviour
    PROCESS = "process"  # journaled (page cache) before enqueue returns: survives the process's death
    FSYNC_INTERVAL = "fsync-interval"  # + fsynced every fsync_interval_ms: power loss loses at most that window
    FSYNC_ALWAYS = "fsync-always"  # + fsynced (group commit) before enqueue returns

    @property
    def journaled(self) -> bool:
        return self is not Durability.MEMORY

    @property
    def fsyncs(self) -> bool:
        return self in (Durability.FSYNC_INTERVAL, Durability.FSYNC_ALWAYS)


class JournalFailed(OSError):
    """The journal cannot take records right now (it failed recently and waits before retrying)."""


class Segment:
    __slots__ = ("path", "fd", "size", "data_start", "first_seq", "last_seq", "created", "closed", "dirty",
                 "unlinked")

    def __init__(self, path: Path, fd: int, size: int):
        self.path = path
        self.fd = fd
        self.size = size  # bytes of whole records (what a reader may read)
        self.data_start = size  # the first record's offset (after the header)
        self.first_seq = 0
        self.last_seq = 0  # 0: no record yet
        self.created = time.time()
        self.closed = False
        self.dirty = False  # written since the last fsync
        self.unlinked = False  # its file was removed under us


class JournalWriter:
    """The segments of one queue run. ``directory`` is the queue's :class:`~iai_queue.spill.SpillDirectory`."""

    def __init__(self, directory, prefix: str, durability: Durability, *, segment_bytes: int = 16 << 20,
                 fsync_interval_s: float = 0.1, retry_s: float = 1.0):
        self.directory = directory
        self.prefix = prefix
        self.durability = durability
        self.segment_bytes = segment_bytes
        self.fsync_interval_s = fsync_interval_s
        self.retry_s = retry_s
        self.lock = threading.Lock()
        self.synced = threading.Condition(threading.Lock())
        self.sync_wanted = threading.Event()
        self.segments: list[Segment] = []  # oldest first; the last one is written while open
        self.current: Optional[Segment] = None
        self.failing = False
        self.retry_at = 0.0
        self.last_error: Optional[OSError] = None
        self.appended_seq = 0
        self.synced_seq = 0
        self.synced_at = time.monotonic()
        self.checkpointed = -1
        self.closed = False
        self.dir_dirty = False  # a segment was created since the last fsync of the directory
        self.bytes_total = 0  # bytes in our segments on disk (live ones)
        self.remaining_after_close = False

    # -- opening, rolling ----------------------------------------------------------------

    def open(self) -> None:
        """Hold the writer lock and start the first segment. Raises OSError (the caller falls back)."""
        with self.lock:
            self._roll_locked()

    def _roll_locked(self) -> Segment:
        directory = self.directory
        directory.hold_writer_lock()  # creates (or re-creates) the directory, 0o700
        old = self.current
        if old is not None:
            old.closed = True  # its fd stays open for backlog reads until the segment is retired
        path = directory.path / (directory.next_stem() + ".wal")
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        try:
            start = segment_start(JournalHeader(directory.writer, self.prefix, directory.store, time.time_ns()))
            if os.write(fd, start) != len(start):
                raise OSError(errno.ENOSPC, "short write of a journal segment header")
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        seg = Segment(path, fd, len(start))
        seg.dirty = True
        self.segments.append(seg)
        self.current = seg
        self.bytes_total += len(start)
        self.dir_dirty = True
        self._relocate_unlinked_locked(seg)
        return seg

    def _relocate_unlinked_locked(self, into: Segment) -> None:
        """Records of segments whose file was removed, not yet done, written again into ``into``."""
        lost = [s for s in self.segments if s.unlinked and s.last_seq > self.checkpointed_floor]
        if not lost:
            return
        data = b"".join(frame(encode((r.seq, r.items))) for s in lost for r in self.read_records(s, s.data_start)[0]
                        if r.seq > self.checkpointed_floor)
        if data:
            self._write_locked(into, data)
            into.first_seq = into.first_seq or min(s.first_seq for s in lost)
            into.last_seq = max(into.last_seq, max(s.last_seq for s in lost))

    checkpointed_floor = 0  # the done-watermark last seen by retire(): records at or below it need no copy

    # -- the hot path -------------------------------------------------------------------

    def append_locked(self, seq: int, items) -> tuple[Segment, int]:
        """Write one call's record; returns ``(segment, offset)``. Lock held.

        Raises TypeError for an entry JSON cannot hold (nothing written), and
        OSError when the disk refuses (the segment is cut back to its last whole
        record and the writer waits ``retry_s`` before trying a new segment).
        """
        seg = self.current
        if self.failing or seg is None:
            if time.monotonic() < self.retry_at or self.closed:
                raise JournalFailed(errno.EAGAIN, f"journal failing: {self.last_error}")
            try:
                seg = self._roll_locked()
            except OSError as exc:
                self._failed_locked(exc)
                raise
            self.failing = False
        payload = encode((seq, items))
        record = _frame_pack(len(payload), _crc(payload)) + payload
        offset = seg.size
        self._write_locked(seg, record)
        if not seg.first_seq:
            seg.first_seq = seq
        seg.last_seq = seq
        self.appended_seq = seq
        if seg.size >= self.segment_bytes:
            try:
                self._roll_locked()
            except OSError as exc:
                self._failed_locked(exc)  # this record is safe; the next append retries later
        return seg, offset

    def _write_locked(self, seg: Segment, data: bytes) -> None:
        try:
            n = os.write(seg.fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, f"short write to the journal ({n} of {len(data)} bytes)")
        except OSError as exc:
            try:
                os.ftruncate(seg.fd, seg.size)  # never leave half a record in a live segment
            except OSError:
                pass
            self._failed_locked(exc)
            raise
        seg.size += len(data)
        seg.dirty = True
        self.bytes_total += len(data)

    def _failed_locked(self, exc: OSError) -> None:
        self.failing = True
        self.last_error = exc
        self.retry_at = time.monotonic() + self.retry_s
        if self.current is not None:
            self.current.closed = True
            self.current = None

    # -- reading our own segments (the backlog) -----------------------------------------

    def read_records(self, seg: Segment, offset: int, end: Optional[int] = None) -> tuple[list[Record], int]:
        """Whole records of ``seg`` from ``offset`` up to ``end`` (default: its size now); and where they end."""
        end = seg.size if end is None else end
        if end <= offset:
            return [], offset
        data = os.pread(seg.fd, end - offset, offset)
        records, _ = scan_records(data, 0, 0, resync=False)
        out = [Record(r.offset + offset, r.end + offset, r.seq, r.items) for r in records]
        return out, (out[-1].end if out else offset)

    # -- the journal thread: fsync, retire, checkpoint ------------------------------------

    def sync(self) -> None:
        """fsync every segment written since the last sync (on dups of their fds, outside the lock)."""
        with self.lock:
            target = self.appended_seq
            fds = []
            for s in self.segments:
                if s.dirty and not s.unlinked:
                    s.dirty = False
                    fds.append(os.dup(s.fd))
            dir_dirty, self.dir_dirty = self.dir_dirty, False
        try:
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        if dir_dirty:
            from ..spill.directory import fsync_dir

            try:
                fsync_dir(self.directory.path)
            except OSError:
                pass
        with self.synced:
            self.synced_seq = max(self.synced_seq, target)
            self.synced_at = time.monotonic()
            self.synced.notify_all()

    def wait_synced(self, seq: int, timeout: float) -> bool:
        """Block until call ``seq`` is fsynced (asks the thread for a sync now). False on timeout."""
        if self.synced_seq >= seq:
            return True
        self.sync_wanted.set()
        with self.synced:
            return self.synced.wait_for(lambda: self.synced_seq >= seq or self.closed, timeout) \
                and self.synced_seq >= seq

    def check_linked(self) -> None:
        """Notice segments removed under us; the next append starts a new one and copies what they held."""
        with self.lock:
            for s in self.segments:
                if not s.unlinked and os.fstat(s.fd).st_nlink == 0:
                    s.unlinked = True
                    if s is self.current:
                        self.current = None  # the next append rolls (and relocates)
                        s.closed = True

    def retire(self, done_seq: int, in_use: Callable[[Segment], bool] = lambda s: False) -> int:
        """Checkpoint ``done_seq``, then delete closed segments all of whose records are at or below it."""
        self.checkpointed_floor = max(self.checkpointed_floor, done_seq)
        if done_seq != self.checkpointed and self.segments:
            try:
                write_checkpoint(self.directory.path, self.directory.writer, done_seq)
                self.checkpointed = done_seq
            except OSError:
                return 0  # no checkpoint, no deletion
        removed = 0
        with self.lock:
            keep = []
            for s in self.segments:
                if s.closed and s is not self.current and s.last_seq <= done_seq and not in_use(s):
                    try:
                        if not s.unlinked:
                            os.unlink(s.path)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        keep.append(s)
                        continue
                    os.close(s.fd)
                    self.bytes_total -= s.size
                    removed += 1
                else:
                    keep.append(s)
            self.segments = keep
        return removed

    def close(self, done_seq: int) -> None:
        """Stop taking records: fsync (in fsync modes), checkpoint, delete what the store has, close the fds."""
        with self.lock:
            self.closed = True
            if self.current is not None:
                self.current.closed = True
                self.current = None
        if self.durability.fsyncs:
            try:
                self.sync()
            except OSError:
                pass
        self.retire(done_seq)
        with self.lock:
            self.remaining_after_close = any(s.last_seq for s in self.segments)
            for s in self.segments:
                os.close(s.fd)
            if not any(s.last_seq for s in self.segments):
                for s in self.segments:  # header-only segments hold nothing
                    try:
                        os.unlink(s.path)
                    except OSError:
                        pass
            self.segments = []
        if not self.remaining_after_close:
            remove_checkpoint(self.directory.path, self.directory.writer)
        with self.synced:
            self.synced.notify_all()

    # -- numbers for stats() ----------------------------------------------------------------

    def fsync_lag_s(self) -> float:
        if not self.durability.fsyncs or self.synced_seq >= self.appended_seq:
            return 0.0
        return time.monotonic() - self.synced_at


from zlib import crc32 as _crc  # noqa: E402  (bound once for the hot path)
