"""Delivery: getting one batch into the store, whatever the store does.

Guarantee 1 (store outages): a failing write is retried with exponential
backoff and jitter (``retry_initial_s`` doubling up to ``retry_max_s``) for as
long as it takes — until ``stop()``'s deadline, when the unwritten part is left
in :attr:`Delivery.in_flight` for stop() to spill. An outage (every write
fails) never quarantines anything.

Guarantee 2 (poison pairs): a failing batch is bisected. A single pair that
fails three times in a row while the pairs after it write is quarantined with
the error text; the rest land.

Guarantee 3 (exactly-once effect), the delivery half: after any failure the
batch is flagged ``verify`` (it may have landed), so the store skips entry ids
it already has.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence

from ..events import RateLimiter, emit
from ..pairs import ProvenanceBatch
from .ledger import Ledger
from .lifecycle import Abandoned, Backoff, StopSignal

__all__ = ["Batch", "Delivery"]

log = logging.getLogger("iai_queue.queue")

POISON_FAILURES = 3  # a single pair failing this often while later pairs write is poison


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
    ``stats()`` and ``stop()`` never miss a pair. ``borrow(into)`` takes the
    next pairs from memory into ``in_flight`` (the poison probe) or returns None.
    """

    def __init__(self, lock: threading.Lock, ledger: Ledger, write: Callable[[ProvenanceBatch], None],
                 backoff: Backoff, warn: RateLimiter, quarantine_pairs: Callable[[ProvenanceBatch, str], None],
                 borrow: Callable[[deque], Optional[Batch]] = lambda into: None):
        self.lock = lock
        self.ledger = ledger
        self.write = write
        self.backoff = backoff
        self.warn = warn
        self.quarantine_pairs = quarantine_pairs
        self.borrow = borrow
        self.in_flight: Optional[deque] = None
        self.in_flight_on_disk = False  # a replay: its pairs are safe in the claimed file

    # -- in flight (lock held) ---------------------------------------------------------

    def publish_locked(self, batch: Batch, into: Optional[deque] = None) -> deque:
        into = deque() if into is None else into
        into.append(batch)
        self.in_flight = into
        self.in_flight_on_disk = False
        return into

    def finish_locked(self) -> None:
        self.in_flight = None

    def in_memory_pairs_locked(self) -> int:
        """Pairs in flight that exist nowhere else (a replay's are safe in their file)."""
        if not self.in_flight or self.in_flight_on_disk:
            return 0
        return sum(len(b) for b in self.in_flight)

    def take_over_locked(self) -> list[ProvenanceBatch]:
        """stop(): the unwritten batches that exist only in memory; nothing is in flight after."""
        out = list(self.in_flight) if self.in_flight and not self.in_flight_on_disk else []
        self.in_flight = None
        return out

    # -- writing -----------------------------------------------------------------------------

    def deliver(self, batch: ProvenanceBatch, stop: StopSignal, verify: bool = False) -> None:
        """Write ``batch``, retrying and isolating poison, until done.

        Raises GiveUp when the stop deadline passes first, Abandoned when
        stop() has taken the batch over; the unwritten part is then in
        ``in_flight`` for stop() to spill.
        """
        with self.lock:
            if self.in_flight is None or self.in_flight[0] is not batch:
                self.in_flight = deque([batch])
                self.in_flight_on_disk = True  # a replay: its pairs are safe in the claimed file
            todo = self.in_flight
        attempt = 0
        single_failures = 0
        while todo:
            b = todo[0]
            if verify:
                b.verify = True
            error = self.try_write(b)
            if error is None:
                with self.lock:
                    if stop.abandoned:
                        raise Abandoned
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
            if single_failures >= POISON_FAILURES and self._is_poison(todo, batch, stop):
                single_failures = 0
                continue
            self._retry_after(attempt, stop)
            attempt += 1

    def try_write(self, b: ProvenanceBatch) -> Optional[Exception]:
        t0 = time.perf_counter()
        try:
            self.write(b)
        except Exception as exc:
            with self.lock:
                self.ledger.count(store_errors=1)
            self.warn.emit(log, logging.WARNING, "write.failed", key=type(exc).__name__,
                           error=repr(exc)[:300], pairs=len(b))
            return exc
        dt = time.perf_counter() - t0
        with self.lock:
            self.ledger.wrote(len(b), dt)
        return None

    def _is_poison(self, todo: deque, batch: ProvenanceBatch, stop: StopSignal) -> bool:
        """todo[0], a single pair, keeps failing: if what follows it writes, it is poison."""
        if len(todo) < 2:
            nxt = self.borrow(todo)  # the next pairs from memory as the probe
            if nxt is None:
                return False
            batch.done_seqs += nxt.done_seqs  # the worker marks both done together
        probe = todo[1]
        if self.try_write(probe) is not None:
            return False  # the store is failing everything: an outage, not poison
        with self.lock:
            if stop.abandoned:
                raise Abandoned
            poison = todo.popleft()
            todo.popleft()
        exc = self.try_write(poison)  # one last chance, now that the store is known good
        if exc is None:
            return True
        self.quarantine_pairs(poison, f"store rejected: {type(exc).__name__}: {exc}")
        return True

    def _retry_after(self, attempt: int, stop: StopSignal) -> None:
        delay = self.backoff.delay(attempt)
        with self.lock:
            self.ledger.count(retries=1)
        emit(log, logging.DEBUG, "retry", attempt=attempt + 1, delay_s=round(delay, 3))
        stop.sleep(delay)
