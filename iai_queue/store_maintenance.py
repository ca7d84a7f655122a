"""What the store's maintenance does (indexes, compaction, clustering, pruning) and which scheduler runs it.

Guarantee: :func:`maintain_tables` is safe at any time, also while other
threads, processes or hosts append; it is never needed for correctness. A
commit refused as a "retryable commit conflict" (another maintainer's commit
came first; nothing of the refused one was written) is run again, a few times
with backoff. When and where it runs in the background is
:mod:`iai_queue.maintenance`.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any, Callable, Optional

from lancedb.index import BTree

from .location import StoreLocation
from .maintenance import (FlockMaintenanceLock, MaintenancePolicy, MaintenanceRole, MaintenanceScheduler,
                          WindowMaintenanceLock)

__all__ = ["maintain_tables", "make_scheduler"]

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


def maintain_tables(records, provenance, cluster_provenance: Callable[[], object]) -> None:
    """Build the scalar indexes lookups use (once a table has rows), compact the records, cluster the
    provenance rows by record (:mod:`iai_queue.provenance_clustering`), then bring indexes up to date."""
    for table, column in ((records, "id"), (provenance, "record_id"), (provenance, "entry_id")):
        if not any(idx.columns == [column] for idx in table.list_indices()):
            if table.count_rows():
                _retry_commit_conflicts(lambda: _create_index(table, column))
    _retry_commit_conflicts(records.optimize)
    _prune_versions(records.to_lance())  # each record lookup lists the manifests too
    _retry_commit_conflicts(cluster_provenance)
    _retry_commit_conflicts(lambda: _index_and_prune(provenance))


def _create_index(table, column: str) -> None:
    try:
        table.create_index(column, config=BTree(), replace=False)
    except Exception as exc:
        if "already exists" in str(exc):
            return  # another maintainer created it since we looked
        raise


def _index_and_prune(table) -> None:
    """What LanceDB's ``optimize()`` does after compacting, without its compaction (that would
    concatenate the sorted runs and undo the size tiers clustering keeps), and cheaper.

    New rows go into a small delta index segment (tens of ms) instead of a
    rebuild of the whole index (seconds at 10 M rows); segments are merged once
    :data:`_MAX_INDEX_SEGMENTS` accumulate. Superseded versions go after
    :data:`_VERSION_GRACE`: every commit leaves a manifest, and a reader that
    looks up the latest version lists them all (7 ms per get() at 2 500).
    """
    dataset = table.to_lance()
    segments = max((table.index_stats(idx.name).num_indices for idx in table.list_indices()), default=0)
    dataset.optimize.optimize_indices(num_indices_to_merge=0 if segments < _MAX_INDEX_SEGMENTS else segments)
    _prune_versions(table.to_lance())


_MAX_INDEX_SEGMENTS = 8
_VERSION_GRACE = timedelta(seconds=10)


def _prune_versions(dataset) -> None:
    """Remove each version superseded more than :data:`_VERSION_GRACE` ago (and files only it used).

    A version is judged by when its successor was committed, not by its own age:
    a read that loaded it before then has had the grace to finish. A read that
    takes longer, on a file a rewrite replaced, fails with not-found; it loses
    nothing, and the next read sees the new version.
    """
    versions = dataset.versions()
    cutoff = datetime.now(versions[-1]["timestamp"].tzinfo) - _VERSION_GRACE if versions else None
    old = [v["version"] for v, successor in zip(versions, versions[1:]) if successor["timestamp"] < cutoff]
    if old:
        dataset.cleanup_old_versions(versions=old, error_if_tagged_old_versions=False)


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
