"""The backlog read back: calls that are only in the journal re-enter memory in order, each decoded once.

For :meth:`JournaledAdmission.refill <iai_queue.writebehind.journaling.JournaledAdmission.refill>`,
which holds the backlog's position and moves what is read here into memory.
Guarantees:

- In order, none twice: records are read from the backlog position onwards,
  in file order, then into the next segment; a record whose seq is at or
  below the last one taken (a copy the writer wrote again after its segment
  was removed) is skipped.
- Bounded: at most ``REFILL_BYTES`` of journal per refill (or one record,
  when a single record is larger), and only as many records as memory has
  room for are decoded; the rest is read again next time, never decoded twice.
- Chunks are shaped as ``enqueue`` leaves them: ``(seq, ((UUID, entry), …))``.

Reading goes through the ``read_records`` callable passed in (the writer's).
"""

from __future__ import annotations

from typing import Callable, Optional
from uuid import UUID

from ..journal import Record, Segment

__all__ = ["REFILL_BYTES", "ReadRecords", "as_chunks", "read_backlog", "segment_after"]

REFILL_BYTES = 4 << 20  # the most the worker reads from the journal per refill

# (segment, offset, end or None for its size now, at most this many or None) -> (records, where they end)
ReadRecords = Callable[[Segment, int, Optional[int], Optional[int]], tuple[list[Record], int]]


def read_backlog(read_records: ReadRecords, seg: Segment, offset: int, end: int, room: int,
                 after_seq: int) -> tuple[list[Record], int]:
    """Up to ``room`` records of ``seg`` from ``offset`` to ``end`` with seq above ``after_seq``, and the
    offset after the last record read."""
    # Only what fits is decoded (read_records' limit): the rest is read again next time, never decoded twice.
    taken: list = []
    new_offset = offset
    while len(taken) < room:
        want = room - len(taken)
        records, _ = read_records(seg, new_offset, end, want)
        if not records and new_offset == offset and end < seg.size:  # one record larger than REFILL_BYTES
            records, _ = read_records(seg, new_offset, None, 1)
        for r in records:
            new_offset = r.end
            if r.seq > after_seq:  # else: a copy written after its segment was removed, taken before
                taken.append(r)
        if len(records) < want:
            break
    return taken, new_offset


def as_chunks(records: list[Record]) -> list[tuple]:
    """Chunks shaped as enqueue leaves them: ids as UUIDs (a record's id repeats: parsed once per refill)."""
    uuid_of: dict = {}
    chunks = []
    for r in records:
        items = []
        for rid, entry in r.items:
            u = uuid_of.get(rid)
            if u is None:
                u = uuid_of[rid] = UUID(rid)
            items.append((u, entry))
        chunks.append((r.seq, tuple(items)))
    return chunks


def segment_after(segments: list[Segment], seg: Segment) -> Optional[Segment]:
    """The segment written after ``seg`` (None: it is the last one)."""
    later = [s for i, s in enumerate(segments) if i > 0 and segments[i - 1] is seg]
    return later[0] if later else None
