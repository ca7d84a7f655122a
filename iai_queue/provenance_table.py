"""The ``provenance`` table's operations: the append, the lookup of one record's entries, row counts.

Guarantees of the append (:meth:`ProvenanceTable.append`, which
:meth:`MemoryStore.append_provenance_batch <iai_queue.store.MemoryStore.append_provenance_batch>` is):

* Per-record order: ``seq`` is drawn from a per-store counter that never goes
  backwards (nanoseconds since the epoch, bumped on collision), so entries
  appended by one caller, in one call or in successive calls, read back in that
  order. Writers in different processes or hosts interleave by wall clock: an
  entry from a host whose clock runs ``d`` behind sorts before entries the
  others appended up to ``d`` earlier (never reordering one host's own).
* Exactly-once effect: every row carries an ``entry_id``. A batch built by the
  queue (:class:`~iai_queue.pairs.ProvenanceBatch`) brings its own ids; a batch
  flagged ``verify`` (a retry or a replay, which may have landed before) first
  drops the ids already stored. :meth:`ProvenanceTable.entries_of` also keeps
  only the first row of an id, so even a race between two such writes cannot
  show an entry twice.
* Entries are stored as JSON: what is read back is the dict after a JSON round
  trip (tuples come back as lists, keys as strings).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Protocol
from uuid import UUID

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .jsoncodec import UnencodableEntries, decode, encode_entries
from .lance_tables import provenance_schema, select_between, select_in

__all__ = ["KnownRecordIds", "ProvenanceTable"]


class KnownRecordIds(Protocol):
    """Which record ids exist (:class:`~iai_queue.known_records.KnownRecords`)."""

    def id_strings(self, pairs) -> list[str]: ...

    def existing_indexes(self, record_ids: list[str], records_cache) -> Optional[list[int]]: ...


class ProvenanceTable:
    """Appends to and reads from one LanceDB ``provenance`` table.

    ``known``: which record ids exist (pairs for others are skipped);
    ``on_appended``: called with the number of rows after each append (the
    maintenance scheduler counts work by it), or None.
    """

    def __init__(self, table, known: KnownRecordIds, on_appended: Optional[Callable[[int], None]] = None):
        self.table = table
        self._known = known
        self._on_appended = on_appended
        self._seq_lock = threading.Lock()
        self._last_seq = 0
        self._entry_prefix = f"s{secrets.token_hex(8)}-"  # 64 random bits, as the queue's (pairs.EntryIds)
        self._entry_counter = itertools.count()

    def append(self, pairs: Sequence[tuple[UUID | str, dict]],
               records_cache: Optional[Mapping[Any, Any]] = None) -> int:
        """Append ``(record_id, entry)`` pairs in one commit; returns how many were skipped for unknown ids.

        Raises what LanceDB raises (the caller retries), or
        :class:`~iai_queue.jsoncodec.UnencodableEntries` — before writing
        anything — naming every entry JSON cannot hold.
        """
        n = len(pairs)
        if not n:
            return 0
        entry_ids = getattr(pairs, "entry_ids", None)
        if entry_ids is None:
            prefix, counter = self._entry_prefix, self._entry_counter
            entry_ids = [f"{prefix}{next(counter)}" for _ in range(n)]
        record_ids = self._known.id_strings(pairs)
        keep = self._known.existing_indexes(record_ids, records_cache)  # None: all of them
        unknown = 0 if keep is None else n - len(keep)
        if getattr(pairs, "verify", False):
            stored = self.stored_entry_ids(entry_ids if keep is None else [entry_ids[i] for i in keep])
            if stored:
                keep = [i for i in (range(n) if keep is None else keep) if entry_ids[i] not in stored]
        if keep is not None:
            if not keep:
                return unknown
            record_ids = [record_ids[i] for i in keep]
            entry_ids = [entry_ids[i] for i in keep]
        try:
            entries = encode_entries([p[1] for p in pairs] if keep is None else [pairs[i][1] for i in keep])
        except UnencodableEntries as exc:
            if keep is not None:  # name them by their index in ``pairs``
                exc.bad = {keep[i]: reason for i, reason in exc.bad.items()}
            raise
        m = len(entries)
        with self._seq_lock:
            base = max(time.time_ns(), self._last_seq + 1)
            self._last_seq = base + m - 1
        self.table.add(pa.Table.from_arrays([
            pa.array(record_ids, pa.string()),
            pa.array(entry_ids, pa.string()),
            pa.array(np.arange(base, base + m, dtype=np.int64)),
            pa.array(entries, pa.string()),
        ], schema=provenance_schema()))
        if self._on_appended is not None:
            self._on_appended(m)
        return unknown

    def stored_entry_ids(self, entry_ids: Sequence[str]) -> set[str]:
        """Those of ``entry_ids`` already in the table."""
        return select_in(self.table, "entry_id", entry_ids)

    def stored_entry_ids_between(self, low: str, high: str) -> set[str]:
        """Entry ids ``low <= id < high`` in the table, in one range scan: what a journal replay
        verifies a dead writer's ids against (one query per segment instead of ``IN`` lists per batch)."""
        return select_between(self.table, "entry_id", low, high)

    def entries_into(self, rid: str, result: list) -> None:
        """:meth:`entries_of` for a helper thread: appends the entries, or the exception, to ``result``."""
        try:
            result.append(self.entries_of(rid))
        except BaseException as exc:  # handed to get() on the calling thread
            result.append(exc)

    def entries_of(self, rid: str) -> list[dict]:
        """The entries of record ``rid`` in append order, the first row of each entry id only."""
        rows = (self.table.search().where(f"record_id = '{rid}'")
                .select(["entry_id", "seq", "entry"]).limit(None).to_arrow())
        if rows.num_rows > 1:
            rows = rows.sort_by("seq")
        eids = rows.column("entry_id")
        texts = rows.column("entry").to_pylist()
        loads = decode
        if pc.count_distinct(eids).as_py() == len(texts):  # the common case: no id stored twice
            return [loads(t) for t in texts]
        seen: set[str] = set()
        out = []
        for eid, text in zip(eids.to_pylist(), texts):
            if eid not in seen:  # first write of an entry id wins; a late replay is a no-op
                seen.add(eid)
                out.append(loads(text))
        return out

    def rows(self) -> int:
        """Rows in the table (duplicates of an entry id included)."""
        return self.table.count_rows()
