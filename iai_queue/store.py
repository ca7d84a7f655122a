"""The LanceDB memory store: records, vector recall, append-only provenance.

Where: a local directory, or an object-store URI (``s3://bucket/prefix``,
``gs://…``, ``az://…``) passed through to LanceDB with ``storage_options``
(credentials there or in the usual environment variables). Many hosts may open
one object-store database at once: LanceDB commits with conditional writes, so
concurrent appends never overwrite each other. :mod:`iai_queue.location` says
what is safe to log and what names a store.

The parts, each with the guarantee it implements written at its top:
:mod:`iai_queue.lance_tables` (the layout: two tables, schemas, lookups),
:mod:`iai_queue.records_table` (unique ids on insert, lookup, vector recall),
:mod:`iai_queue.known_records` (which record ids exist),
:mod:`iai_queue.provenance_table` (the append — per-record order, exactly-once
effect, JSON entries — and the first-wins lookup),
:mod:`iai_queue.store_maintenance` (compaction and indexes, and its scheduler),
:mod:`iai_queue.queue_toggle` (write-behind or synchronous, order kept across
the switch). :class:`MemoryStore` puts them together.

LanceDB does not survive ``fork()``: a child process must open its own store.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional
from uuid import UUID

import lancedb

from .known_records import KnownRecords
from .lance_tables import PROVENANCE, RECORDS, open_or_create, provenance_schema, records_schema
from .location import StoreLocation, is_uri, parse_storage_options
from .maintenance import MaintenancePolicy, MaintenanceRole, MaintenanceStats
from .pairs import ProvenanceBatch
from .provenance_table import ProvenanceTable
from .queue_toggle import QueueToggle
from .records_table import RecordsTable
from .store_maintenance import TableMaintenance, make_scheduler

__all__ = ["DuplicateIdError", "MemoryRecord", "MemoryStore", "ProvenanceBatch", "default_store_path"]

# LanceDB's defaults (1 GiB metadata, 6 GiB index cache) never evict for us: the
# metadata cache keeps every table version's manifest, O(fragments) each, so
# under sustained appends without compaction it grows ~versions x fragments.
_METADATA_CACHE_BYTES = 32 << 20
_INDEX_CACHE_BYTES = 256 << 20
# An object-store commit is several requests whatever its size, and every one of them
# makes later reads and commits of the table do more work: the queue on such a store
# gathers for longer and commits less often (explicit options and IAI_QUEUE_* win).
_OBJECT_STORE_QUEUE_DEFAULTS = {"coalesce_ms": 500}


def default_store_path() -> "Path | str":
    """``$IAI_QUEUE_STORE`` (a path, or a URI kept as text), else ``~/.iai-mcp/lancedb``."""
    env = os.environ.get("IAI_QUEUE_STORE")
    if env:
        return env if is_uri(env) else Path(env)
    return Path.home() / ".iai-mcp" / "lancedb"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class MemoryRecord:
    id: UUID
    text: str
    embedding: list[float]
    provenance: list[dict] = field(default_factory=list)
    created_at: datetime = field(default_factory=_utcnow)


class DuplicateIdError(ValueError):
    """``insert``/``insert_many`` got an id the store already holds, or the same id twice."""

    def __init__(self, ids: Sequence[UUID]):
        self.ids = list(ids)
        shown = ", ".join(str(i) for i in self.ids[:5]) + (f" and {len(self.ids) - 5} more" if len(self.ids) > 5 else "")
        super().__init__(f"record id already in the store (or given twice): {shown}; nothing was inserted")


class MemoryStore:
    """Records with embeddings, vector recall, and append-only provenance.

    ``MemoryStore(path)`` opens or creates the database at ``path``: a local
    directory or an object-store URI (default: env ``IAI_QUEUE_STORE``, else
    ``~/.iai-mcp/lancedb``); ``storage_options`` go to LanceDB as given. All
    methods are safe to call from several threads at once.

    ``path`` is the directory (a ``Path``) for a local store and the redacted
    URI (a ``str``, no credentials) for an object store; :attr:`location` is
    the text to show, :attr:`identity` eight hex digits naming the store.
    """

    # Journal recovery may hand append_provenance_batch entries as their JSON (EncodedEntry), stored as is.
    takes_encoded_entries = True

    def __init__(self, path: str | os.PathLike[str] | None = None, *, dim: int = 384,
                 storage_options: Optional[Mapping[str, str]] = None,
                 maintenance: "MaintenancePolicy | MaintenanceRole | str | None" = None):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        loc = StoreLocation.parse(path if path is not None else default_store_path())
        options = parse_storage_options(storage_options)
        self._location = loc
        self.path: "Path | str" = loc.local_path if loc.local_path is not None else loc.display
        if loc.local_path is not None:
            if loc.local_path.exists() and not loc.local_path.is_dir():
                raise ValueError(f"store path {loc.display!r} is an existing file, not a directory")
            loc.local_path.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        # interval 0: every read sees what other processes committed.
        self._db = lancedb.connect(loc.uri, storage_options=options, read_consistency_interval=timedelta(0),
                                   session=lancedb.Session(index_cache_size_bytes=_INDEX_CACHE_BYTES,
                                                           metadata_cache_size_bytes=_METADATA_CACHE_BYTES))
        self._records = open_or_create(self._db, RECORDS, records_schema(dim))
        self._provenance = open_or_create(self._db, PROVENANCE, provenance_schema())
        self._maintenance = TableMaintenance(self._records, self._provenance)
        found = self._records.schema.field("embedding").type
        if getattr(found, "list_size", dim) != dim:
            raise ValueError(f"store at {loc.display!r} holds {found.list_size}-d embeddings, not dim={dim}")
        self._known = KnownRecords(self._records)
        self._records_ops = RecordsTable(self._records, dim, self._known)
        self._scheduler = make_scheduler(maintenance, loc, self._db, self, MemoryStore.maintain)
        self._provenance_ops = ProvenanceTable(self._provenance, self._known,
                                               self._scheduler.note_rows if self._scheduler is not None else None)
        self._toggle = QueueToggle(weakref.ref(self),
                                   {} if self._location.is_local else _OBJECT_STORE_QUEUE_DEFAULTS)

    @property
    def location(self) -> str:
        """Where the store is, safe to show and log: a path, or the URI without credentials."""
        return self._location.display

    @property
    def identity(self) -> str:
        """Eight hex digits naming this store, the same on every host (for spill file names)."""
        return self._location.identity

    @property
    def is_local(self) -> bool:
        """True for a local directory, False for object storage."""
        return self._location.is_local

    def __repr__(self) -> str:
        return f"MemoryStore({self.location!r}, dim={self.dim})"

    _provenance_schema = staticmethod(provenance_schema)  # kept for scripts that add rows directly

    # -- records -----------------------------------------------------------------

    def insert(self, record: MemoryRecord) -> None:
        """Insert one record; :class:`DuplicateIdError` when its id is already in the store."""
        self.insert_many([record])

    def insert_many(self, records: Sequence[MemoryRecord]) -> None:
        """Insert records in one LanceDB commit; their ``provenance`` lists are appended too.

        Ids are unique: an id already in the store, or given twice, raises
        :class:`DuplicateIdError` (a ``ValueError``) and nothing is inserted —
        never a second row, never a silent overwrite. The check covers this
        process's inserts; two processes inserting one id at the same moment
        can both pass it. :meth:`existing_ids` lets a caller insert only what is
        missing.
        """
        records = list(records)
        if not records:
            return
        for r in records:
            if not isinstance(r, MemoryRecord):
                raise TypeError(f"expected MemoryRecord, got {type(r).__name__}: {r!r}")
            if not isinstance(r.id, UUID):
                raise TypeError(f"MemoryRecord.id must be a UUID, got {r.id!r}")
            if len(r.embedding) != self.dim:
                raise ValueError(f"record {r.id}: embedding has length {len(r.embedding)}, store dim is {self.dim}")
        duplicates = self._records_ops.insert_new(records)
        if duplicates:
            raise DuplicateIdError(duplicates)
        pairs = [(r.id, e) for r in records for e in r.provenance]
        if pairs:
            self.append_provenance_batch(pairs)

    def existing_ids(self, ids: Iterable[UUID | str]) -> set[UUID]:
        """Those of ``ids`` that name a record in the store."""
        return self._known.existing_ids(ids)

    def get(self, id: UUID | str) -> Optional[MemoryRecord]:
        """The record with its provenance in append order, or None.

        The record row and its provenance rows are two indexed lookups
        (BTree on ``records.id`` and ``provenance.record_id`` once
        :meth:`maintain` has run); the provenance one runs on a helper thread
        while this one fetches the record, so the latency is about the slower of the two.
        """
        rid = str(UUID(str(id)))
        result: list = []
        helper = threading.Thread(target=self._provenance_ops.entries_into, args=(rid, result),
                                  name="iai_queue-get", daemon=True)  # short-lived: no thread outlives the call
        helper.start()
        try:
            row = self._records_ops.row(rid)
        finally:
            helper.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        if row is None:
            return None
        return MemoryRecord(
            id=UUID(row["id"]), text=row["text"], embedding=list(row["embedding"]),
            provenance=result[0], created_at=row["created_at"])

    def count(self) -> int:
        return self._records.count_rows()

    def provenance_rows(self) -> int:
        """Rows in the provenance table (duplicates of an entry id included)."""
        return self._provenance_ops.rows()

    def stored_entry_ids_between(self, low: str, high: str) -> set[str]:
        """Entry ids ``low <= id < high`` in the provenance table, in one range scan (journal replay
        verifies a dead writer's ids with it; the entry_id index serves it once maintenance built it)."""
        return self._provenance_ops.stored_entry_ids_between(low, high)

    def search(self, embedding: Sequence[float], k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` nearest records by cosine distance: ``[{"id", "text", "score"}]``, best first."""
        return self._records_ops.search(embedding, k)

    # -- provenance ----------------------------------------------------------------

    def append_provenance_batch(self, pairs: Sequence[tuple[UUID | str, dict]],
                                records_cache: Optional[Mapping[Any, MemoryRecord]] = None) -> int:
        """Append ``(record_id, entry)`` pairs in one commit, synchronously.

        Order is kept per record; the guarantees (order, exactly-once effect,
        JSON) are in :mod:`iai_queue.provenance_table`. Pairs for record ids
        the store does not have are skipped; returns how many were skipped so
        (0 when all were known). Raises what LanceDB raises (the caller
        retries), or :class:`~iai_queue.jsoncodec.UnencodableEntries` — before
        writing anything — naming every entry JSON cannot hold (see
        :mod:`iai_queue.jsoncodec`).

        Every write of the store and its queues goes through this method,
        looked up on the store at call time: a wrapper installed on the
        instance sees them all. An entry is a dict, except in journal
        recovery, which hands this store (``takes_encoded_entries``) each entry
        as its JSON: an :class:`~iai_queue.jsoncodec.EncodedEntry` (``bytes``).

        Cost: one LanceDB ``add`` per call plus O(1) Python per pair (a cached
        id string and one JSON encode); columns go to Arrow in bulk.
        """
        return self._provenance_ops.append(pairs, records_cache)

    def maintain(self) -> None:
        """Build the scalar indexes lookups use, compact the records, cluster the provenance rows by record.

        Runs on the caller's thread; the store's own scheduler (see
        :mod:`iai_queue.maintenance`) calls it in the background by work done and
        idleness. It is safe at any time, also while other threads, processes or
        hosts append, never needed for correctness, and what makes ``get()``
        fast on a large provenance table.
        """
        self._maintenance.run()

    def request_maintenance(self) -> None:
        """Ask the background scheduler for a :meth:`maintain` run soon; returns at once.

        With ``maintenance="never"`` there is no scheduler and this does nothing.
        """
        if self._scheduler is not None:
            self._scheduler.request()

    def maintenance_stats(self) -> Optional[MaintenanceStats]:
        """Runs, failures and durations of background maintenance; None without a scheduler."""
        return self._scheduler.stats() if self._scheduler is not None else None

    def close(self) -> None:
        """Stop background maintenance (a run under way finishes). The store stays usable."""
        if self._scheduler is not None:
            self._scheduler.close()

    # -- the provenance queue toggle (queue_toggle.py) -------------------------------

    @property
    def provenance_queue(self):
        """The live :class:`~iai_queue.ProvenanceWriteQueue`, or None while writes are synchronous."""
        return self._toggle.live

    @property
    def _provenance_queue(self):
        """The live queue or None (seed contract: kept; :attr:`provenance_queue` is the public name)."""
        return self._toggle.live

    def enable_provenance_queue(self, coalesce_ms: Optional[float] = None, **queue_options: Any):
        """Start routing :meth:`queue_provenance_batch` through a write-behind queue; returns it.

        Options not given here come from the ``IAI_QUEUE_*`` environment
        variables (see :mod:`iai_queue.envconfig`), then the queue's defaults —
        except that on an object store ``coalesce_ms`` defaults to 500 (fewer,
        larger commits; each is several requests to the store).

        Idempotent: when a queue is already live it is returned unchanged. If
        the options asked for differ from the live queue's, they are *not*
        applied (that would mean draining and restarting it under the callers'
        feet): a WARNING ``enable.options_ignored`` names each difference.
        Disable, then enable, to change them.
        """
        return self._toggle.enable(coalesce_ms, **queue_options)

    def disable_provenance_queue(self, timeout: Optional[float] = None) -> None:
        """Drain and stop the queue; later writes run synchronously, behind what it held. Idempotent.

        Writes that race this call, and every write after it, go through the
        stopped queue: they wait for its drain (at most its ``exit_timeout``,
        or ``timeout``), then run on the caller's thread — or are spilled
        behind what the queue left on disk — so order per record is kept.
        """
        self._toggle.disable(timeout)

    def queue_provenance_batch(self, pairs: Sequence[tuple[UUID | str, dict]]) -> None:
        """Hand pairs to the live queue, or append them now on this thread (behind a retired queue's entries)."""
        q = self._toggle.live
        if q is None:
            self._toggle.enqueue(pairs)  # disabled mode
            return
        q.enqueue(pairs)

    async def adisable_provenance_queue(self) -> None:
        """:meth:`disable_provenance_queue` without blocking the event loop."""
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.disable_provenance_queue)
