"""The types the store and the queue share: pairs, batches, entry ids, and the sink they flow into.

A leaf module: it imports nothing else of the package, so the store and the
queue both import it and never each other.

Entry ids (the exactly-once guarantee's key)
    Every pair the queue accepts gets one entry id, ``<prefix><seq:x>.<index>``:
    a per-queue random prefix, the enqueue call's sequence number in hex and the
    pair's index in that call. Built here only (:class:`EntryIds`), lazily, when
    a batch or a spill line needs it — never on the hot path. The store stores
    it with the row and, for a batch flagged ``verify``, skips ids it already has.

    Every queue numbers its calls from 1, so two queues whose prefixes collide
    would share ids, and a verified write of one would skip the other's rows as
    already stored: a loss. A store meets many queues in its life (every
    ``enable_provenance_queue`` and every process makes one; a soak makes
    thousands in ten minutes), so the prefix carries 64 random bits: at a
    million queues the chance of any collision is about 3e-8 (32 bits gave
    about 5e-4 at two thousand).
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Iterable, Optional, Protocol, Sequence
from uuid import UUID

__all__ = ["EntryIds", "Pair", "ProvenanceBatch", "ProvenanceSink", "as_uuid_pairs", "known_id_strings",
           "validate_pairs"]

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
        self.prefix = prefix if prefix is not None else f"q{secrets.token_hex(8)}-"

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


_ID_CACHE_MAX = 1 << 16
_uuid_of_str: dict[str, UUID] = {}  # lowercase canonical id strings already checked, and their UUIDs (bounded)
known_id_strings = _uuid_of_str  # the hot path asks "seen before?" with one lookup


def _uuid_from_str(rid: str) -> Optional[UUID]:
    """The UUID of a canonical UUID string (any case), or None. Cached: hosts recall the same records often."""
    u = _uuid_of_str.get(rid)
    if u is None and len(rid) == 36 and _UUID_STR.match(rid):
        u = UUID(rid)
        if str(u) == rid:  # only the lowercase form may stay a string on its way to the store
            if len(_uuid_of_str) >= _ID_CACHE_MAX:
                _uuid_of_str.clear()  # a cache, not a registry
            _uuid_of_str[rid] = u
    return u


def as_uuid_pairs(pairs: Sequence) -> Sequence:
    """``pairs`` with every id a UUID. ``enqueue`` accepts a lowercase canonical id string it has
    seen before as it is (the hot path only looks it up); the worker converts it here."""
    for p in pairs:
        if type(p[0]) is not UUID:
            break
    else:
        return pairs
    get = _uuid_of_str.get
    return [(r if type(r) is UUID else (get(r) or UUID(r)), e) for r, e in pairs]


def validate_pairs(pairs: Any) -> tuple:
    """The pairs as a tuple of ``(UUID, dict)``; raises TypeError/ValueError naming the bad element.

    Record ids may be UUIDs or canonical UUID strings (converted; a bounded
    cache keeps repeated string ids at about the cost of UUID ones).
    """
    if type(pairs) is not list and not isinstance(pairs, list):
        raise TypeError(f"pairs must be a list of (UUID, dict) tuples, got {type(pairs).__name__}: {pairs!r:.200}")
    out = []
    uuid_of = _uuid_of_str.get
    for p in pairs:
        if type(p) is tuple and len(p) == 2 and type(p[1]) is dict:
            rid = p[0]
            if type(rid) is UUID:
                out.append(p)
                continue
            if type(rid) is str:
                u = uuid_of(rid) or _uuid_from_str(rid)
                if u is not None:
                    out.append((u, p[1]))
                    continue
        i = len(out)
        exc = _bad_pair(i, p)
        if exc is not None:
            raise exc
        rid, entry = p  # a subclass of tuple, UUID, str or dict: fine
        out.append((rid if isinstance(rid, UUID) else UUID(rid), entry))
    return tuple(out)
