"""The write-ahead journal: every accepted enqueue call on disk before ``enqueue`` returns.

A package that never imports the queue (like :mod:`iai_queue.spill`, whose
directory it shares). Its parts, each with the rules it implements at its top:

- :mod:`.format` — the bytes: a segment header, then ``[u32 length][u32 crc32][payload]``
  records, one per enqueue call; version 2 segments end in zeros (preallocated), version 1 is still read.
- :mod:`.reader` — reading a segment back: complete records in order, damage
  (a torn tail, flipped bytes) reported with its offsets and reason, never skipped silently.
- :mod:`.checkpoint` — a writer's high-water mark: every call numbered up to it
  is in the store, so recovery replays only what follows.
- :mod:`.segment` — one segment file: created exclusively, a shared mapping of blocks
  reserved an extent at a time (one copy per call, no system call; ``pwrite`` where
  ``posix_fallocate`` is missing), so a full disk is ``ENOSPC``, never SIGBUS; cut to its
  used size when finished; fsynced on dups of its fd.
- :mod:`.writer` — :class:`JournalWriter`, the policy over segments: one record per call,
  rolling at a size bound, the group-commit fsync, falling back (and retrying) when the disk
  refuses, re-writing what a removed directory took, checkpointing and retiring segments the store has.

Where the files live: in the spill directory, named like spill files
(``<ts_ns>-<store>-<writer>-<n>.wal``) and guarded by the same writer lock, so
``iai-queue spill status`` shows one place on disk, and a writer's journal is
replayed by nobody else while its lock is held.
"""

from .checkpoint import read_checkpoint, write_checkpoint
from .format import JournalHeader, decode_header, encode_record, segment_start
from .reader import Damage, Record, SegmentScan, scan_segment
from .writer import Durability, JournalFailed, JournalWriter, Segment

__all__ = ["Damage", "Durability", "JournalFailed", "JournalHeader", "JournalWriter", "Record", "Segment",
           "SegmentScan", "decode_header", "encode_record", "read_checkpoint", "scan_segment", "segment_start",
           "write_checkpoint"]
