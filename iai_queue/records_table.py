"""The ``records`` table's operations: inserts with unique ids, the lookup of one row, vector recall.

Guarantee (unique ids): :meth:`RecordsTable.insert_new` adds nothing when an
id is already in the store or given twice — never a second row, never a silent
overwrite. The check and the add are one step for this process's inserts; two
processes inserting one id at the same moment can both pass it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Optional
from uuid import UUID

import pyarrow as pa

from .known_records import KnownRecords
from .lance_tables import records_schema

__all__ = ["RecordsTable"]


class RecordsTable:
    """One LanceDB ``records`` table of ``dim``-d embeddings; ``known`` caches which ids exist."""

    def __init__(self, table, dim: int, known: KnownRecords):
        self.table = table
        self.dim = dim
        self._known = known
        self._insert_lock = threading.Lock()  # the duplicate-id check and the add, as one step

    def insert_new(self, records: Sequence[Any]) -> list[UUID]:
        """Add ``records`` (``MemoryRecord``s, already checked) in one commit, unless some of their ids are
        already stored or given twice: then nothing is added and those ids are returned, in order."""
        with self._insert_lock:
            duplicates = self._duplicates(records)
            if not duplicates:
                self._add(records)
        return duplicates

    def _duplicates(self, records: Sequence[Any]) -> list[UUID]:
        ids = [r.id for r in records]
        seen: set[UUID] = set()
        twice = [i for i in ids if i in seen or seen.add(i)]
        present = self._known.existing_ids(ids)
        return list(dict.fromkeys([*twice, *(i for i in ids if i in present)])) if twice or present else []

    def _add(self, records: Sequence[Any]) -> None:
        table = pa.table({
            "id": [str(r.id) for r in records],
            "text": [r.text for r in records],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array([x for r in records for x in r.embedding], pa.float32()), self.dim),
            "created_at": [r.created_at for r in records],
        }, schema=records_schema(self.dim))
        self.table.add(table)
        self._known.remember(str(r.id) for r in records)

    def row(self, rid: str) -> Optional[dict[str, Any]]:
        """The row of record ``rid`` (a canonical UUID string) as a dict, or None."""
        rows = self.table.search().where(f"id = '{rid}'").limit(1).to_arrow()
        return rows.slice(0, 1).to_pylist()[0] if rows.num_rows else None

    def search(self, embedding: Sequence[float], k: int) -> list[dict[str, Any]]:
        """The ``k`` nearest records by cosine distance: ``[{"id", "text", "score"}]``, best first."""
        if len(embedding) != self.dim:
            raise ValueError(f"cue_embedding has length {len(embedding)}, store dim is {self.dim}")
        rows = (self.table.search(list(embedding), vector_column_name="embedding")
                .distance_type("cosine").limit(k).select(["id", "text", "_distance"]).to_arrow())
        return [{"id": UUID(i), "text": t, "score": 1.0 - d}
                for i, t, d in zip(rows.column("id").to_pylist(), rows.column("text").to_pylist(),
                                   rows.column("_distance").to_pylist())]
