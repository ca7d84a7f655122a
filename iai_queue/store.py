"""The LanceDB memory store: records, vector recall, append-only provenance.

Where: a local directory, or an object-store URI (``s3://bucket/prefix``,
``gs://…``, ``az://…``) passed through to LanceDB with ``storage_options``
(credentials there or in the usual environment variables). Many hosts may open
one object-store database at once: LanceDB commits with conditional writes, so
concurrent appends never overwrite each other. :mod:`iai_queue.location` says
what is safe to log and what names a store.

Layout (one LanceDB database, two tables):

``records``
    ``id`` (canonical UUID string), ``text``, ``embedding`` (fixed-size float32
    list of ``dim``), ``created_at`` (UTC timestamp).
``provenance``
    one row per provenance entry: ``record_id``, ``entry_id``, ``seq`` (int64,
    the order of appends), ``entry`` (the entry dict as JSON text).

Why provenance is a table of its own and not a JSON column on ``records``: an
append is a LanceDB ``add``, which never conflicts with another ``add`` — so
threads and processes appending at once cannot clobber each other, as a
read-modify-write of a column would.

Guarantees of :meth:`MemoryStore.append_provenance_batch`:

* Per-record order: ``seq`` is drawn from a per-store counter that never goes
  backwards (nanoseconds since the epoch, bumped on collision), so entries
  appended by one caller, in one call or in successive calls, read back in that
  order. Writers in different processes or hosts interleave by wall clock: an
  entry from a host whose clock runs ``d`` behind sorts before entries the
  others appended up to ``d`` earlier (never reordering one host's own).
* Exactly-once effect: every row carries an ``entry_id``. A batch built by the
  queue (:class:`ProvenanceBatch`) brings its own ids; a batch flagged
  ``verify`` (a retry or a replay, which may have landed before) first drops
  the ids already stored. :meth:`MemoryStore.get` also keeps only the first row
  of an id, so even a race between two such writes cannot show an entry twice.
* Entries are stored as JSON: what :meth:`MemoryStore.get` returns is the dict
  after a JSON round trip (tuples come back as lists, keys as strings).

LanceDB does not survive ``fork()``: a child process must open its own store.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import weakref
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional
from uuid import UUID

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import BTree

from .jsoncodec import UnencodableEntries, decode, encode_entries
from .location import StoreLocation, is_uri, parse_storage_options
from .maintenance import (FlockMaintenanceLock, MaintenancePolicy, MaintenanceRole, MaintenanceScheduler,
                          MaintenanceStats, WindowMaintenanceLock)
from .pairs import ProvenanceBatch

__all__ = ["DuplicateIdError", "MemoryRecord", "MemoryStore", "ProvenanceBatch", "default_store_path"]

log = logging.getLogger("iai_queue.store")

RECORDS = "records"
PROVENANCE = "provenance"
_DEFAULT = object()  # "not given" in option comparisons
_IN_LIST_CHUNK = 1000  # ids per "IN (...)" filter: keeps the SQL text small
_KNOWN_IDS_MAX = 1_000_000  # cap on the cache of ids known to exist
# LanceDB's defaults (1 GiB metadata, 6 GiB index cache) never evict for us: the
# metadata cache keeps every table version's manifest, O(fragments) each, so
# under sustained appends without compaction it grows ~versions x fragments.
_METADATA_CACHE_BYTES = 32 << 20
_INDEX_CACHE_BYTES = 256 << 20


def default_store_path() -> "Path | str":
    """``$IAI_QUEUE_STORE`` (a path, or a URI kept as text), else ``~/.iai-mcp/lancedb``."""
    env = os.environ.get("IAI_QUEUE_STORE")
    if env:
        return env if is_uri(env) else Path(env)
    return Path.home() / ".iai-mcp" / "lancedb"


def _option_value(name: str, value: Any) -> Any:
    """A queue option in the form two requests are compared in (a path given as str or Path)."""
    return Path(value) if name == "spill_dir" and isinstance(value, (str, os.PathLike)) else value


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


_CONFLICT_ATTEMPTS = 4


def _retry_commit_conflicts(step) -> None:
    """Run one maintenance commit; retry it when another writer's commit preempted it.

    Two maintainers overlapping (another host, or the queue's idle call) make
    LanceDB refuse the later index or compaction commit as a "retryable commit
    conflict"; nothing was written by the refused one, so running it again is safe.
    """
    for attempt in range(_CONFLICT_ATTEMPTS):
        try:
            step()
            return
        except Exception as exc:
            if attempt + 1 == _CONFLICT_ATTEMPTS or "retryable commit conflict" not in str(exc).lower():
                raise
            time.sleep(0.05 * 2 ** attempt)


def _sql_str_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


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
        self._records = self._open_or_create(RECORDS, self._records_schema())
        self._provenance = self._open_or_create(PROVENANCE, self._provenance_schema())
        found = self._records.schema.field("embedding").type
        if getattr(found, "list_size", dim) != dim:
            raise ValueError(f"store at {loc.display!r} holds {found.list_size}-d embeddings, not dim={dim}")
        self._seq_lock = threading.Lock()
        self._last_seq = 0
        self._entry_prefix = f"s{secrets.token_hex(4)}-"
        self._entry_counter = itertools.count()
        self._known_ids: set[str] = set()
        self._id_str_cache: dict[Any, str] = {}
        self._provenance_queue = None  # the live ProvenanceWriteQueue, or None (seed contract: kept)
        self._retired_queue = None  # a stopped queue still draining or with entries on disk: writes go behind it
        self._sync_queue = None  # a queue that never runs: the synchronous path
        self._last_queue: Optional[weakref.ref] = None  # the queue enable made last: the next one succeeds it
        self._queue_options: dict[str, Any] = {}  # what the live queue was built with
        self._toggle_lock = threading.Lock()
        self._sync_lock = threading.Lock()  # disabled-mode writes, one at a time; enable waits for them
        self._insert_lock = threading.Lock()  # the duplicate-id check and the add, as one step
        self._scheduler = self._make_scheduler(maintenance)

    def _make_scheduler(self, maintenance) -> Optional[MaintenanceScheduler]:
        if maintenance is None:
            policy = MaintenancePolicy.from_env()
        elif isinstance(maintenance, MaintenancePolicy):
            policy = maintenance
        elif isinstance(maintenance, (MaintenanceRole, str)):
            try:
                policy = MaintenancePolicy(role=MaintenanceRole(maintenance))
            except ValueError:
                raise ValueError(f"maintenance={maintenance!r}: expected a MaintenancePolicy or "
                                 f"'auto', 'always', 'never'") from None
        else:
            raise TypeError(f"maintenance must be a MaintenancePolicy, MaintenanceRole or str, "
                            f"got {type(maintenance).__name__}")
        if policy.role is MaintenanceRole.NEVER:
            return None
        local = self._location.local_path
        lock = (FlockMaintenanceLock(local) if local is not None
                else WindowMaintenanceLock(self._db, policy.window_s))
        return MaintenanceScheduler(self, MemoryStore.maintain, lock, policy)

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

    # -- schema -----------------------------------------------------------------

    def _records_schema(self) -> pa.Schema:
        return pa.schema([
            pa.field("id", pa.string(), nullable=False),
            pa.field("text", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), self.dim)),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ])

    @staticmethod
    def _provenance_schema() -> pa.Schema:
        return pa.schema([
            pa.field("record_id", pa.string(), nullable=False),
            pa.field("entry_id", pa.string(), nullable=False),
            pa.field("seq", pa.int64(), nullable=False),
            pa.field("entry", pa.string(), nullable=False),
        ])

    def _open_or_create(self, name: str, schema: pa.Schema):
        try:
            return self._db.open_table(name)
        except (ValueError, FileNotFoundError):
            # exist_ok: two processes creating the same store at once both succeed.
            return self._db.create_table(name, schema=schema, exist_ok=True)

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
        with self._insert_lock:
            self._check_new_ids(records)
            self._add_records(records)
        pairs = [(r.id, e) for r in records for e in r.provenance]
        if pairs:
            self.append_provenance_batch(pairs)

    def _check_new_ids(self, records: Sequence[MemoryRecord]) -> None:
        ids = [r.id for r in records]
        seen: set[UUID] = set()
        twice = [i for i in ids if i in seen or seen.add(i)]
        present = self.existing_ids(ids)
        if twice or present:
            raise DuplicateIdError(list(dict.fromkeys([*twice, *(i for i in ids if i in present)])))

    def existing_ids(self, ids: Iterable[UUID | str]) -> set[UUID]:
        """Those of ``ids`` that name a record in the store."""
        wanted = {str(UUID(str(i))) for i in ids}
        known = wanted & self._known_ids
        unknown = wanted - known
        found = self._select_in(self._records, "id", unknown) if unknown else set()
        self._remember_ids(found)
        return {UUID(i) for i in known | found}

    def _add_records(self, records: Sequence[MemoryRecord]) -> None:
        table = pa.table({
            "id": [str(r.id) for r in records],
            "text": [r.text for r in records],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array([x for r in records for x in r.embedding], pa.float32()), self.dim),
            "created_at": [r.created_at for r in records],
        }, schema=self._records_schema())
        self._records.add(table)
        self._remember_ids(str(r.id) for r in records)

    def get(self, id: UUID | str) -> Optional[MemoryRecord]:
        """The record with its provenance in append order, or None.

        The record row and its provenance rows are two indexed lookups
        (BTree on ``records.id`` and ``provenance.record_id`` once
        :meth:`maintain` has run); the provenance one runs on a helper thread
        while this one fetches the record, so the latency is about the slower of the two.
        """
        rid = str(UUID(str(id)))
        result: list = []
        helper = threading.Thread(target=self._provenance_into, args=(rid, result), name="iai_queue-get",
                                  daemon=True)  # short-lived: no thread outlives the call
        helper.start()
        try:
            rows = self._records.search().where(f"id = '{rid}'").limit(1).to_arrow()
        finally:
            helper.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        if rows.num_rows == 0:
            return None
        row = rows.slice(0, 1).to_pylist()[0]
        return MemoryRecord(
            id=UUID(row["id"]), text=row["text"], embedding=list(row["embedding"]),
            provenance=result[0], created_at=row["created_at"])

    def _provenance_into(self, rid: str, result: list) -> None:
        try:
            result.append(self._provenance_of(rid))
        except BaseException as exc:  # handed to get() on the calling thread
            result.append(exc)

    def _provenance_of(self, rid: str) -> list[dict]:
        rows = (self._provenance.search().where(f"record_id = '{rid}'")
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

    def count(self) -> int:
        return self._records.count_rows()

    def provenance_rows(self) -> int:
        """Rows in the provenance table (duplicates of an entry id included)."""
        return self._provenance.count_rows()

    def search(self, embedding: Sequence[float], k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` nearest records by cosine distance: ``[{"id", "text", "score"}]``, best first."""
        if len(embedding) != self.dim:
            raise ValueError(f"cue_embedding has length {len(embedding)}, store dim is {self.dim}")
        rows = (self._records.search(list(embedding), vector_column_name="embedding")
                .distance_type("cosine").limit(k).select(["id", "text", "_distance"]).to_arrow())
        return [{"id": UUID(i), "text": t, "score": 1.0 - d}
                for i, t, d in zip(rows.column("id").to_pylist(), rows.column("text").to_pylist(),
                                   rows.column("_distance").to_pylist())]

    # -- provenance ----------------------------------------------------------------

    def append_provenance_batch(self, pairs: Sequence[tuple[UUID | str, dict]],
                                records_cache: Optional[Mapping[Any, MemoryRecord]] = None) -> int:
        """Append ``(record_id, entry)`` pairs in one commit, synchronously.

        Order is kept per record. Pairs for record ids the store does not have
        are skipped; returns how many were skipped so (0 when all were known).
        Raises what LanceDB raises (the caller retries), or
        :class:`~iai_queue.jsoncodec.UnencodableEntries` — before writing
        anything — naming every entry JSON cannot hold (see :mod:`iai_queue.jsoncodec`).

        Cost: one LanceDB ``add`` per call plus O(1) Python per pair (a cached
        id string and one JSON encode); columns go to Arrow in bulk.
        """
        n = len(pairs)
        if not n:
            return 0
        entry_ids = getattr(pairs, "entry_ids", None)
        if entry_ids is None:
            prefix, counter = self._entry_prefix, self._entry_counter
            entry_ids = [f"{prefix}{next(counter)}" for _ in range(n)]
        record_ids = self._id_strings(pairs)
        keep = self._existing(record_ids, records_cache)  # None: all of them
        unknown = 0 if keep is None else n - len(keep)
        if getattr(pairs, "verify", False):
            stored = self._stored_entry_ids(entry_ids if keep is None else [entry_ids[i] for i in keep])
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
        self._provenance.add(pa.Table.from_arrays([
            pa.array(record_ids, pa.string()),
            pa.array(entry_ids, pa.string()),
            pa.array(np.arange(base, base + m, dtype=np.int64)),
            pa.array(entries, pa.string()),
        ], schema=self._provenance_schema()))
        if self._scheduler is not None:
            self._scheduler.note_rows(m)
        return unknown

    def _id_strings(self, pairs) -> list[str]:
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

    def _existing(self, record_ids: list[str], records_cache) -> Optional[list[int]]:
        """Indexes into ``record_ids`` of records that exist; None when all of them do."""
        known = self._known_ids
        if records_cache:
            self._remember_ids(str(k) for k in records_cache)
            known = self._known_ids
        if known.issuperset(record_ids):
            return None
        unknown = {r for r in record_ids if r not in known}
        found = self._select_in(self._records, "id", unknown)
        self._remember_ids(found)
        known = self._known_ids
        if len(found) == len(unknown):
            return None
        return [i for i, r in enumerate(record_ids) if r in known]

    def _remember_ids(self, ids: Iterable[str]) -> None:
        if len(self._known_ids) > _KNOWN_IDS_MAX:
            self._known_ids = set()  # a cache, not a registry: rebuilt from lookups
        self._known_ids.update(ids)

    def _stored_entry_ids(self, entry_ids: Sequence[str]) -> set[str]:
        return self._select_in(self._provenance, "entry_id", entry_ids)

    def stored_entry_ids_between(self, low: str, high: str) -> set[str]:
        """Entry ids ``low <= id < high`` in the provenance table, in one range scan.

        What a journal replay verifies a dead writer's ids against (one query per
        segment instead of ``IN`` lists per batch); the entry_id index serves it once
        maintenance has built it.
        """
        rows = (self._provenance.search().where(f"entry_id >= {_sql_str_list([low])} AND "
                                                f"entry_id < {_sql_str_list([high])}")
                .select(["entry_id"]).limit(None).to_arrow())
        return set(rows.column("entry_id").to_pylist())

    @staticmethod
    def _select_in(table, column: str, values: Iterable[str]) -> set[str]:
        values = list(values)
        found: set[str] = set()
        for start in range(0, len(values), _IN_LIST_CHUNK):
            chunk = values[start:start + _IN_LIST_CHUNK]
            rows = (table.search().where(f"{column} IN ({_sql_str_list(chunk)})")
                    .select([column]).limit(None).to_arrow())
            found.update(rows.column(column).to_pylist())
        return found

    def maintain(self) -> None:
        """Compact both tables and build the scalar indexes lookups use.

        Runs on the caller's thread; the store's own scheduler (see
        :mod:`iai_queue.maintenance`) calls it in the background by work done and
        idleness. It is safe at any time, also while other threads, processes or
        hosts append, never needed for correctness, and what makes ``get()``
        fast on a large provenance table.
        """
        for table, column in ((self._records, "id"), (self._provenance, "record_id"),
                              (self._provenance, "entry_id")):
            if not any(idx.columns == [column] for idx in table.list_indices()):
                if table.count_rows():
                    _retry_commit_conflicts(lambda: table.create_index(column, config=BTree(), replace=False))
        _retry_commit_conflicts(self._records.optimize)
        _retry_commit_conflicts(self._provenance.optimize)

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

    # -- the provenance queue toggle -------------------------------------------------

    @property
    def provenance_queue(self):
        """The live :class:`~iai_queue.ProvenanceWriteQueue`, or None while writes are synchronous."""
        return self._provenance_queue

    def enable_provenance_queue(self, coalesce_ms: Optional[float] = None, **queue_options: Any):
        """Start routing :meth:`queue_provenance_batch` through a write-behind queue; returns it.

        Options not given here come from the ``IAI_QUEUE_*`` environment
        variables (see :mod:`iai_queue.envconfig`), then the queue's defaults.

        Idempotent: when a queue is already live it is returned unchanged. If
        the options asked for differ from the live queue's, they are *not*
        applied (that would mean draining and restarting it under the callers'
        feet): a WARNING ``enable.options_ignored`` names each difference.
        Disable, then enable, to change them.
        """
        from .envconfig import resolve_queue_options
        from .events import emit
        from .writebehind import ProvenanceWriteQueue

        options = resolve_queue_options({"coalesce_ms": coalesce_ms, **queue_options})
        with self._sync_lock, self._toggle_lock:
            if self._provenance_queue is None:
                q = ProvenanceWriteQueue(self, **options)
                q.start()  # after every disabled-mode write in progress: its spill files are seen
                self._retired_queue = None
                self._sync_queue = None  # rebuilt with these options (its spill directory) when next needed
                last = self._last_queue() if self._last_queue is not None else None
                if last is not None:
                    last.forward_to(q.enqueue)  # a caller still holding it lands behind in this one
                self._last_queue = weakref.ref(q)
                self._provenance_queue = q
                self._queue_options = options
                return q
            live, q = self._queue_options, self._provenance_queue
        differs = {k: v for k, v in options.items() if _option_value(k, live.get(k, _DEFAULT)) != _option_value(k, v)}
        if differs:
            emit(log, logging.WARNING, "enable.options_ignored",
                 options=", ".join(f"{k}={v!r} (live: {live.get(k, 'default')!r})" for k, v in differs.items()),
                 hint="the queue is already live; disable_provenance_queue() first to change its options")
        return q

    def disable_provenance_queue(self, timeout: Optional[float] = None) -> None:
        """Drain and stop the queue; later writes run synchronously, behind what it held. Idempotent.

        Writes that race this call, and every write after it, go through the
        stopped queue: they wait for its drain (at most its ``exit_timeout``,
        or ``timeout``), then run on the caller's thread — or are spilled
        behind what the queue left on disk — so order per record is kept.
        """
        with self._toggle_lock:
            q, self._provenance_queue = self._provenance_queue, None
            if q is not None:
                q.retire()  # a stop()/start() elsewhere must not bring it back beside its successor
                self._retired_queue = q
        if q is None:
            return
        q.stop() if timeout is None else q.stop(timeout=timeout)
        with self._toggle_lock:
            if self._retired_queue is q and not q.left_on_disk:
                self._retired_queue = None  # drained clean: nothing to keep order behind

    def queue_provenance_batch(self, pairs: Sequence[tuple[UUID | str, dict]]) -> None:
        """Hand pairs to the live queue, or append them now on this thread (behind a retired queue's entries)."""
        q = self._provenance_queue
        if q is None:
            with self._sync_lock:  # disabled mode: enabling waits for a write in progress here
                q = self._provenance_queue
                if q is None:
                    q = self._retired_queue or self._sync_queue
                    if q is None:
                        from .writebehind import ProvenanceWriteQueue

                        # A queue that never runs: its closed route is the synchronous write,
                        # with the same checks, codec and quarantine as every other path.
                        q = self._sync_queue = ProvenanceWriteQueue(self, **self._queue_options)
                        q.stop()
                    q.enqueue(pairs)
                    return
        q.enqueue(pairs)

    async def adisable_provenance_queue(self) -> None:
        """:meth:`disable_provenance_queue` without blocking the event loop."""
        import anyio.to_thread

        await anyio.to_thread.run_sync(self.disable_provenance_queue)
