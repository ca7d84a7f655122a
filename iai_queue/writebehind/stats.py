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

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON, metrics, logs)."""
        return asdict(self)
