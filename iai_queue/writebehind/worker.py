"""The worker thread: coalesce, deliver, and do the idle work.

Guarantee 4 (order), the worker half: batches leave memory in acceptance order;
when memory is empty the worker first replays spill files (oldest first), and
refills memory from the spill buffer only when no file waits.

The worker coalesces for up to ``coalesce_ms`` or ``max_batch_pairs`` pairs
(a flush or stop cuts the wait short); under a backlog (more than one full
batch waiting) it takes up to ``backlog_batch_pairs`` per write instead. It calls
``store.maintain()`` when it has been idle for a while after writing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from ..events import RateLimiter
from ..pairs import EntryIds
from .admission import Admission, Route
from .config import QueueConfig
from .delivery import Batch, Delivery
from .journal_replay import JournalsFirst
from .ledger import Ledger
from .lifecycle import Abandoned, GiveUp, Lifecycle, StopSignal

__all__ = ["Worker"]

log = logging.getLogger("iai_queue.queue")


class Worker:
    def __init__(self, lock: threading.Lock, cfg: QueueConfig, ledger: Ledger, ids: EntryIds,
                 admission: Admission, delivery: Delivery, replayer: JournalsFirst,
                 maintain: Callable[[], Optional[Callable[[], Any]]], warn: RateLimiter,
                 journal_idle: Optional[Callable[[StopSignal], bool]] = None):
        self.lock = lock
        self.cfg = cfg
        self.ledger = ledger
        self.ids = ids
        self.admission = admission
        self.delivery = delivery
        self.replayer = replayer
        self.maintain = maintain  # returns the store's maintain(), looked up at call time, or None
        self.warn = warn
        self.journal_idle = journal_idle  # write-ahead mode: orphan journals, then the backlog (journaling.py)
        self.last_empty = time.monotonic()  # when the worker last found memory empty

    def run(self, stop: StopSignal) -> None:
        try:
            with self.lock:
                unfinished = self.delivery.unfinished_locked(stop)
            if unfinished is not None:  # a crash left it: it goes before anything newer
                self.delivery.deliver(unfinished, stop, resume=True)
                with self.lock:
                    self.delivery.finish_locked(stop)
                    self.ledger.mark_done(unfinished.done_seqs)
            while True:
                batch = self._next_batch(stop)
                if batch is None:
                    return
                self.delivery.deliver(batch, stop)
                with self.lock:
                    self.delivery.finish_locked(stop)
                    self.ledger.mark_done(batch.done_seqs)
        except (GiveUp, Abandoned):
            return

    def _next_batch(self, stop: StopSignal) -> Optional[Batch]:
        """The next batch from memory; does idle work while there is none. None: time to exit."""
        adm, cfg = self.admission, self.cfg
        coalesced = False
        while True:
            if stop.abandoned:
                return None
            closing = adm.state is not Lifecycle.RUNNING
            if not adm.pending:
                self.last_empty = time.monotonic()
                if closing:
                    return None
                if self._idle_work(stop):
                    continue
                if not adm.wait_for_pending(1, min(cfg.idle_replay_s, 1.0),
                                            lambda: not adm.pending and adm.state is Lifecycle.RUNNING):
                    self._maintain()
                continue
            if not coalesced and not closing and not self.ledger.flush_waiters \
                    and not adm.full_batch_waiting(cfg.max_batch_pairs):
                coalesced = True
                # A chunk holds at least one pair: this many chunks make a full batch.
                adm.wait_for_pending(cfg.max_batch_pairs, cfg.coalesce_s,
                                     lambda: not self.ledger.flush_waiters
                                     and not adm.full_batch_waiting(cfg.max_batch_pairs))
                continue
            return self.take(stop)

    def take(self, stop: StopSignal) -> Batch:
        """Up to max_batch_pairs from memory (up to replay_batch_pairs under a backlog), published as
        in flight in the same step. Raises Abandoned, taking nothing, once stop() has given up on the run:
        what memory holds then is a later run's (or stop()'s)."""
        room = self.cfg.max_batch_pairs
        if self.admission.full_batch_waiting(2 * room):
            # More than one batch waits: a LanceDB commit costs about the same for 256 rows or
            # 8000, so take more per commit (as Kafka's producer fills batch.size under load).
            room = self.cfg.backlog_batch_pairs
        with self.lock:
            stop.raise_if_abandoned()
            pairs, eids, done = self.admission.take_locked(room, self.ids)
            batch = Batch(pairs, eids, done_seqs=done)
            self.delivery.publish_locked(batch, stop)
            return batch

    def _idle_work(self, stop: StopSignal) -> bool:
        """Called when memory is empty. True when it did something."""
        if self.replayer.replay_some(stop):
            return True
        if self.journal_idle is not None and self.journal_idle(stop):
            return True
        adm = self.admission
        if adm.route is not Route.BEHIND_SPILL:
            return False
        generation = self.ledger.n["spilled_files"]
        if self.replayer.waiting():
            return False  # ours are still on disk, or earlier files or journals of our store wait for their replayer
        with self.lock:
            stop.raise_if_abandoned()  # the spill buffer may be a later run's
            return adm.refill_locked(generation)

    def _maintain(self) -> None:
        if not self.ledger.rows_since_maintain:
            return
        maintain = self.maintain()
        if maintain is None:
            return
        self.ledger.rows_since_maintain = 0
        try:
            maintain()
        except Exception as exc:
            self.warn.emit(log, logging.WARNING, "maintain.failed", error=repr(exc)[:300])
