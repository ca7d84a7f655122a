"""JournalWriter: one queue's segments — append, roll, fsync, retire.

Guarantees (write-ahead mode):

- Process death: :meth:`JournalWriter.append_locked` returns only after the
  whole record is in the kernel's page cache, where it outlives the process
  (SIGKILL, OOM kill, a segfault). On Linux a segment is a shared memory
  mapping (``mmap``, ``MAP_SHARED``) of a file whose blocks were reserved with
  ``posix_fallocate`` before any record is copied into them: a store into the
  mapping is a store into the page cache, exactly what ``write()`` achieves,
  without a system call per record. Space is reserved in extents as the
  segment grows, so a full disk shows as ``ENOSPC`` from ``posix_fallocate``
  (the caller's fallback), never as SIGBUS on a later store. Elsewhere (no
  ``posix_fallocate``) every record is one ``pwrite``; a short or failed write
  is cut back (``ftruncate``) to the last whole record.
- A segment's unused rest is zeros (format version 2, see :mod:`.format`): a
  reader tells the end of the data (a zero length with only zeros after it)
  from a torn record (a bad checksum, a short payload, or a zero length with
  data after it), whatever order a copy cut short by a kill stored its bytes in. A segment is cut to its used size when it rolls or closes; a
  writer that dies leaves the zeros, which readers skip.
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
import mmap
import os
import sys
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

from ..jsoncodec import OPTIONS, encode


from .checkpoint import remove_checkpoint, write_checkpoint
from .format import FRAME, JournalHeader, frame, segment_start
from .reader import Record, scan_records

__all__ = ["Durability", "JournalFailed", "JournalWriter", "Segment"]

_frame_pack = FRAME.pack
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

# Mapped segments where the platform gives both halves of the guarantee: reserved blocks
# (posix_fallocate) and fsync covering stores through a shared mapping (Linux).
MAPPED = sys.platform.startswith("linux") and hasattr(os, "posix_fallocate")
EXTENT_BYTES = 256 << 10  # blocks are reserved (and their pages faulted in) this much at a time
# madvise(MADV_POPULATE_WRITE) (Linux >= 5.14; the constant is part of the kernel ABI): fault the pages of a
# fresh extent in writable at once, instead of one page fault per 4 KiB of records. Best effort.
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23) if MAPPED else None


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
    __slots__ = ("path", "fd", "size", "data_start", "first_seq", "last_seq", "created", "closed", "synced_size",
                 "unlinked", "map", "capacity", "reserved")

    def __init__(self, path: Path, fd: int, size: int, capacity: int = 0, mapping: Optional[mmap.mmap] = None):
        self.path = path
        self.fd = fd
        self.size = size  # bytes of whole records (what a reader may read)
        self.capacity = max(capacity, size)  # records go in while they fit; then the writer rolls
        self.map = mapping  # the shared mapping of [0, capacity) while the segment is written; None: pwrite
        self.reserved = size  # blocks are reserved (posix_fallocate) for [0, reserved)
        self.data_start = size  # the first record's offset (after the header)
        self.first_seq = 0
        self.last_seq = 0  # 0: no record yet
        self.created = time.time()
        self.closed = False
        self.synced_size = 0  # bytes fsynced (size > synced_size: written since the last fsync)
        self.unlinked = False  # its file was removed under us


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
        self.extent_bytes = extent_bytes
        self.populate = populate
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
            self._finish_locked(old)  # its fd stays open for backlog reads until the segment is retired
        path = directory.path / (directory.next_stem() + ".wal")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        seg = None
        try:
            start = segment_start(JournalHeader(directory.writer, self.prefix, directory.store, time.time_ns()))
            if os.pwrite(fd, start, 0) != len(start):
                raise OSError(errno.ENOSPC, "short write of a journal segment header")
            capacity = max(self.segment_bytes, len(start) + need)
            seg = Segment(path, fd, len(start), capacity, self._map(fd, len(start), capacity))
            if seg.map is not None:
                self._reserve_locked(seg, seg.size + need)
        except BaseException:
            if seg is not None and seg.map is not None:
                seg.map.close()
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        self.segments.append(seg)
        self.current = seg
        self.dir_dirty = True
        self._relocate_unlinked_locked(seg)
        return seg

    def _map(self, fd: int, used: int, capacity: int) -> Optional[mmap.mmap]:
        """The segment's file made ``capacity`` long (a hole: nothing reserved yet) and mapped; None where
        mapping is not used or not possible (the segment is then written with pwrite)."""
        if not (self.mapped and MAPPED):
            return None
        try:
            os.ftruncate(fd, capacity)
            return mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):  # a filesystem that cannot map files: pwrite into an exact-size file
            os.ftruncate(fd, used)
            return None

    def _reserve_locked(self, seg: Segment, end: int) -> None:
        """Blocks reserved for ``[0, end)`` of a mapped segment, an extent at a time; raises OSError
        (ENOSPC) when the disk has no room even for ``end``: nothing was copied into the mapping then."""
        start = seg.reserved
        if end <= start:
            return
        to = min(seg.capacity, max(end, start + self.extent_bytes))
        try:
            os.posix_fallocate(seg.fd, start, to - start)
        except OSError as exc:
            if exc.errno != errno.ENOSPC or to == end:
                raise
            to = end  # nearly full: reserve just this record's bytes (slower, but nothing falls back yet)
            os.posix_fallocate(seg.fd, start, to - start)
        if _POPULATE_WRITE is not None and self.populate:
            page = mmap.PAGESIZE
            lo = start // page * page
            try:
                seg.map.madvise(_POPULATE_WRITE, lo, to - lo)
            except (OSError, ValueError):
                self.populate = False  # an older kernel: page faults instead
        seg.reserved = to

    def _finish_locked(self, seg: Segment) -> None:
        """No more records for ``seg``: unmap it and cut the unused, zero-filled rest (best effort: a
        reader skips a zero tail anyway)."""
        seg.closed = True
        m = seg.map
        if m is not None:
            seg.map = None
            m.close()
            try:
                os.ftruncate(seg.fd, seg.size)
            except OSError:
                pass
            seg.capacity = seg.reserved = seg.size

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
        OSError when the disk refuses (nothing of the record stays in a live
        segment, and the writer waits ``retry_s`` before trying a new segment).
        """
        seg = self.current
        if seg is None:
            seg = self._reopen_locked()
        payload = _dumps((seq, items), option=OPTIONS)  # jsoncodec.encode, without its Python frame
        record = _frame_pack(len(payload), _crc(payload)) + payload
        offset = seg.size
        if offset + len(record) > seg.capacity and seg.last_seq:
            try:
                seg = self._roll_locked(len(record))
            except OSError as exc:
                self._failed_locked(exc)
                raise
            offset = seg.size
        self._write_locked(seg, record)
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
        try:
            seg = self._roll_locked()
        except OSError as exc:
            self._failed_locked(exc)
            raise
        self.failing = False
        return seg

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
                    self._reserve_locked(seg, end)
                    m[size:end] = data
                else:
                    n = os.pwrite(seg.fd, data, size)
                    if n != len(data):
                        raise OSError(errno.ENOSPC, f"short write to the journal ({n} of {len(data)} bytes)")
            except OSError as exc:
                if m is None or end > seg.capacity:  # (a mapped segment is unmapped by _failed_locked at once)
                    try:
                        os.ftruncate(seg.fd, size)  # never leave half a record in a live segment
                    except OSError:
                        pass
                self._failed_locked(exc)
                raise
        seg.size = end

    def _failed_locked(self, exc: OSError) -> None:
        self.failing = True
        self.last_error = exc
        self.retry_at = time.monotonic() + self.retry_s
        if self.current is not None:
            self._finish_locked(self.current)
            self.current = None

    # -- reading our own segments (the backlog) -----------------------------------------

    def read_records(self, seg: Segment, offset: int, end: Optional[int] = None,
                     limit: Optional[int] = None) -> tuple[list[Record], int]:
        """Whole records of ``seg`` from ``offset`` up to ``end`` (default: its size now), at most ``limit``
        of them; and where they end."""
        end = seg.size if end is None else end
        if end <= offset:
            return [], offset
        data = os.pread(seg.fd, end - offset, offset)
        # Our own records, checksummed: their shape is the encoder's, so it is not checked again.
        records, _ = scan_records(data, 0, 0, resync=False, limit=limit, base=offset, check_payload=False)
        return records, (records[-1].end if records else offset)

    # -- the journal thread: fsync, retire, checkpoint ------------------------------------

    def sync(self) -> None:
        """fsync every segment written since the last sync (on dups of their fds, outside the lock)."""
        with self.lock:
            target = self.appended_seq
            fds = []
            done = []
            for s in self.segments:
                if s.size != s.synced_size and not s.unlinked:
                    done.append((s, s.size))
                    fds.append(os.dup(s.fd))
            dir_dirty, self.dir_dirty = self.dir_dirty, False
        try:
            for fd in fds:
                os.fsync(fd)  # on Linux this writes back pages dirtied through the shared mapping too
        finally:
            for fd in fds:
                os.close(fd)
        for s, size in done:
            s.synced_size = max(s.synced_size, size)
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
                        self._finish_locked(s)

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
                self._finish_locked(self.current)
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

from orjson import dumps as _dumps  # noqa: E402
