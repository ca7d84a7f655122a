"""What ``stats()`` returns, and how one consistent snapshot of it is taken.

Guarantee: the counters of one snapshot agree with each other, and a counter
never goes down between snapshots. In write-ahead mode the backlog's refill
moves pairs into memory under the journal writer's lock, so the snapshot holds
that lock (then the queue's, their order) around both reads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

__all__ = ["QueueStats", "snapshot"]


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of one queue's counters (pairs unless named otherwise)."""

    accepted: int
    written: int
    pending: int  # in memory, waiting for the store (the batch being written included)
    spill_buffered: int  # in memory, waiting for the spill directory
    spilled_files: int
    spilled_pairs: int
    replayed: int  # pairs replayed from spill files and journals: handed to the store (written or skipped)
    quarantined_files: int
    quarantined_lines: int
    retries: int
    store_errors: int
    spill_errors: int
    dropped: int
    oldest_pending_age_s: float  # 0.0 when nothing is pending
    last_batch_size: int
    last_write_s: float
    skipped_unknown: int = 0  # pairs for record ids the store does not have (not counted as written)
    thread_restarts: int = 0  # worker or spill thread crashes, each logged and the thread restarted
    # Write-ahead mode (durability other than "memory"); all 0 in memory mode.
    journal_fallbacks: int = 0  # enqueue calls that took the memory path because the journal could not be written
    journal_bytes: int = 0  # bytes in this queue's journal segments on disk
    journal_segments: int = 0  # this queue's journal segments on disk
    journal_backlog: int = 0  # pairs journaled but not in memory (re-read from the journal when memory empties)
    fsync_lag_s: float = 0.0  # fsync modes: time since the last fsync while records wait for one
    oldest_unreplayed_age_s: float = 0.0  # the oldest journaled entry not yet in the store: backlog or orphan segment

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON, metrics, logs)."""
        return asdict(self)


def snapshot(lock, ledger, admission, delivery, last_empty: Callable[[], float], journal: Optional[Any] = None,
             replayer: Optional[Any] = None) -> QueueStats:
    """One queue's :class:`QueueStats` (``journal``, ``replayer``: write-ahead mode's parts)."""

    def queue_counts() -> dict:
        with lock:
            in_memory = admission.in_memory_pairs_locked()
            pending = in_memory + delivery.in_memory_pairs_locked()
            age = time.monotonic() - last_empty() if pending else 0.0
            return dict(accepted=ledger.taken + ledger.accepted_elsewhere + in_memory, pending=pending,
                        spill_buffered=admission.spill_buffer_pairs + admission.spill_in_flight,
                        oldest_pending_age_s=age, last_write_s=ledger.last_write_s, **ledger.n)

    if journal is None:
        return QueueStats(**queue_counts())
    with journal.writer.lock:
        counts = queue_counts()
        counts.update(journal.stats_locked(replayer))
        counts["accepted"] += counts["journal_backlog"] + journal.after_backlog_pairs
    return QueueStats(**counts)
