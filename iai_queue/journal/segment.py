"""Segment: one journal file — created, mapped, given blocks, written beyond them, cut to size, read back.

The mechanics under :class:`~iai_queue.journal.writer.JournalWriter` (which
decides when a segment rolls, is fsynced, retired, or given up on).
Guarantees:

- A record copied into a segment is in the kernel's page cache, where it
  outlives the process (SIGKILL, OOM kill, a segfault). On Linux a segment is
  a shared memory mapping (``mmap``, ``MAP_SHARED``) of a file whose blocks
  were reserved with ``posix_fallocate`` before any record is copied into
  them: a store into the mapping is a store into the page cache, exactly what
  ``write()`` achieves, without a system call per record. Space is reserved in
  extents as the segment grows (:meth:`SegmentFiles.reserve`), so a full disk
  shows as ``ENOSPC`` from ``posix_fallocate``, never as SIGBUS on a later
  store. Elsewhere (no ``posix_fallocate``, or a filesystem that cannot map
  files) every record is one ``pwrite``.
- A segment's unused rest is zeros (format version 2, see :mod:`.format`): a
  reader tells the end of the data (a zero length with only zeros after it)
  from a torn record (a bad checksum, a short payload, or a zero length with
  data after it), whatever order a copy cut short by a kill stored its bytes
  in. A segment is cut to its used size when it is finished
  (:meth:`Segment.finish`: it rolled, failed or closed); a writer that dies
  leaves the zeros, which readers skip.
- A segment is created exclusively (``O_EXCL``, no symlink followed, 0o600);
  one that cannot get its header or its first reservation is removed again.

Not locked here: the writer's lock guards every segment.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .reader import Record, scan_records

__all__ = ["EXTENT_BYTES", "MAPPED", "Segment", "SegmentFiles", "fsync_segments", "unsynced_segments"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

# Mapped segments where the platform gives both halves of the guarantee: reserved blocks
# (posix_fallocate) and fsync covering stores through a shared mapping (Linux).
MAPPED = sys.platform.startswith("linux") and hasattr(os, "posix_fallocate")
EXTENT_BYTES = 256 << 10  # blocks are reserved (and their pages faulted in) this much at a time
# madvise(MADV_POPULATE_WRITE) (Linux >= 5.14; the constant is part of the kernel ABI): fault the pages of a
# fresh extent in writable at once, instead of one page fault per 4 KiB of records. Best effort.
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23) if MAPPED else None


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

    def finish(self) -> None:
        """No more records: unmap it and cut the unused, zero-filled rest (best effort: a reader skips a
        zero tail anyway)."""
        self.closed = True
        m = self.map
        if m is not None:
            self.map = None
            m.close()
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            self.capacity = self.reserved = self.size

    def read_records(self, offset: int, end: Optional[int] = None,
                     limit: Optional[int] = None) -> tuple[list[Record], int]:
        """Whole records from ``offset`` up to ``end`` (default: the size now), at most ``limit`` of them;
        and where they end."""
        end = self.size if end is None else end
        if end <= offset:
            return [], offset
        data = os.pread(self.fd, end - offset, offset)
        # Our own records, checksummed: their shape is the encoder's, so it is not checked again.
        records, _ = scan_records(data, 0, 0, resync=False, limit=limit, base=offset, check_payload=False)
        return records, (records[-1].end if records else offset)

    def cut_back(self, size: int) -> None:
        """The file cut to ``size`` (best effort): what a failed ``pwrite`` left after it goes."""
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            pass

    def file_removed(self) -> bool:
        """Its file has no name left (removed under us)."""
        return os.fstat(self.fd).st_nlink == 0

    def delete(self) -> bool:
        """Remove the file (unless it is gone already) and close the fd. False: it could not be removed
        (it stays open, to be tried again)."""
        try:
            if not self.unlinked:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        os.close(self.fd)
        return True

    def remove_file(self) -> None:
        """Remove the file, best effort (its fd is closed already)."""
        try:
            os.unlink(self.path)
        except OSError:
            pass


class SegmentFiles:
    """How one writer's segment files are made and given blocks: ``extent_bytes`` reserved at a time,
    their pages faulted in writable at once (``populate``; given up for good after the kernel refuses)."""

    def __init__(self, extent_bytes: int = EXTENT_BYTES, populate: bool = True):
        self.extent_bytes = extent_bytes
        self.populate = populate

    def create(self, path: Path, start: bytes, capacity: int, need: int, mapped: bool) -> Segment:
        """A new segment file holding ``start`` (its header), mapped ``capacity`` long where ``mapped``,
        with blocks reserved for a first ``need``-byte record. Raises OSError; nothing is left behind then."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        seg = None
        try:
            if os.pwrite(fd, start, 0) != len(start):
                raise OSError(errno.ENOSPC, "short write of a journal segment header")
            seg = Segment(path, fd, len(start), capacity, _map(fd, len(start), capacity) if mapped else None)
            if seg.map is not None:
                self.reserve(seg, seg.size + need)
        except BaseException:
            if seg is not None and seg.map is not None:
                seg.map.close()
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        return seg

    def reserve(self, seg: Segment, end: int) -> None:
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


def unsynced_segments(segments: list[Segment]) -> list[tuple[Segment, int, int]]:
    """``(segment, size, a dup of its fd)`` of each segment written since its last fsync (under the writer's
    lock: the dups let the fsync run outside it)."""
    return [(s, s.size, os.dup(s.fd)) for s in segments if s.size != s.synced_size and not s.unlinked]


def fsync_segments(unsynced: list[tuple[Segment, int, int]]) -> None:
    """fsync the dups :func:`unsynced_segments` made, close them, and note each segment's synced size.
    Raises OSError (the sizes are then not noted); the dups are closed either way."""
    try:
        for _, _, fd in unsynced:
            os.fsync(fd)  # on Linux this writes back pages dirtied through the shared mapping too
    finally:
        for _, _, fd in unsynced:
            os.close(fd)
    for s, size, _ in unsynced:
        s.synced_size = max(s.synced_size, size)


def _map(fd: int, used: int, capacity: int) -> Optional[mmap.mmap]:
    """The segment's file made ``capacity`` long (a hole: nothing reserved yet) and mapped; None where
    mapping is not possible (the segment is then written with pwrite)."""
    try:
        os.ftruncate(fd, capacity)
        return mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):  # a filesystem that cannot map files: pwrite into an exact-size file
        os.ftruncate(fd, used)
        return None
