"""What the store's maintenance does (compaction, scalar indexes) and which scheduler runs it.

Guarantee: :func:`maintain_tables` is safe at any time, also while other
threads, processes or hosts append; it is never needed for correctness. A
commit refused as a "retryable commit conflict" (another maintainer's commit
came first; nothing of the refused one was written) is run again, a few times
with backoff. When and where it runs in the background is
:mod:`iai_queue.maintenance`.
"""

from __future__ import annotations

import time
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


def maintain_tables(records, provenance) -> None:
    """Build the scalar indexes lookups use (once a table has rows), then compact both tables."""
    for table, column in ((records, "id"), (provenance, "record_id"), (provenance, "entry_id")):
        if not any(idx.columns == [column] for idx in table.list_indices()):
            if table.count_rows():
                _retry_commit_conflicts(lambda: table.create_index(column, config=BTree(), replace=False))
    _retry_commit_conflicts(records.optimize)
    _retry_commit_conflicts(provenance.optimize)


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
