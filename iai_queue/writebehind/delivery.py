"""Delivery: getting one batch into the store, whatever the store does.

Guarantee 1 (store outages): a failing write is retried with exponential
backoff and jitter (``retry_initial_s`` doubling up to ``retry_max_s``) for as
long as it takes — until ``stop()``'s deadline, when the unwritten part is left
in :attr:`Delivery.in_flight` for stop() to spill. An outage (every write
fails) never quarantines anything.

Guarantee 2 (poison pairs): a failing batch is bisected. A single pair that
fails three times in a row while the store takes a harmless probe write (one
pair for a record id no store has, which writes nothing) is quarantined with
the error text; the rest land, in order.

Guarantee 3 (exactly-once effect), the delivery half: after any failure the
batch is flagged ``verify`` (it may have landed), so the store skips entry ids
it already has.

Guarantee 4 (runs): the in-flight record is shared by the queue's runs (a
restarted queue keeps its ``Delivery``), and a run's worker changes it only
under the lock while its run is not abandoned. ``stop()`` abandons the run and
takes the record over in one locked step, so a worker it left behind in the
store — which may come back at any moment — never publishes into, marks as on
disk, resumes or clears a later run's batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence
from uuid import uuid4

from ..events import RateLimiter, emit
from ..jsoncodec import UnencodableEntries
from ..pairs import ProvenanceBatch
from .ledger import Ledger
from .lifecycle import Abandoned, Backoff, GiveUp, StopSignal

__all__ = ["Batch", "Delivery"]

log = logging.getLogger("iai_queue.queue")

POISON_FAILURES = 3  # a single pair failing this often while later pairs write is poison
IN_FLIGHT_WAIT_S = 1.0  # a verified write waits this long for an earlier write of the same ids, then retries
BARRIER_WAIT_S = 5.0  # later writes wait this long for a write stop() gave up on (a hung store: then they go on)


class WritesInFlight:
    """Batches being written right now by any queue of this process.

    A verified write (a retry, a replay, a batch taken over from a stopped
    worker) first waits until no earlier write of the same entry ids is still
    in the store's hands — else both could find the ids absent and both append.
    A first write only registers its batch (no per-entry work on the common
    path); the overlap is computed when a verified write asks.

    A write that ``stop()`` gave up waiting for (its worker abandoned while the
    store held the batch) becomes a barrier: every later write of this process
    waits for it (at most ``BARRIER_WAIT_S``), so entries accepted after it do not
    land before it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._batches: dict[int, Sequence[str]] = {}  # id(batch's entry ids) -> entry ids
        self._barriers: set[int] = set()

    def begin(self, entry_ids: Sequence[str], verify: bool) -> bool:
        """Register ``entry_ids``; False when a verified write still overlaps an earlier one after the wait."""
        with self._changed:
            if self._barriers and not self._changed.wait_for(lambda: not self._barriers, BARRIER_WAIT_S):
                self._barriers.clear()  # a hung store: held back once, long enough
            if verify:
                mine = set(entry_ids)

                def clear() -> bool:
                    return all(mine.isdisjoint(ids) for ids in self._batches.values())

                if not self._changed.wait_for(clear, IN_FLIGHT_WAIT_S):
                    return False
            self._batches[id(entry_ids)] = entry_ids
            return True

    def end(self, entry_ids: Sequence[str]) -> None:
        with self._changed:
            self._batches.pop(id(entry_ids), None)
            self._barriers.discard(id(entry_ids))
            self._changed.notify_all()

    def hold_back_others(self, entry_ids: Sequence[str]) -> None:
        """``entry_ids`` (a batch given up on while its write is under way): later writes wait for it.

        A write that had not begun is not written at all: its worker checks the
        stop signal right after registering (:meth:`Delivery.try_write`).
        """
        with self._changed:
            if id(entry_ids) in self._batches:
                self._barriers.add(id(entry_ids))

    def release(self, entry_ids: Sequence[str]) -> None:
        """The abandoned worker will not write ``entry_ids``: nothing to wait for."""
        with self._changed:
            if id(entry_ids) not in self._batches:
                self._barriers.discard(id(entry_ids))
                self._changed.notify_all()


WRITES_IN_FLIGHT = WritesInFlight()


class StillInFlight(Exception):
    """An earlier write of the same entry ids has not returned yet: retried like a store error."""


class Batch(ProvenanceBatch):
    """A batch on its way to the store; ``done_seqs``: the enqueue calls it completes."""

    __slots__ = ("done_seqs",)

    def __init__(self, pairs, entry_ids, verify: bool = False, done_seqs: Sequence[int] = ()):
        super().__init__(pairs, entry_ids, verify)
        self.done_seqs = list(done_seqs)


