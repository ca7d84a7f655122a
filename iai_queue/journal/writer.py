"""JournalWriter: one queue's segments — append, roll, fsync, retire; the policy over :mod:`.segment`.

Guarantees (write-ahead mode):

- Process death: :meth:`JournalWriter.append_locked` returns only after the
  whole record is in the kernel's page cache, where it outlives the process
  (SIGKILL, OOM kill, a segfault): one copy into a segment's shared mapping
  of reserved blocks, or one ``pwrite`` (how, and why a full disk shows as
  ``ENOSPC``, never SIGBUS: :mod:`.segment`). A failed reservation or write
  is the caller's fallback: a short or failed ``pwrite`` is cut back
  (``ftruncate``) to the last whole record, a failed segment is finished (cut
  to its used size) and the writer waits ``retry_s`` before a new one.
- Power loss (``fsync-interval``): a background thread fsyncs every
  ``fsync_interval`` (group commit, like Redis ``appendfsync everysec``);
  :meth:`wait_synced` blocks until a given call is on stable storage
  (``fsync-always`` waits in every enqueue). On Linux ``fsync`` of the file
  writes back pages dirtied through a shared mapping too.
- Segments roll at ``segment_bytes``; a closed segment is deleted only when
  every record in it is at or below the done-watermark (every call up to it
  is in the store), and the watermark is checkpointed first.
- A removed directory (an operator's ``rm -rf``): the thread notices the
  segment is unlinked, and the next append recreates the directory and
  re-writes the records the store does not have yet into a new segment.

Locking: ``lock`` guards every field; the hot path holds it for one encode
and one copy into the mapping. fsync runs on a ``dup`` of the fd, outside the lock.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from enum import Enum
from typing import Callable, Optional

from ..jsoncodec import OPTIONS, encode
from .checkpoint import remove_checkpoint, write_checkpoint
from .format import FRAME, JournalHeader, frame, segment_start
from .reader import Record
from .segment import EXTENT_BYTES, MAPPED, Segment, SegmentFiles, fsync_segments, unsynced_segments

__all__ = ["Durability", "JournalFailed", "JournalWriter", "Segment"]

_frame_pack = FRAME.pack
_FRAME_SIZE = FRAME.size
_record_packers: dict[int, Callable] = {}  # payload length -> pack_into of a whole record (FRAME + payload)


def _record_packer(n: int) -> Callable:
    """``pack_into(buffer, offset, n, crc, payload)`` of a record with an ``n``-byte payload, cached by ``n``
    (at most 4096 lengths: the cache starts over when it is full)."""
    if len(_record_packers) >= 4096:
        _record_packers.clear()
    pack = _record_packers[n] = struct.Struct(FRAME.format + f"{n}s").pack_into
    return pack


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


class JournalWriter:
    """The segments of one queue run. ``directory`` is the queue's :class:`~iai_queue.spill.SpillDirectory`."""

    def __init__(self, directory, prefix: str, durability: Durability, *, segment_bytes: int = 16 << 20,
                 fsync_interval_s: float = 0.1, retry_s: float = 1.0, mapped: bool = True,
                 extent_bytes: int = EXTENT_BYTES, populate: bool = True):
        self.directory = directory
        self.prefix = prefix
        self.durability = durability
        self.segment_bytes = segment_bytes
        self.fsync_interval_s = fsync_interval_s
        self.retry_s = retry_s
        self.mapped = mapped  # False: pwrite every record (the portable path; also for comparison)
        self.files = SegmentFiles(extent_bytes, populate)
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
        self.checkpointed_floor = 0  # the done-watermark retire() last saw: records at or below it need no copy
        self.closed = False
        self.accepting = False  # admission journals calls into it: from its run's start until stop() begins
        self.dir_dirty = False  # a segment was created since the last fsync of the directory
        self.remaining_after_close = False

    # -- opening, rolling ----------------------------------------------------------------

    def open(self) -> None:
        """Hold the writer lock and start the first segment. Raises OSError (the caller falls back)."""
        with self.lock:
            self._roll_locked()

    def _roll_locked(self, need: int = 0) -> Segment:
        """A new current segment with room for a ``need``-byte record; the old one is finished."""
        directory = self.directory
        directory.hold_writer_lock()  # creates (or re-creates) the directory, 0o700
        old = self.current
        if old is not None:
            old.finish()  # its fd stays open for backlog reads until the segment is retired
        path = directory.path / (directory.next_stem() + ".wal")
        start = segment_start(JournalHeader(directory.writer, self.prefix, directory.store, time.time_ns()))
        seg = self.files.create(path, start, max(self.segment_bytes, len(start) + need), need,
                                mapped=self.mapped and MAPPED)
        self.segments.append(seg)
        self.current = seg
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

    # -- the hot path -------------------------------------------------------------------

    def append_locked(self, seq: int, items) -> tuple[Segment, int]:
        """Write one call's record; returns ``(segment, offset)``. Lock held.

        Raises TypeError for an entry JSON cannot hold (nothing written), and
        OSError when the disk refuses (nothing of the record stays in a live
        segment, and the writer waits ``retry_s`` before trying a new segment).
        """
        seg = self.current
        if seg is None:
            seg = self._reopen_locked()
        try:  # jsoncodec.encode, without its Python frame
            payload = _dumps((seq, items))
        except TypeError:
            payload = _dumps((seq, items), option=OPTIONS)
        n = len(payload)
        offset = seg.size
        end = offset + _FRAME_SIZE + n
        if end > seg.capacity and seg.last_seq:
            seg = self._roll_or_fail_locked(_FRAME_SIZE + n)
            offset = seg.size
            end = offset + _FRAME_SIZE + n
        m = seg.map
        if m is not None and end <= seg.reserved:
            # Frame and payload in one copy: a kill mid-copy leaves a torn record, told from the end (.segment).
            pack = _record_packers.get(n) or _record_packer(n)
            pack(m, offset, n, _crc(payload), payload)
            seg.size = end
        else:
            self._write_locked(seg, _frame_pack(n, _crc(payload)) + payload)
        if not seg.first_seq:
            seg.first_seq = seq
        seg.last_seq = seq
        self.appended_seq = seq
        return seg, offset

    def _reopen_locked(self) -> Segment:
        """No current segment (the journal failed, or its file was removed): a new one, unless it failed
        less than ``retry_s`` ago."""
        if time.monotonic() < self.retry_at or self.closed:
            raise JournalFailed(errno.EAGAIN, f"journal failing: {self.last_error}")
        seg = self._roll_or_fail_locked()
        self.failing = False
        return seg

    def _roll_or_fail_locked(self, need: int = 0) -> Segment:
        try:
            return self._roll_locked(need)
        except OSError as exc:
            self._failed_locked(exc)
            raise

    def _write_locked(self, seg: Segment, data: bytes) -> None:
        """``data`` (whole records) after ``seg``'s last record; OSError: nothing of it stays there."""
        size = seg.size
        end = size + len(data)
        m = seg.map
        if m is not None and end <= seg.reserved:
            m[size:end] = data  # cut short by a kill: a torn record, or a zero length before data; never a false end
        else:
            try:
                if m is not None and end <= seg.capacity:
                    self.files.reserve(seg, end)
                    m[size:end] = data
                else:
                    n = os.pwrite(seg.fd, data, size)
                    if n != len(data):
                        raise OSError(errno.ENOSPC, f"short write to the journal ({n} of {len(data)} bytes)")
            except OSError as exc:
                if m is None or end > seg.capacity:  # (a mapped segment is unmapped by _failed_locked at once)
                    seg.cut_back(size)  # never leave half a record in a live segment
                self._failed_locked(exc)
                raise
        seg.size = end

    def _failed_locked(self, exc: OSError) -> None:
        self.failing = True
        self.last_error = exc
        self.retry_at = time.monotonic() + self.retry_s
        if self.current is not None:
            self.current.finish()
            self.current = None

    def read_records(self, seg: Segment, offset: int, end: Optional[int] = None,
                     limit: Optional[int] = None) -> tuple[list[Record], int]:
        """(The backlog's reads.) Whole records of ``seg`` from ``offset`` up to ``end`` (default: its size
        now), at most ``limit`` of them; and where they end."""
        return seg.read_records(offset, end, limit)

    # -- the journal thread: fsync, retire, checkpoint ------------------------------------

    def sync(self) -> None:
        """fsync every segment written since the last sync (on dups of their fds, outside the lock)."""
        with self.lock:
            target = self.appended_seq
            unsynced = unsynced_segments(self.segments)
            dir_dirty, self.dir_dirty = self.dir_dirty, False
        fsync_segments(unsynced)
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
                if not s.unlinked and s.file_removed():
                    s.unlinked = True
                    if s is self.current:
                        self.current = None  # the next append rolls (and relocates)
                        s.finish()

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
                if s.closed and s is not self.current and s.last_seq <= done_seq and not in_use(s) and s.delete():
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
                self.current.finish()
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
            if not self.remaining_after_close:
                for s in self.segments:  # header-only segments hold nothing
                    s.remove_file()
            self.segments = []
        if not self.remaining_after_close:
            remove_checkpoint(self.directory.path, self.directory.writer)
        with self.synced:
            self.synced.notify_all()

    def stats_locked(self) -> dict:
        """``journal_bytes``, ``journal_segments`` and ``fsync_lag_s`` (lock held)."""
        segments = [s for s in self.segments if not s.unlinked]
        lagging = self.durability.fsyncs and self.synced_seq < self.appended_seq
        return dict(journal_bytes=sum(s.size for s in segments), journal_segments=len(segments),
                    fsync_lag_s=round(time.monotonic() - self.synced_at, 6) if lagging else 0.0)


from .format import crc32 as _crc  # noqa: E402  (bound once for the hot path)

from orjson import dumps as _dumps  # noqa: E402
