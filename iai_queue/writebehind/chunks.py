"""Chunks: what one enqueue call left in memory.

Two kinds, and every consumer asks :func:`chunk_parts` for the pairs and their
entry ids instead of unpacking:

- ``(seq, items)``, the plain 2-tuple ``enqueue`` builds (a tuple, not a class:
  the hot path builds one per call). Entry ids are derived from ``seq`` when needed;
  an id may still be a (checked, lowercase) string: :func:`chunk_parts` converts it.
- :class:`HeldChunk`: a remainder after a partial take (``start`` > 0), or pairs
  that carry their entry ids already and may have been written (``seen``: pairs
  taken back from a stopped worker, late pairs after ``stop()``).
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence, Union

from ..pairs import EntryIds, Pair, as_uuid_pairs

__all__ = ["Chunk", "HeldChunk", "chunk_len", "chunk_parts", "chunk_seq", "holds_at_least", "split_chunk", "take_from"]


class HeldChunk:
    __slots__ = ("seq", "items", "start", "entry_ids", "seen")

    def __init__(self, seq: int, items: Sequence[Pair], start: int = 0,
                 entry_ids: Optional[Sequence[str]] = None, seen: bool = False):
        self.seq = seq  # -1: no enqueue call of this run to mark done
        self.items = items
        self.start = start
        self.entry_ids = entry_ids  # None: derived from seq
        self.seen = seen


Chunk = Union[tuple, HeldChunk]


def chunk_seq(c: Chunk) -> int:
    return c[0] if type(c) is tuple else c.seq


def chunk_len(c: Chunk) -> int:
    return len(c[1]) if type(c) is tuple else len(c.items) - c.start


def _fields(c: Chunk) -> tuple:
    """``(seq, items, start, entry_ids, seen)`` of either kind of chunk."""
    if type(c) is tuple:
        return c[0], c[1], 0, None, False
    return c.seq, c.items, c.start, c.entry_ids, c.seen


def chunk_parts(c: Chunk, ids: EntryIds, end: Optional[int] = None) -> tuple[Sequence[Pair], list[str], bool]:
    """``(pairs, entry_ids, seen)`` of the chunk's pending pairs (up to index ``end``)."""
    seq, items, start, eids, seen = _fields(c)
    end = len(items) if end is None else end
    pairs = as_uuid_pairs(items[start:end])
    return pairs, (list(eids[start:end]) if eids is not None else ids.of_call(seq, start, end)), seen


def split_chunk(c: Chunk, room: int, ids: EntryIds) -> tuple[Sequence[Pair], list[str], Optional[HeldChunk]]:
    """Up to ``room`` pairs from the front of ``c``: ``(pairs, entry_ids, rest)``; ``rest`` None when all taken."""
    seq, items, start, eids, seen = _fields(c)
    end = min(len(items), start + room)
    pairs, part_ids, _ = chunk_parts(c, ids, end)
    rest = HeldChunk(seq, items, end, eids, seen) if end < len(items) else None
    return pairs, part_ids, rest


def holds_at_least(chunks: Sequence[Chunk], max_pairs: int) -> bool:
    """Whether ``chunks`` hold ``max_pairs`` pairs or more (a chunk holds at least one)."""
    if len(chunks) >= max_pairs:
        return True
    total = 0
    for c in chunks:
        total += chunk_len(c)
        if total >= max_pairs:
            return True
    return False


def take_from(pending: deque, room: int, ids: EntryIds) -> tuple[list, list, list]:
    """Pop up to ``room`` pairs off the front of ``pending``, in order: ``(pairs, entry ids, seqs of
    the calls completed)``. A call that does not fit is split; its rest stays at the front."""
    pairs: list = []
    eids: list = []
    done: list = []
    prefix = ids.prefix
    while pending and room:
        c = pending[0]
        if type(c) is tuple and len(c[1]) <= room:  # the common case: a whole call, as enqueue left it
            seq, items = c
            pending.popleft()
            n = len(items)
            pairs += items
            eids += [f"{prefix}{seq:x}.0"] if n == 1 else ids.of_call(seq, 0, n)
            done.append(seq)
            room -= n
            continue
        part, part_ids, rest = split_chunk(c, room, ids)
        pairs += part
        eids += part_ids
        room -= len(part)
        if rest is None:
            done.append(chunk_seq(pending.popleft()))
        else:
            pending[0] = rest
    return as_uuid_pairs(pairs), eids, done  # ids enqueued as strings become UUIDs here, off the hot path