class Delivery:
    """Writes batches through ``write`` with retry, bisection and the poison probe.

    ``in_flight`` is the batch being written, split as it is bisected; it is
    published under the lock in the same step as the pairs leave memory, so
    ``stats()`` and ``stop()`` never miss a pair.
    """

    def __init__(self, lock: threading.Lock, ledger: Ledger, write: Callable[[ProvenanceBatch], None],
                 backoff: Backoff, warn: RateLimiter,
                 quarantine_pairs: Callable[[ProvenanceBatch, Sequence[str] | str, str], None]):
        self.lock = lock
        self.ledger = ledger
        self.write = write
        self.backoff = backoff
        self.warn = warn
        self.quarantine_pairs = quarantine_pairs
        self.in_flight: Optional[deque] = None
        self.in_flight_on_disk = False  # a replay: its pairs are safe in the claimed file
        self.current: Optional[ProvenanceBatch] = None  # the batch in_flight came from (it knows its seqs)

    # -- in flight (lock held) ---------------------------------------------------------

    def publish_locked(self, batch: Batch, stop: StopSignal) -> None:
        """``batch`` (taken from memory) is in flight. Raises Abandoned for an abandoned run."""
        stop.raise_if_abandoned()
        self.in_flight = deque([batch])
        self.in_flight_on_disk = False
        self.current = batch

    def finish_locked(self, stop: StopSignal) -> None:
        """The run's batch is written. An abandoned run's record is stop()'s, maybe a later run's: untouched."""
        if not stop.abandoned:
            self._clear_locked()

    def _clear_locked(self) -> None:
        self.in_flight = None
        self.current = None

    def unfinished_locked(self, stop: StopSignal) -> Optional[ProvenanceBatch]:
        """The batch a crashed worker of this run left in flight (only in memory), to resume; None if there
        is none. Raises Abandoned for an abandoned run."""
        stop.raise_if_abandoned()
        if not self.in_flight or self.in_flight_on_disk:
            return None
        for b in self.in_flight:
            b.verify = True  # the crash may have come after the store took it
        return self.current

    def in_memory_pairs_locked(self) -> int:
        """Pairs in flight that exist nowhere else (a replay's are safe in their file)."""
        if not self.in_flight or self.in_flight_on_disk:
            return 0
        return sum(len(b) for b in self.in_flight)

    def take_over_locked(self) -> list[ProvenanceBatch]:
        """stop(): the unwritten batches that exist only in memory; nothing is in flight after.

        The one the store may still be writing holds back this process's later writes.
        """
        if self.in_flight:
            WRITES_IN_FLIGHT.hold_back_others(self.in_flight[0].entry_ids)
        out = list(self.in_flight) if self.in_flight and not self.in_flight_on_disk else []
        self._clear_locked()
        return out

    # -- writing -----------------------------------------------------------------------------

    def deliver(self, batch: ProvenanceBatch, stop: StopSignal, verify: bool = False, resume: bool = False) -> None:
        """Write ``batch``, retrying and isolating poison, until done.

        Raises GiveUp when the stop deadline passes first, Abandoned when
        stop() has taken the batch over; the unwritten part is then in
        ``in_flight`` for stop() to spill. ``resume``: go on with what is in
        flight (a restarted worker).
        """
        with self.lock:
            stop.raise_if_abandoned()
            if not resume and (self.in_flight is None or self.in_flight[0] is not batch):
                self.in_flight = deque([batch])
                self.in_flight_on_disk = True  # a replay: its pairs are safe in the claimed file
                self.current = batch
            todo = self.in_flight
        try:
            self._deliver(todo, stop, verify)
        except (Abandoned, GiveUp):
            for b in list(todo):  # a barrier stop() sets on them waits for nothing now
                WRITES_IN_FLIGHT.release(b.entry_ids)
            raise

    def _deliver(self, todo: deque, stop: StopSignal, verify: bool) -> None:
        attempt = 0
        single_failures = 0
        while todo:
            stop.raise_if_abandoned()  # stop() took the batch over: not one more write from here
            b = todo[0]
            if verify:
                b.verify = True
            error = self.try_write(b, stop)
            if error is None:
                with self.lock:
                    stop.raise_if_abandoned()
                    todo.popleft()
                attempt = single_failures = 0
                continue
            b.verify = True  # it may have landed: from now on the store checks first
            if len(b) > 1:
                mid = len(b) // 2
                with self.lock:
                    todo.popleft()
                    todo.appendleft(Batch(b[mid:], b.entry_ids[mid:], verify=True))
                    todo.appendleft(Batch(b[:mid], b.entry_ids[:mid], verify=True))
                continue
            single_failures += 1
            if single_failures >= POISON_FAILURES and self._is_poison(todo, stop):
                single_failures = 0
                continue
            self._retry_after(attempt, stop)
            attempt += 1

    def try_write(self, b: ProvenanceBatch, stop: Optional[StopSignal] = None) -> Optional[Exception]:
        """One write of ``b``; the exception on failure. Entries JSON cannot hold are set aside first.

        Raises Abandoned when ``stop`` was abandoned before the write began.
        """
        error = self._write_once(b, stop)
        if isinstance(error, UnencodableEntries):
            if stop is not None and stop.abandoned:
                raise Abandoned  # stop() took these pairs over: it sets the bad ones aside itself
            good = self._set_aside_unencodable(b, error)
            error = self._write_once(good, stop) if good else None
        return error

    def _write_once(self, b: ProvenanceBatch, stop: Optional[StopSignal]) -> Optional[Exception]:
        t0 = time.perf_counter()
        ids = b.entry_ids
        try:
            if not WRITES_IN_FLIGHT.begin(ids, b.verify):
                raise StillInFlight("an earlier write of these entries has not returned yet")
            if stop is not None and stop.abandoned:  # registered first: stop() either saw it, or we see it here
                WRITES_IN_FLIGHT.end(ids)
                raise Abandoned
            try:
                result = self.write(b)
                # The store returns how many pairs it skipped for unknown ids; a host's wrapper may return anything.
                skipped = result if type(result) is int and 0 <= result <= len(b) else 0
            finally:
                WRITES_IN_FLIGHT.end(ids)
        except UnencodableEntries as exc:
            return exc  # decided by the entries, not the store: no error counted, nothing retried
        except Abandoned:
            raise
        except Exception as exc:
            with self.lock:
                self.ledger.count(store_errors=1)
            self.warn.emit(log, logging.WARNING, "write.failed", key=type(exc).__name__,
                           error=repr(exc)[:300], pairs=len(b))
            return exc
        dt = time.perf_counter() - t0
        with self.lock:
            self.ledger.wrote(len(b) - skipped, dt)
            self.ledger.count(skipped_unknown=skipped)
        if skipped:
            self.warn.emit(log, logging.WARNING, "skip.unknown_record", pairs=skipped,
                           reason="no record with that id in the store")
        return None

    def _set_aside_unencodable(self, b: ProvenanceBatch, error: UnencodableEntries) -> Optional[ProvenanceBatch]:
        """Quarantine the pairs of ``b`` that cannot be stored; the batch of the others (None if none).

        ``b`` is changed in place to hold only the others, so a caller holding it
        (the bisection's deque) writes exactly those.
        """
        bad = sorted(i for i in error.bad if 0 <= i < len(b))
        if not bad:
            return b
        aside = ProvenanceBatch([b[i] for i in bad], [b.entry_ids[i] for i in bad], True)
        self.quarantine_pairs(aside, [error.bad[i] for i in bad], "unencodable")
        drop = set(bad)
        keep = [i for i in range(len(b)) if i not in drop]
        pairs, ids = [b[i] for i in keep], [b.entry_ids[i] for i in keep]
        b[:] = pairs
        b.entry_ids = ids
        return b if keep else None

    def _is_poison(self, todo: deque, stop: StopSignal) -> bool:
        """todo[0], a single pair, keeps failing: if the store takes a harmless write, it is poison.

        The probe is one pair for a record id no store has (a fresh random
        UUID): the store accepts the call and writes nothing (unknown ids are
        skipped). Nothing real is written ahead of the suspect, so a pair that
        was only failing for a while keeps its place.
        """
        probe = ProvenanceBatch([(uuid4(), {"probe": True})], [f"probe-{uuid4().hex}"])
        try:
            self.write(probe)
        except Exception:
            with self.lock:
                self.ledger.count(store_errors=1)
            return False  # the store is failing everything: an outage, not poison
        exc = self.try_write(todo[0], stop)  # one last chance, now that the store is known good
        if exc is None:
            with self.lock:
                stop.raise_if_abandoned()
                todo.popleft()
            return True
        with self.lock:
            stop.raise_if_abandoned()
            poison = todo.popleft()
        self.quarantine_pairs(poison, f"store rejected: {type(exc).__name__}: {exc}", "poison")
        return True

    def _retry_after(self, attempt: int, stop: StopSignal) -> None:
        delay = self.backoff.delay(attempt)
        with self.lock:
            self.ledger.count(retries=1)
        emit(log, logging.DEBUG, "retry", attempt=attempt + 1, delay_s=round(delay, 3))
        stop.sleep(delay)
