"""The types the store and the queue share: pairs, batches, entry ids, and the sink they flow into.

A leaf module: it imports nothing else of the package, so the store and the
queue both import it and never each other.

Entry ids (the exactly-once guarantee's key)
    Every pair the queue accepts gets one entry id, ``<prefix><seq:x>.<index>``:
    a per-queue random prefix, the enqueue call's sequence number in hex and the
    pair's index in that call. Built here only (:class:`EntryIds`), lazily, when
    a batch or a spill line needs it — never on the hot path. The store stores
    it with the row and, for a batch flagged ``verify``, skips ids it already has.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Iterable, Optional, Protocol, Sequence
from uuid import UUID

__all__ = ["EntryIds", "Pair", "ProvenanceBatch", "ProvenanceSink", "validate_pairs"]

Pair = tuple[UUID, dict]

_UUID_STR = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class ProvenanceSink(Protocol):
    """What the queue writes to: a store's synchronous append."""

    def append_provenance_batch(self, pairs: Sequence[tuple[UUID, dict]], records_cache: Any = None) -> None: ...


class ProvenanceBatch(list):
    """A list of ``(UUID, dict)`` pairs that also carries one entry id per pair.

    It is what the queue hands to ``store.append_provenance_batch``; being a
    list, a wrapper installed on the store sees the ordinary pairs.
    ``verify`` says the batch may have been applied before (a retry after a
    failure, a replay of a spill file): the store then skips ids it has.
    """

    __slots__ = ("entry_ids", "verify")

    def __init__(self, pairs: Iterable, entry_ids: Sequence[str], verify: bool = False):
        super().__init__(pairs)
        if len(entry_ids) != len(self):
            raise ValueError(f"{len(entry_ids)} entry ids for {len(self)} pairs")
        self.entry_ids = list(entry_ids)
        self.verify = verify


class EntryIds:
    """The one entry-id format: ``<prefix><seq:x>.<index>``."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: Optional[str] = None):
        self.prefix = prefix if prefix is not None else f"q{secrets.token_hex(4)}-"

    def of_call(self, seq: int, start: int, end: int) -> list[str]:
        """The ids of pairs ``start..end-1`` of enqueue call ``seq``."""
        pre = f"{self.prefix}{seq:x}."
        return [pre + str(i) for i in range(start, end)]


def _bad_pair(i: int, p: Any) -> Optional[Exception]:
    if type(p) is not tuple and not isinstance(p, tuple):
        return TypeError(f"pairs[{i}] must be a (UUID, dict) tuple, got {type(p).__name__}: {p!r:.200}")
    if len(p) != 2:
        return ValueError(f"pairs[{i}] must have 2 elements (UUID, dict), got {len(p)}: {p!r:.200}")
    rid, entry = p
    if isinstance(rid, str):
        if not _UUID_STR.match(rid):
            return ValueError(f"pairs[{i}][0] is not a canonical UUID string: {rid!r:.200}")
    elif not isinstance(rid, UUID):
        return TypeError(f"pairs[{i}][0] must be a UUID, got {type(rid).__name__}: {rid!r:.200}")
    if not isinstance(entry, dict):
        return TypeError(f"pairs[{i}][1] must be a dict, got {type(entry).__name__}: {entry!r:.200}")
    return None


def validate_pairs(pairs: Any) -> tuple:
    """The pairs as a tuple of ``(UUID, dict)``; raises TypeError/ValueError naming the bad element."""
    if not isinstance(pairs, list):
        raise TypeError(f"pairs must be a list of (UUID, dict) tuples, got {type(pairs).__name__}: {pairs!r:.200}")
    out = tuple(pairs)  # a copy: the caller may reuse its list
    for p in out:
        # The common case costs three type checks; anything else takes the slow path.
        if type(p) is not tuple or len(p) != 2 or type(p[0]) is not UUID or type(p[1]) is not dict:
            break
    else:
        return out
    normal = []
    for i, p in enumerate(out):
        exc = _bad_pair(i, p)
        if exc is not None:
            raise exc
        rid, entry = p
        normal.append((rid if isinstance(rid, UUID) else UUID(rid), entry))
    return tuple(normal)
