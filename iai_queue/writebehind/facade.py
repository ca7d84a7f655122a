"""ProvenanceWriteQueue: the parts put together, and the lifecycle around them.

Guarantee 8 (fork): in a child the queue starts empty with fresh locks; it
starts a worker on first use and never writes the parent's entries. The child
must open its own store: LanceDB does not survive ``fork()``.

Guarantee 9 (exit): ``start()`` registers the queue's exit handler with
``atexit.register`` and ``stop()`` unregisters it, so a stopped queue is never
kept alive by atexit. The handler waits at most ``exit_timeout`` seconds for
the store, then spills, and never raises. (CPython before 3.12 keeps an empty
slot per unregistered handler: 8 bytes per start/stop.)

Write-ahead mode (``durability`` other than ``"memory"``, see
:mod:`.journaling`): ``enqueue`` is :meth:`JournaledAdmission.enqueue`;
``stop()`` leaves what the store has not taken in the journal instead of
spilling it (only calls the journal refused are spilled), and the exit
handler does not wait for the store (``exit_timeout`` defaults to 0).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Optional

from ..envconfig import resolve_queue_options
from ..events import RateLimiter, emit
from ..pairs import EntryIds, ProvenanceBatch, ProvenanceSink
from ..spill import SpillDirectory
from .admission import Admission, Route
from .async_surface import AsyncSurface
from .closed import ClosedRoute
from .chunks import Chunk, chunk_parts, chunk_seq
from .config import OptionsView, QueueConfig
from .delivery import Delivery
from .journal_replay import JournalsFirst, memory_mode_replay
from .journaling import JournaledAdmission, JournalThread, journal_parts
from .ledger import Ledger
from .lifecycle import Backoff, Lifecycle, StopSignal
from .quarantine import Quarantine
from .replay import Replayer, files_waiting
from .spilling import Spiller, SpillThread
from .stats import QueueStats, snapshot
from .stopping import StopSequence
from .threads import RunThreads
from .worker import Worker

__all__ = ["ProvenanceWriteQueue"]

log = logging.getLogger("iai_queue.queue")

_live_queues: "weakref.WeakSet[ProvenanceWriteQueue]" = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for q in list(_live_queues):
        q._reinit_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


class ProvenanceWriteQueue(OptionsView, AsyncSurface):
    """Write-behind queue for ``(record_id, entry)`` provenance pairs.

    ``enqueue`` never blocks on the store or the disk; a daemon worker writes
    coalesced batches through ``store.append_provenance_batch``, looked up at
    call time so a wrapper installed on the instance takes effect.
    """

    def __init__(self, store: ProvenanceSink, *, coalesce_ms: Optional[float] = None,
                 max_queue_size: Optional[int] = None, max_batch_pairs: Optional[int] = None,
                 spill_dir: str | os.PathLike[str] | None = None, max_memory_pairs: Optional[int] = None,
                 exit_timeout: Optional[float] = None, retry_initial_s: Optional[float] = None,
                 retry_max_s: Optional[float] = None, idle_replay_s: Optional[float] = None,
                 replay_batch_pairs: Optional[int] = None, spill_file_pairs: Optional[int] = None,
                 backlog_batch_pairs: Optional[int] = None, durability: Optional[str] = None,
                 fsync_interval_ms: Optional[float] = None):
        """Options not given come from ``IAI_QUEUE_<OPTION>`` (see :mod:`iai_queue.envconfig`), else the
        defaults of :class:`~iai_queue.writebehind.config.QueueConfig` (``coalesce_ms=50``,
        ``max_queue_size=4096``, ``max_batch_pairs=256``, ``exit_timeout=2.0``, …).
        ``durability="process"`` (or ``"fsync-interval"``, ``"fsync-always"``) journals every call before
        ``enqueue`` returns; ``fsync_interval_ms`` (default 100) is the group-commit window.
        Raises ValueError naming a bad option (or variable) and its value."""
        self._cfg = QueueConfig.from_options(**resolve_queue_options(dict(
            coalesce_ms=coalesce_ms, max_queue_size=max_queue_size, max_batch_pairs=max_batch_pairs,
            spill_dir=spill_dir, max_memory_pairs=max_memory_pairs, exit_timeout=exit_timeout,
            retry_initial_s=retry_initial_s, retry_max_s=retry_max_s, idle_replay_s=idle_replay_s,
            replay_batch_pairs=replay_batch_pairs, spill_file_pairs=spill_file_pairs,
            backlog_batch_pairs=backlog_batch_pairs, durability=durability, fsync_interval_ms=fsync_interval_ms)))
        self._store = store
        self._init_state()
        _live_queues.add(self)

    def _init_state(self) -> None:
        """Build the parts; everything a forked child must not share with its parent."""
        cfg = self._cfg
        lock = self._lock = threading.Lock()
        warn = RateLimiter()  # has a lock of its own
        ledger = self._ledger = Ledger(lock)
        ids = self._ids = EntryIds()
        spill = self._spill = SpillDirectory(cfg.spill_dir, store_path=getattr(self._store, "path", None),
                                            tag=getattr(self._store, "identity", None))
        adm = self._admission = Admission(lock, cfg, ledger, warn, on_closed=self._closed_route)
        self.enqueue = adm.enqueue  # the hot path, bound directly: no hop through the facade
        backoff = self._backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        quarantine = Quarantine(lock, ledger, spill, warn)
        delivery = self._delivery = Delivery(lock, ledger, self._write_to_store, backoff, warn, quarantine.pairs)
        replayer = Replayer(lock, ledger, spill, delivery, quarantine, warn, batch_pairs=cfg.replay_batch_pairs,
                            retry_unreadable_s=cfg.idle_replay_s, memory_empty=lambda: not adm.pending)
        self._journal: Optional[JournaledAdmission] = None
        journal_idle = None
        if cfg.durability.journaled:  # write-ahead mode (journaling.py); memory mode never gets here
            self._journal, self._journal_replayer, journal_idle = journal_parts(adm, lock, ledger, warn, spill, ids,
                                                                                delivery, cfg)
            self.enqueue = self._journal.enqueue
            self._journal_replayer.use_store(self._store)
        else:  # memory mode replays dead writers' journals too (journal_replay.py)
            self._journal_replayer, journal_idle = memory_mode_replay(
                lock, ledger, spill, delivery, warn, cfg, ids.prefix, self._store,
                held_behind=lambda: adm.route is Route.BEHIND_SPILL)
        orphans_first = JournalsFirst(self._journal_replayer, replayer)  # a dead writer's journal before its spill files
        self._worker_loop = Worker(lock, cfg, ledger, ids, adm, delivery, orphans_first,
                                   self._maintenance_call, warn, journal_idle)
        self._spiller = Spiller(lock, ledger, ids, spill, quarantine, warn)
        self._closed = ClosedRoute(lock, adm, ledger, ids, delivery, self._spiller, spill, orphans_first,
                                   deadline=lambda: self._stop.deadline, replay_budget_s=max(1.0, cfg.exit_timeout))
        self._spill_loop = SpillThread(lock, cfg, adm, self._spiller, backoff)
        self._warn = warn
        self._stop = StopSignal()  # the current run's
        self._threads = RunThreads(lock, ledger, backoff)
        self._stopping = StopSequence(lock, adm, ledger, ids, delivery, self._spiller, spill, self._closed,
                                      self._threads, self._journal, lambda: self._stop, self._done_seq)
        self._retired = False  # disabled by the store: start() refuses

    def _reinit_after_fork(self) -> None:
        # The parent's pending entries stay the parent's: the child starts empty
        # (NEW), and starts a worker of its own on first enqueue.
        self._spill.forget_after_fork()
        self._init_state()

    def _maintenance_call(self) -> Optional[Callable[[], Any]]:
        """What the worker calls when idle: the store's scheduler if it has one (off the worker's
        thread, one host at a time), else its ``maintain()``, else nothing."""
        return getattr(self._store, "request_maintenance", None) or getattr(self._store, "maintain", None)

    def _write_to_store(self, batch: ProvenanceBatch) -> Optional[int]:
        """The store's append (looked up now: hosts wrap it); what it returns (pairs skipped for unknown ids)."""
        return self._store.append_provenance_batch(batch, records_cache=None)

    @property
    def spill_directory(self) -> SpillDirectory:
        """This queue's spill directory. Its ``write`` is looked up at each spill: it may be wrapped."""
        return self._spill

    @property
    def _prefix(self) -> str:
        return self._ids.prefix

    @property
    def _worker(self) -> Optional[threading.Thread]:
        return self._threads.worker

    def retire(self) -> None:
        """Never start again (the store's toggle disabled this queue); call before ``stop()``."""
        self._retired = True

    def forward_to(self, enqueue: Callable[[list], None]) -> None:
        """After ``stop()``: hand later enqueues to ``enqueue`` (the store's toggle: to its live queue), so a
        caller still holding this queue lands behind what the new one holds, not beside it. Returns once a
        closed-route write in progress has ended: start the new queue after this call."""
        self._closed.forward_to(enqueue)

    @property
    def left_on_disk(self) -> bool:
        """After ``stop()``: True when entries it accepted wait in spill files (later writes go behind them)."""
        return self._closed.left_on_disk

    @property
    def running(self) -> bool:
        return self._admission.state is Lifecycle.RUNNING

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "ProvenanceWriteQueue":
        """Start the worker and spill threads and register the exit handler. Idempotent."""
        adm = self._admission
        with self._closed.lock, self._lock:
            if adm.state in (Lifecycle.RUNNING, Lifecycle.CLOSING):
                return self
            if self._retired:  # the store disabled it: it never runs again
                emit(log, logging.WARNING, "start.retired",
                     reason="the store's toggle retired this queue; enqueues go behind it, or to its successor")
                return self
            self._spill.reopen()
            stop = self._stop = StopSignal()
            # Spill files of our store already waiting: new entries go behind them.
            behind = adm.route is not Route.MEMORY or files_waiting(self._spill) \
                or bool(self._journal_replayer.orphans())  # dead writers' journals: behind them too
            if self._journal is not None:  # write-ahead: behind them in the journal's backlog instead
                hold = behind or bool(self._journal_replayer.orphans())
                self._journal.start(hold=hold)
                behind = hold and not self._journal.holding  # the journal did not open: memory mode's way
            self._spill.record_store()
            adm.set_locked(state=Lifecycle.RUNNING, route=Route.BEHIND_SPILL if behind else Route.MEMORY)
            self._threads.start(stop, self._worker_loop.run, self._spill_loop.run)
            if self._journal is not None:
                interval = self._cfg.fsync_interval_s if self._cfg.durability.fsyncs else 1.0
                self._threads.start_journal(stop, JournalThread(self._journal, lambda: self._done_seq(), interval).run)
        # Per start(), by contract: hosts capture the handler from atexit.register.
        atexit.register(self._at_exit)
        return self

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Drain, then stop. Blocks up to ``timeout`` seconds (default ``exit_timeout``) for the store.

        What the store has not taken by then is spilled. Returns True when
        everything accepted before it began was written (a call made during the
        drain is its caller's to write, behind it, or stays in the journal).
        Idempotent; ``start()`` works again after.
        """
        timeout = self._cfg.exit_timeout if timeout is None else timeout
        atexit.unregister(self._at_exit)
        return self._stopping.run(timeout)

    def _done_seq(self) -> int:
        with self._lock:
            return self._ledger.written_seq

    def sync(self, timeout: float = 2.0) -> bool:
        """Write-ahead mode: block until every call enqueued before this one is fsynced to the journal.

        True when it is (calls the journal refused are not counted); False on
        timeout. In memory mode there is no journal: returns False at once.
        """
        return self._journal is not None and self._journal.sync(timeout)

    def _closed_route(self, chunk: Chunk) -> None:
        """A chunk that arrived with the route closed: a new queue's first use, or during or after stop()."""
        state = self._closed.wait_for_drain()
        if state is Lifecycle.NEW or (state is Lifecycle.RUNNING and self._journal is not None):
            # The first use starts the queue. Or it was started again meanwhile, in a write-ahead mode: the
            # call is journaled anew (a record's seq must exceed its segment's last), behind what the last
            # run left on disk. Either way it goes through the bound enqueue; its first number is done with.
            if state is Lifecycle.NEW:
                self.start()
            pairs, _, _ = chunk_parts(chunk, self._ids)
            try:
                self.enqueue(list(pairs))
            finally:
                with self._lock:
                    self._ledger.mark_done((chunk_seq(chunk),))
            return
        if state is Lifecycle.RUNNING:
            self._admission.readmit(chunk)  # keeps its seq: a fresh one would leave this one never done
            return
        self._closed.take(chunk, state, again=self._closed_route)

    def _at_exit(self) -> None:
        try:
            self.stop(self._cfg.exit_timeout)
        except BaseException:  # an exit handler must not raise
            log.exception("exit handler failed")

    def __enter__(self) -> "ProvenanceWriteQueue":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- the hot path, flush and stats -------------------------------------------------------

    def enqueue(self, pairs: list) -> None:
        """Accept ``pairs`` (a list of ``(UUID, dict)``) for writing; returns at once.

        Never blocks on the store and never raises because of the store or the
        disk. Blocks only when memory already holds ``max_memory_pairs`` for a
        working spill directory that is slower than the callers (backpressure).
        Raises TypeError/ValueError naming the first bad element, and then
        accepts nothing from this call. An empty list is a no-op.
        """
        self._admission.enqueue(pairs)  # shadowed per instance by the bound method itself (see _init_state)

    def flush(self, timeout: float = 2.0) -> bool:
        """Block until everything enqueued before this call is in the store, or ``timeout`` passes.

        Returns True when it is, False on timeout (the entries are still
        pending, in memory or on disk, and will be written) or when the queue
        is stopped with entries left on disk. Safe from any thread.
        """
        ledger, adm = self._ledger, self._admission
        with self._lock:
            target = ledger.boundary()  # every call enqueued before us has a smaller number
            if ledger.written_seq >= target or adm.state is Lifecycle.STOPPED:
                return ledger.written_seq >= target
            ledger.flush_waiters += 1
        adm.worker_wake.set()  # cut the coalescing window short
        try:
            with self._lock:
                return ledger.done_advanced.wait_for(lambda: ledger.written_seq >= target, timeout)
        finally:
            with self._lock:
                ledger.flush_waiters -= 1

    def stats(self) -> QueueStats:
        """A consistent snapshot of the counters (:mod:`.stats`); never blocks on the store."""
        return snapshot(self._lock, self._ledger, self._admission, self._delivery,
                        lambda: self._worker_loop.last_empty, self._journal, self._journal_replayer)
