"""What ``stats()`` returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["QueueStats"]


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of one queue's counters (pairs unless named otherwise)."""

    accepted: int
    written: int
    pending: int  # in memory, waiting for the store (the batch being written included)
    spill_buffered: int  # in memory, waiting for the spill directory
    spilled_files: int
    spilled_pairs: int
    replayed: int  # pairs written from spill files
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
