"""What ``stop()`` does: drain the queue, then hand what the store did not take to the disk.

Guarantee 7 (lifecycle), the stopping half: ``stop()`` closes the route first
(later enqueues take the closed route, :mod:`.closed`, and wait for this
drain), gives the worker until the deadline to write what memory holds, then
abandons it — a worker still stuck in the store does nothing more — and spills
what is left: the batch in flight and the memory buffers named *before* this
queue's existing files (late spills keep their order), then the spill buffer —
in one step with marking the queue stopped, after the spill thread's file in
progress, and under the closed route's lock, so a closed-route write never sees
the queue stopped before the file it must go behind is on disk. In write-ahead
mode journaled calls stay in the journal and only the others are spilled. It
returns True when everything accepted before it began was written (a call that
came during the drain is written behind it by its caller, or, in write-ahead
mode, may stay in the journal); a second ``stop()`` waits for a running one and
returns whether everything so far is written.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from ..events import emit
from ..pairs import EntryIds
from ..spill import SpillDirectory
from .admission import Admission, Route, seen_chunk
from .chunks import Chunk
from .closed import ClosedRoute
from .delivery import Delivery
from .journaling import JournaledAdmission
from .ledger import Ledger
from .lifecycle import Lifecycle, StopSignal
from .spilling import Spiller
from .threads import RunThreads

__all__ = ["StopSequence"]

log = logging.getLogger("iai_queue.queue")

SPILL_IN_FLIGHT_WAIT_S = 5.0  # a spill thread still writing a file at the last step: waited for this long


class StopSequence:
    """The drain at ``stop()`` over one queue's parts.

    ``current_stop()``: the running start's stop signal (read under ``lock``,
    as ``start()`` replaces it under ``lock``); ``done_seq()``: the ledger's
    written mark, read locked.
    """

    def __init__(self, lock: threading.Lock, admission: Admission, ledger: Ledger, ids: EntryIds,
                 delivery: Delivery, spiller: Spiller, directory: SpillDirectory, closed: ClosedRoute,
                 threads: RunThreads, journal: Optional[JournaledAdmission], current_stop: Callable[[], StopSignal],
                 done_seq: Callable[[], int]):
        self.lock = lock
        self.admission = admission
        self.ledger = ledger
        self.ids = ids
        self.delivery = delivery
        self.spiller = spiller
        self.directory = directory
        self.closed = closed
        self.threads = threads
        self.journal = journal
        self.current_stop = current_stop
        self.done_seq = done_seq

    def run(self, timeout: float) -> bool:
        """Stop the current run, waiting at most ``timeout`` seconds for the store."""
        adm, ledger = self.admission, self.ledger
        with self.lock:
            if adm.state is Lifecycle.CLOSING:  # another thread is stopping it: wait for that to finish
                ledger.done_advanced.wait_for(lambda: adm.state is Lifecycle.STOPPED, timeout + 2.0)
            if adm.state in (Lifecycle.STOPPED, Lifecycle.CLOSING):
                return ledger.all_done()
            started = adm.state is Lifecycle.RUNNING
            # From now on enqueue takes the closed route: it waits for this drain, then writes behind it.
            adm.set_locked(state=Lifecycle.CLOSING, route=Route.CLOSED)
            # What this stop answers for: calls numbered before it (later ones are their callers' to write).
            before = ledger.boundary()
            stop, deadline = self.current_stop(), time.monotonic() + timeout
            stop.request(deadline)  # in the same step: a closed-route caller reads the deadline it waits on
        held_back = self.journal.close_admission() if self.journal is not None else []
        adm.worker_wake.set()
        with self.lock:
            adm.spill_room.notify_all()
        worker, spill_thread = self.threads.worker, self.threads.spill
        if started and worker is not None and worker is not threading.current_thread():
            worker.join(max(0.0, deadline - time.monotonic()) + 0.05)
        with self.lock:
            # From here a worker still stuck in the store does nothing more.
            stop.abandoned = True
            older: list[Chunk] = [seen_chunk(b, b.entry_ids) for b in self.delivery.take_over_locked()]
            older += adm.take_all_pending_locked()
        if self.journal is not None:  # journaled calls stay in the journal; only the others are spilled
            older = self.journal.only_unjournaled(older, self.ids.prefix) + held_back
        if older:
            self.spiller.spill_or_drop(older, before_own_files=True)
        if started and spill_thread is not None:
            adm.spill_wake.set()
            spill_thread.join(max(1.0, deadline - time.monotonic()))
        own_files = bool(self.directory.own_files())
        if self.journal is not None:
            if self.threads.journal is not None:
                self.threads.journal.join(1.0)
            own_files = self.journal.close(self.done_seq()) or own_files
        # The last step holds the closed route's lock: a caller waiting there goes on once what is
        # spilled here is on disk, so its synchronous write sees that file and goes behind it.
        with self.closed.lock:
            with self.lock:
                adm.spill_room.wait_for(lambda: adm.spill_in_flight == 0, SPILL_IN_FLIGHT_WAIT_S)
                stuck = adm.spill_in_flight
                rest = adm.take_spill_buffer_locked()
                adm.set_locked(state=Lifecycle.STOPPED)
                stop.over = True
                self.closed.left_on_disk = own_files or bool(older) or bool(rest)
                ledger.done_advanced.notify_all()
            if stuck:
                emit(log, logging.WARNING, "stop.spill_stuck", dir=str(self.directory.path), pairs=stuck,
                     reason="the spill thread's file write has not returned; if it fails, that thread "
                     "spills its pairs again itself")
            if rest:  # the spill thread did not get to them (or had gone)
                self.spiller.spill_or_drop(rest)
            # Under the closed route's lock, which start() takes too: a start() right after the state
            # turned STOPPED must not take the writer lock before this run has let go of it.
            self.directory.release()
        with self.lock:
            done = ledger.written_seq >= before
        if self.closed.left_on_disk:
            emit(log, logging.WARNING, "exit.spilled", dir=str(self.directory.path))
        return done
