"""Spilling: chunks out of memory into spill files, on the spill thread or on the caller's.

Guarantee 4 (order), the spilling half: pairs spilled late (at stop) are named
older than the files already written, so they replay first; a spill file's
enqueue calls are registered in the ledger before the file becomes visible.

Guarantee 10 (disk trouble), the retry half: a failed spill puts its chunks back
at the front of the spill buffer, in order, and the spill thread retries with
the same backoff as the worker's.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ..events import RateLimiter, emit
from ..pairs import EntryIds
from ..spill import BadLine, SpillDirectory, encode_line
from ..spill.codec import unencodable_line
from .admission import Admission
from .chunks import chunk_len, chunk_parts, chunk_seq
from .config import QueueConfig
from .ledger import Ledger, expand_runs, seq_runs
from .lifecycle import Backoff, Lifecycle, StopSignal
from .quarantine import Quarantine

__all__ = ["Spiller", "SpillThread"]

log = logging.getLogger("iai_queue.queue")


class Spiller:
    """Encodes chunks and writes them as one spill file."""

    def __init__(self, lock: threading.Lock, ledger: Ledger, ids: EntryIds, directory: SpillDirectory,
                 quarantine: Quarantine, warn: RateLimiter):
        self.lock = lock
        self.ledger = ledger
        self.ids = ids
        self.directory = directory
        self.quarantine = quarantine
        self.warn = warn

    def spill(self, chunks: list, before_ts: Optional[int] = None,
              settle_locked: Callable[[], None] = lambda: None) -> bool:
        """Write chunks to one spill file. False when the directory failed (the chunks are untouched).

        ``settle_locked`` runs under the lock in the same step as the spilled
        counters move, so ``stats()`` never counts a pair twice.
        """
        lines, bad = [], []
        seqs = seq_runs(s for c in chunks if (s := chunk_seq(c)) > 0)  # consecutive calls: one run
        for c in chunks:
            pairs, eids, seen = chunk_parts(c, self.ids)
            for (rid, entry), eid in zip(pairs, eids):
                try:
                    lines.append(encode_line(rid, entry, eid, seen))
                except (TypeError, ValueError) as exc:
                    bad.append(BadLine(0, unencodable_line(rid, entry, eid),
                                       f"entry cannot be written as JSON: {exc}"))
        named: list[str] = []

        def register(name: str) -> None:
            # Before the rename: our own worker may replay the file at once and
            # must find the enqueue calls it completes.
            named.append(name)
            with self.lock:
                self.ledger.file_written(name, seqs)

        try:
            path = self.directory.write(lines, before_ts=before_ts, on_named=register) if lines else None
        except BaseException as exc:
            with self.lock:
                for name in named:  # the file never appeared
                    self.ledger.file_never_written(name)
                if isinstance(exc, OSError):
                    self.ledger.count(spill_errors=1)
            if not isinstance(exc, OSError):
                raise  # a bug, not the disk: the spill thread's supervisor logs it and restarts
            self.warn.emit(log, logging.ERROR, "spill.failed", key=exc.errno, dir=str(self.directory.path),
                           error=str(exc))
            return False
        if bad:
            self.quarantine.lines(f"{self.directory.writer}-unencodable", bad)
        with self.lock:
            settle_locked()
            if path is not None:
                self.ledger.count(spilled_files=1, spilled_pairs=len(lines))
            else:
                self.ledger.mark_done(expand_runs(seqs))  # every line was quarantined
        if path is not None:
            emit(log, logging.INFO, "spill", file=path.name, pairs=len(lines))
        return True

    def spill_or_drop(self, chunks: list, before_own_files: bool = False) -> None:
        """Spill on the calling thread (stop, late enqueues); count a failure as a drop."""
        before = self.directory.oldest_own_ts() if before_own_files else None
        if self.spill(chunks, before_ts=before):
            return
        n = sum(chunk_len(c) for c in chunks)
        with self.lock:
            self.ledger.count(dropped=n)
        self.warn.emit(log, logging.ERROR, "drop", key="stopping", count=n,
                       reason="stopping: neither the store nor the spill directory took them")


class SpillThread:
    """The loop that empties admission's spill buffer into files while the queue runs."""

    def __init__(self, lock: threading.Lock, cfg: QueueConfig, admission: Admission, spiller: Spiller,
                 backoff: Backoff):
        self.lock = lock
        self.cfg = cfg
        self.admission = admission
        self.spiller = spiller
        self.backoff = backoff

    def run(self, stop: StopSignal) -> None:
        adm, cfg = self.admission, self.cfg
        attempt = 0
        while True:
            adm.spill_wake.wait(1.0)
            adm.spill_wake.clear()
            if adm.spill_buffer_pairs < min(cfg.spill_file_pairs, cfg.max_memory_pairs // 2):
                # Under overload, wait a moment for more: few large files replay far
                # faster than many small ones. Small enough that enqueue never waits.
                stop.requested.wait(min(cfg.coalesce_s, 0.05))
            while True:
                with self.lock:
                    if stop.abandoned:  # stop() spills the rest itself; the buffer may be a later run's
                        return
                    chunks, count = adm.take_for_spill_locked(cfg.spill_file_pairs)
                if not chunks:
                    break
                try:
                    ok = self.spiller.spill(chunks, settle_locked=lambda: adm.spilled_locked(count))
                except BaseException:  # a crash: nothing was written (the directory is not known to fail)
                    self._not_spilled(chunks, count, stop, failing=False)
                    raise
                if ok:
                    with self.lock:
                        if not stop.over:
                            adm.spill_failing = False
                        adm.spill_room.notify_all()
                    attempt = 0
                    adm.worker_wake.set()  # the worker may replay it when idle
                    continue
                if self._not_spilled(chunks, count, stop):
                    return
                delay = self.backoff.delay(attempt)
                attempt += 1
                if adm.state is not Lifecycle.RUNNING or stop.requested.wait(delay):
                    return  # stop() spills the buffer itself, or counts it dropped
            if adm.state is not Lifecycle.RUNNING:
                return

    def _not_spilled(self, chunks: list, count: int, stop: StopSignal, failing: bool = True) -> bool:
        """A spill write failed (or crashed): the chunks go back to the front of the buffer, in order —
        unless stop() has finished with this run's buffer (nobody empties it now, or it is a later run's):
        then they are spilled again here, or counted dropped, and True says the thread's run is over."""
        adm = self.admission
        with self.lock:
            late = stop.over
            if late:
                adm.spilled_locked(count)
            else:
                adm.spill_failing = adm.spill_failing or failing
                adm.spill_failed_locked(chunks, count)
            adm.spill_room.notify_all()
        if late:
            self.spiller.spill_or_drop(chunks)
        return late
