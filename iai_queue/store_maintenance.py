"""What the store's maintenance does (indexes, compaction, clustering, pruning) and which scheduler runs it.

Guarantee: :meth:`TableMaintenance.run` loses and doubles no row at any time, also
while other threads, processes or hosts append or maintain; it is never needed
for correctness. A commit refused as a "retryable commit conflict" (another
maintainer's commit came first; nothing of the refused one was written) is run
again, a few times with backoff. The one cost to others: a read, append or
merge that began from a version pruned meanwhile fails with not-found and is
repeated (:class:`VersionPruner`). When and where it runs in the background is
:mod:`iai_queue.maintenance`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from lancedb.index import BTree

from .location import StoreLocation
from .maintenance import (FlockMaintenanceLock, MaintenancePolicy, MaintenanceRole, MaintenanceScheduler,
                          WindowMaintenanceLock)
from .provenance_clustering import ProvenanceClusterer

__all__ = ["TableMaintenance", "VersionPruner", "make_scheduler"]

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


class TableMaintenance:
    """One store's maintenance and what it remembers between runs (which fragments are sorted, when
    versions were first seen superseded)."""

    def __init__(self, records, provenance):
        self._records, self._provenance = records, provenance
        self._clusterer = ProvenanceClusterer(provenance)
        self._pruners = (VersionPruner(records), VersionPruner(provenance))

    def run(self) -> None:
        """Build the scalar indexes lookups use (once a table has rows), compact the records, cluster the
        provenance rows by record (:mod:`iai_queue.provenance_clustering`), bring indexes up to date, then
        prune both tables' superseded versions (:class:`VersionPruner`)."""
        records, provenance = self._records, self._provenance
        for table, column in ((records, "id"), (provenance, "record_id"), (provenance, "entry_id")):
            if not any(idx.columns == [column] for idx in table.list_indices()):
                if table.count_rows():
                    _retry_commit_conflicts(lambda: _create_index(table, column))
        _retry_commit_conflicts(records.optimize)
        _retry_commit_conflicts(self._clusterer.run)
        _retry_commit_conflicts(lambda: _update_indexes(provenance))
        for pruner in self._pruners:
            pruner.run()


def _create_index(table, column: str) -> None:
    try:
        table.create_index(column, config=BTree(), replace=False)
    except Exception as exc:
        if "already exists" in str(exc):
            return  # another maintainer created it since we looked
        raise


def _update_indexes(table) -> None:
    """LanceDB's ``optimize()`` without its compaction (that would concatenate the sorted runs and undo
    the size tiers clustering keeps), and cheaper: new rows go into a small delta index segment (tens
    of ms) instead of a rebuild of the whole index (seconds at 10 M rows); segments are merged once
    :data:`_MAX_INDEX_SEGMENTS` accumulate."""
    dataset = table.to_lance()
    segments = max((table.index_stats(idx.name).num_indices for idx in table.list_indices()), default=0)
    dataset.optimize.optimize_indices(num_indices_to_merge=0 if segments < _MAX_INDEX_SEGMENTS else segments)


_MAX_INDEX_SEGMENTS = 8
VERSION_GRACE_S = 10.0


class VersionPruner:
    """Removes a table's versions (and the files only they used) once this process has seen them
    superseded for ``VERSION_GRACE_S``.

    Why: every commit leaves a manifest, and a reader that looks up the latest
    version lists them all (7 ms per get() at 2 500). Judged by this process's
    monotonic clock from when it first saw a version superseded, never by the
    manifests' timestamps (other hosts' clocks, local time across a DST change),
    so a version is always older than the grace when it goes. A read, append or
    merge that started from a version more than the grace before can then fail
    with not-found: the queue retries an append (entry ids keep it once), a
    failed maintenance run is run again, a failed get() can be repeated.
    """

    def __init__(self, table, clock: Callable[[], float] = time.monotonic):
        self._table = table
        self._clock = clock
        self._superseded_since: dict[int, float] = {}

    def run(self) -> int:
        """Prune what is due; returns how many versions went."""
        dataset = self._table.to_lance()
        versions = [v["version"] for v in dataset.versions()]
        if not versions:
            return 0
        now, latest, seen = self._clock(), max(versions), self._superseded_since
        self._superseded_since = {v: seen.get(v, now) for v in versions if v != latest}
        due = [v for v, since in self._superseded_since.items() if now - since >= VERSION_GRACE_S]
        if due:
            dataset.cleanup_old_versions(versions=due, error_if_tagged_old_versions=False)
            for v in due:
                del self._superseded_since[v]
        return len(due)


def make_scheduler(maintenance: "MaintenancePolicy | MaintenanceRole | str | None", location: StoreLocation, db,
                   store: Any, maintain: Callable[[Any], None]) -> Optional[MaintenanceScheduler]:
    """The scheduler for ``store`` (``maintain`` is a function of the store), or None for ``"never"``.

    ``maintenance``: a policy, a role (``"auto"``, ``"always"``, ``"never"``), or
    None for ``$IAI_QUEUE_MAINTENANCE``; a bad value raises naming it.
    """
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
    local = location.local_path
    lock = (FlockMaintenanceLock(local) if local is not None
            else WindowMaintenanceLock(db, policy.window_s))
    return MaintenanceScheduler(store, maintain, lock, policy)
