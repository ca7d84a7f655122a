"""Queue metrics for the places operators already look: Prometheus and OpenTelemetry.

Both bridges read one seam — a callable returning a :class:`~iai_queue.QueueStats`
snapshot, or None while there is no queue (then nothing is reported) — and
expose every ``stats()`` field under one naming table, :data:`METRICS`:
monotonic counts as counters, current values as gauges (OpenTelemetry:
additive ones as up-down counters), durations in seconds.

``stats_source(obj)`` builds that callable from a store (its live
``provenance_queue``, which changes as the queue is toggled) or a queue.
Counters belong to one queue: after ``disable``/``enable`` they start again
from zero, which Prometheus ``rate()`` and OpenTelemetry cumulative sums treat
as a counter reset.

Modules: :mod:`iai_queue.metrics.prometheus` (extra ``prometheus``),
:mod:`iai_queue.metrics.otel` (extra ``otel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional

__all__ = ["Kind", "MetricSpec", "METRICS", "StatsSource", "stats_source"]

StatsSource = Callable[[], Optional[Any]]  # returns a QueueStats, or None while there is no queue


class Kind(Enum):
    COUNTER = "counter"  # only goes up (per queue)
    UPDOWN = "updown"  # a current amount that adds up across queues (entries in memory)
    GAUGE = "gauge"  # a current value that does not add up (an age, the last write's size)


@dataclass(frozen=True)
class MetricSpec:
    field: str  # the QueueStats field
    name: str  # base name: Prometheus "iai_queue_<name>" (+ "_total" for counters), OTel "iai_queue.<name with dots>"
    kind: Kind
    unit: str  # "entries", "files", "errors", "retries" or "seconds"
    help: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("accepted", "entries_accepted", Kind.COUNTER, "entries", "Provenance entries accepted by enqueue"),
    MetricSpec("written", "entries_written", Kind.COUNTER, "entries", "Entries the store took (replays included)"),
    MetricSpec("replayed", "entries_replayed", Kind.COUNTER, "entries", "Entries written from spill files"),
    MetricSpec("spilled_pairs", "entries_spilled", Kind.COUNTER, "entries", "Entries written to spill files"),
    MetricSpec("spilled_files", "spill_files_written", Kind.COUNTER, "files", "Spill files this queue wrote"),
    MetricSpec("quarantined_lines", "entries_quarantined", Kind.COUNTER, "entries",
               "Spill lines set aside in quarantine files"),
    MetricSpec("quarantined_files", "quarantine_files_written", Kind.COUNTER, "files", "Quarantine files written"),
    MetricSpec("dropped", "entries_dropped", Kind.COUNTER, "entries",
               "Entries lost (only when memory is full and the spill directory fails)"),
    MetricSpec("retries", "write_retries", Kind.COUNTER, "retries", "Backoff sleeps after failed store writes"),
    MetricSpec("store_errors", "store_errors", Kind.COUNTER, "errors", "Failed store writes"),
    MetricSpec("spill_errors", "spill_errors", Kind.COUNTER, "errors", "Failed spill-file writes"),
    MetricSpec("pending", "entries_pending", Kind.UPDOWN, "entries",
               "Entries in memory waiting for the store (the batch being written included)"),
    MetricSpec("spill_buffered", "entries_spill_buffered", Kind.UPDOWN, "entries",
               "Entries in memory waiting for the spill directory"),
    MetricSpec("oldest_pending_age_s", "oldest_pending_age", Kind.GAUGE, "seconds",
               "Upper bound on the age of the oldest entry in memory; 0 when none"),
    MetricSpec("last_batch_size", "last_batch_entries", Kind.GAUGE, "entries", "Entries in the last successful write"),
    MetricSpec("last_write_s", "last_write_duration", Kind.GAUGE, "seconds", "Duration of the last successful write"),
    MetricSpec("skipped_unknown", "entries_skipped_unknown", Kind.COUNTER, "entries",
               "Entries for record ids the store does not have (skipped, not written)"),
    MetricSpec("thread_restarts", "thread_restarts", Kind.COUNTER, "restarts",
               "Worker or spill thread crashes, each logged and the thread restarted"),
    MetricSpec("journal_fallbacks", "journal_fallbacks", Kind.COUNTER, "entries",
               "Enqueue calls that took the memory path because the journal could not be written"),
    MetricSpec("journal_bytes", "journal_bytes", Kind.UPDOWN, "bytes", "Bytes in this queue's journal segments"),
    MetricSpec("journal_segments", "journal_segments", Kind.UPDOWN, "files", "This queue's journal segments"),
    MetricSpec("journal_backlog", "entries_journal_backlog", Kind.UPDOWN, "entries",
               "Entries journaled but not in memory (re-read from the journal)"),
    MetricSpec("fsync_lag_s", "journal_fsync_lag", Kind.GAUGE, "seconds",
               "Time since the last journal fsync while records wait for one; 0 when synced"),
    MetricSpec("oldest_unreplayed_age_s", "oldest_unreplayed_age", Kind.GAUGE, "seconds",
               "Age of the oldest journaled entry not yet in the store; 0 when none"),
)


def stats_source(obj: Any) -> StatsSource:
    """A :data:`StatsSource` for a store (its live queue, whichever it is now), a queue, or a callable."""
    if hasattr(obj, "enable_provenance_queue"):  # a MemoryStore: follow the toggle
        def from_store() -> Optional[Any]:
            q = obj.provenance_queue
            return q.stats() if q is not None else None
        return from_store
    if callable(getattr(obj, "stats", None)):
        return obj.stats
    if callable(obj):
        return obj
    raise TypeError(f"expected a MemoryStore, a ProvenanceWriteQueue or a callable returning QueueStats, "
                    f"got {type(obj).__name__}")
