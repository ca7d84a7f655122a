"""Which record ids exist: a bounded cache in front of the ``records`` table, and cached id strings.

Guarantee: an id is reported as existing only after the table showed it, or
after this process inserted it; records are never deleted, so a cached answer
stays true. The caches are caches, not registries: past ``_KNOWN_IDS_MAX``
entries they are dropped and rebuilt from lookups, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional
from uuid import UUID

from .lance_tables import select_in

__all__ = ["KnownRecords"]

_KNOWN_IDS_MAX = 1_000_000  # cap on the cache of ids known to exist


class KnownRecords:
    """Record ids known to exist in ``records_table`` (a LanceDB table), looked up there when not known."""

    def __init__(self, records_table):
        self._records = records_table
        self._known_ids: set[str] = set()
        self._id_str_cache: dict[Any, str] = {}

    def existing_ids(self, ids: Iterable[UUID | str]) -> set[UUID]:
        """Those of ``ids`` that name a record in the store."""
        wanted = {str(UUID(str(i))) for i in ids}
        known = wanted & self._known_ids
        unknown = wanted - known
        found = select_in(self._records, "id", unknown) if unknown else set()
        self.remember(found)
        return {UUID(i) for i in known | found}

    def id_strings(self, pairs) -> list[str]:
        """``str(record_id)`` of every pair, through a bounded cache (UUID.__str__ is slow Python)."""
        cache = self._id_str_cache
        if len(cache) > _KNOWN_IDS_MAX:
            cache = self._id_str_cache = {}
        get = cache.get
        out = [get(rid) for rid, _ in pairs]
        if None in out:
            for i, s in enumerate(out):
                if s is None:
                    rid = pairs[i][0]
                    out[i] = cache[rid] = str(rid)
        return out

    def existing_indexes(self, record_ids: list[str], records_cache) -> Optional[list[int]]:
        """Indexes into ``record_ids`` of records that exist; None when all of them do."""
        known = self._known_ids
        if records_cache:
            self.remember(str(k) for k in records_cache)
            known = self._known_ids
        if known.issuperset(record_ids):
            return None
        unknown = {r for r in record_ids if r not in known}
        found = select_in(self._records, "id", unknown)
        self.remember(found)
        known = self._known_ids
        if len(found) == len(unknown):
            return None
        return [i for i, r in enumerate(record_ids) if r in known]

    def remember(self, ids: Iterable[str]) -> None:
        """Note ids that exist (read from the table, or just inserted by this process)."""
        if len(self._known_ids) > _KNOWN_IDS_MAX:
            self._known_ids = set()  # a cache, not a registry: rebuilt from lookups
        self._known_ids.update(ids)
