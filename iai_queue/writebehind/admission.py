"""Admission: where an accepted pair waits, and the one place a pair can be dropped.

Routes (:class:`Route`): a pair goes to memory for the store (``MEMORY``), or —
once anything has spilled — behind the spill (``BEHIND_SPILL``: the spill
buffer, then the spill directory), or, after ``stop()``, to the caller's own
thread (``CLOSED``; the facade writes it synchronously or spills it).

Guarantee 4 (order), the admission half: once anything spills, later entries
spill behind it until the spill has drained; memory is refilled from the
spill buffer only when no spill file waits (the worker's idle work).

Guarantee 10 (disk trouble): when spilling fails (ENOSPC, EACCES, a read-only
dir) the entries stay in memory — beyond the ``max_queue_size`` batches, up to
``max_memory_pairs`` pairs more — while the spill thread retries.

The one drop path: a pair is dropped only when memory already holds
``max_memory_pairs`` for the spill directory and the directory is failing.
Each drop is counted (``stats().dropped``) and logged at ERROR (rate-limited, with
the count suppressed). When the disk
works but is slower than the callers, ``enqueue`` waits for the spill thread
instead (backpressure, at most ``BACKPRESSURE_MAX_S``; then it holds the pair
over the bound rather than drop it): never on the store.

Storage hooks (``*_locked``) are called with the lock held; :meth:`enqueue`
is the only method that runs without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from enum import Enum
from typing import Any, Callable, Optional
from uuid import UUID

from ..events import RateLimiter
from ..pairs import EntryIds, known_id_strings, validate_pairs
from .chunks import Chunk, HeldChunk, chunk_len, chunk_seq, holds_at_least, take_from
from .config import QueueConfig
from .ledger import Ledger
from .lifecycle import Lifecycle

__all__ = ["Admission", "Route"]

log = logging.getLogger("iai_queue.queue")

NO_WAKE = 1 << 62  # an int, not inf: the hot path compares it with len() and int-to-int is cheaper
BACKPRESSURE_MAX_S = 10.0  # enqueue waits at most this long for a working but slow disk, then goes over the bound


class Route(Enum):
    MEMORY = "memory"  # enqueue may append to memory without the lock
    BEHIND_SPILL = "behind_spill"  # something spilled: everything goes behind it
    CLOSED = "closed"  # stopped: the caller's thread writes (or spills)


class Admission:
    """The in-memory buffers, the route, backpressure and the drop path.

    ``on_closed(chunk)`` takes a chunk that arrives while the route is closed
    (a new queue's first use, or during and after ``stop()``).
    """

    def __init__(self, lock: threading.Lock, cfg: QueueConfig, ledger: Ledger, warn: RateLimiter,
                 on_closed: Callable[[Chunk], None]):
        self.lock = lock
        self.warn = warn
        self.ledger = ledger
        self._seq = ledger.seq  # next(self._seq): the hot path's one number per call
        self.next_seq = ledger.next_seq  # the same counter, for the journaled path
        self.max_queue_size = cfg.max_queue_size
        self.max_memory_pairs = cfg.max_memory_pairs
        self.on_closed = on_closed
        # Chunks for the store. enqueue() appends without the lock (deque.append
        # is atomic under the GIL); every other access holds the lock.
        self.pending: deque[Chunk] = deque()
        self.spill_buffer: deque[Chunk] = deque()  # chunks behind the spill, for the spill thread
        self.spill_buffer_pairs = 0
        self.spill_in_flight = 0  # pairs the spill thread is writing right now
        self.spill_failing = False  # the last spill write failed; cleared by the next success
        self.wake_threshold = NO_WAKE  # enqueue wakes the worker when len(pending) reaches this
        self._check_at = cfg.max_queue_size + 1  # min(wake_threshold, bound + 1): the hot path's one comparison
        self.worker_wake = threading.Event()  # the worker waits on it for work, a flush, or stop
        self.spill_wake = threading.Event()  # the spill thread waits on it for the spill buffer
        self.spill_room = threading.Condition(lock)  # enqueue waits on it for the spill thread
        self.state = Lifecycle.NEW  # a new queue (or a forked child's) starts on its first enqueue
        self.route = Route.MEMORY
        self._fast = False  # derived in _set(): the hot path reads one bool

    def _set(self, state: Optional[Lifecycle] = None, route: Optional[Route] = None) -> None:
        """The one place state, route and the hot path's flag change (lock held, or before threads exist)."""
        if state is not None:
            self.state = state
        if route is not None:
            self.route = route
        self._fast = self.route is Route.MEMORY and self.state is Lifecycle.RUNNING

    def set_locked(self, **changes: Any) -> None:
        self._set(**changes)

    # -- the hot path ------------------------------------------------------------------

    def enqueue(self, pairs: list) -> None:
        # The common case (UUID or known id string, dict) checked inline, as in JournaledAdmission.enqueue:
        # this is the recall hot path, and a call would cost ~10 % of it. Anything else goes to
        # validate_pairs, which names the bad element; an id string it accepted is kept as it is (the
        # worker converts it) and known from then on.
        if type(pairs) is list:
            items = tuple(pairs)
            try:
                for p in items:
                    if type(p) is not tuple:
                        items = validate_pairs(pairs)
                        break
                    rid, entry = p
                    if type(entry) is not dict or (type(rid) is not UUID
                                                   and not (type(rid) is str and rid in known_id_strings)):
                        items = validate_pairs(pairs)
                        break
            except ValueError:  # not two elements
                items = validate_pairs(pairs)
        else:
            items = validate_pairs(pairs)
        if self._fast and items:
            pending = self.pending
            chunk = (next(self._seq), items)
            pending.append(chunk)
            if len(pending) >= self._check_at:
                self._crossed(chunk)
            elif not self._fast:
                self._take_back(chunk)
        elif items:
            self._enqueue_locked((next(self._seq), items))

    def _crossed(self, chunk: Chunk) -> None:
        """The append made ``len(pending)`` reach ``_check_at``: wake the worker, or memory is over its bound."""
        n = len(self.pending)
        if n >= self.wake_threshold:
            self.wake_worker()
        if n > self.max_queue_size or not self._fast:
            self._take_back(chunk)

    def wake_worker(self) -> None:
        """Wake the worker waiting in :meth:`wait_for_pending` and disarm its threshold at once: the woken
        worker needs the GIL, which the caller keeps for a whole burst, each call of which would set the
        Event again. Under the lock, so it cannot disarm a threshold the worker armed after this wake-up."""
        with self.lock:
            self.worker_wake.set()
            self.wake_threshold = NO_WAKE
            self._check_at = self.max_queue_size + 1

    def _take_back(self, chunk: Chunk) -> None:
        # Memory was full, or an overflow or stop() began while we appended. Take the
        # chunk back if it is still there; if not, the worker or stop() has it.
        with self.lock:
            try:
                self.pending.remove(chunk)
            except ValueError:
                return
        self._enqueue_locked(chunk)

    def _enqueue_locked(self, chunk: Chunk) -> None:
        with self.lock:
            if self.state is Lifecycle.RUNNING:
                if self.route is Route.MEMORY and len(self.pending) < self.max_queue_size:
                    self.pending.append(chunk)
                    if len(self.pending) >= self.wake_threshold:
                        self.worker_wake.set()
                    return
                self.ledger.accepted_elsewhere += len(chunk[1]) if type(chunk) is tuple else chunk_len(chunk)
                self._overflow(chunk)
                return
        self.on_closed(chunk)

    def readmit(self, chunk: Chunk) -> None:
        """A chunk that keeps its seq goes through admission again (after the first use started the queue)."""
        self._enqueue_locked(chunk)

    def _overflow(self, chunk: Chunk) -> None:
        """Behind the spill from now on (lock held)."""
        n = len(chunk[1]) if type(chunk) is tuple else chunk_len(chunk)
        if self.route is not Route.BEHIND_SPILL:
            self._set(route=Route.BEHIND_SPILL)
        if self.spill_buffer_pairs + self.spill_in_flight + n > self.max_memory_pairs and self._over_bound(chunk, n):
            return  # dropped
        if self.route is Route.MEMORY and self.state is Lifecycle.RUNNING:
            # The worker refilled memory while we waited for room: later chunks must not pass this one.
            self._set(route=Route.BEHIND_SPILL)
        self.spill_buffer.append(chunk)
        self.spill_buffer_pairs += n
        if not self.spill_wake.is_set():
            self.spill_wake.set()

    def _over_bound(self, chunk: Chunk, n: int) -> bool:
        """Memory holds ``max_memory_pairs`` for the disk (lock held): wait for a working disk, or
        drop on a failing one. True when the chunk was dropped."""

        def waiting() -> int:
            return self.spill_buffer_pairs + self.spill_in_flight

        # A working disk slower than the callers: wait for the spill thread (the
        # one place enqueue waits, and only on a disk that is working).
        give_up_at = time.monotonic() + BACKPRESSURE_MAX_S
        while (waiting() + n > self.max_memory_pairs and waiting() and not self.spill_failing
               and self.state is Lifecycle.RUNNING and time.monotonic() < give_up_at):
            self.spill_room.wait(1.0)
        if waiting() + n > self.max_memory_pairs and waiting() and self.spill_failing:
            # The single drop path: the disk is failing and memory is full.
            self.ledger.count(dropped=n)
            self.ledger.mark_done((chunk_seq(chunk),))
            self.warn.emit(log, logging.ERROR, "drop", key="memory full", count=n,
                           total_dropped=self.ledger.n["dropped"],
                           reason="memory at max_memory_pairs and the spill directory is failing")
            return True
        return False

    # -- the worker's hooks ------------------------------------------------------------

    def wait_for_pending(self, threshold: float, timeout: float, still_waiting: Callable[[], bool]) -> bool:
        """Sleep until ``threshold`` chunks are pending or someone wakes the worker, at most ``timeout``.

        ``still_waiting`` is checked after arming the wake-up (so an append in
        between is not missed), and so is the state: ``stop()`` changes it before
        it sets the Event, which the arming may have cleared. Returns False on timeout.
        """
        with self.lock:  # arming and wake_worker()'s disarming exclude each other
            self.wake_threshold = threshold
            self._check_at = min(threshold, self.max_queue_size + 1)
            self.worker_wake.clear()
        try:
            if self.state is not Lifecycle.RUNNING or not still_waiting():
                return True
            return self.worker_wake.wait(timeout)
        finally:
            self.wake_threshold = NO_WAKE
            self._check_at = self.max_queue_size + 1

    def full_batch_waiting(self, max_pairs: int) -> bool:
        return holds_at_least(list(self.pending), max_pairs)  # a copy: enqueue appends meanwhile

    def take_locked(self, room: int, ids: EntryIds) -> tuple[list, list, list]:
        """Up to ``room`` pairs from memory: ``(pairs, entry_ids, seqs of calls completed)``."""
        pairs, eids, done = take_from(self.pending, room, ids)
        self.ledger.taken += len(pairs)
        return pairs, eids, done

    def refill_locked(self, files_written_before: int) -> bool:
        """Move the spill buffer into memory once no spill file waits. True when it moved any.

        ``files_written_before``: the spilled-files count when the caller saw no
        file waiting; a file written since then goes first.
        """
        if self.spill_in_flight or self.ledger.n["spilled_files"] != files_written_before:
            return False
        moved = False
        while self.spill_buffer and len(self.pending) < self.max_queue_size:
            c = self.spill_buffer.popleft()
            self.spill_buffer_pairs -= chunk_len(c)
            self.ledger.accepted_elsewhere -= chunk_len(c)  # counted again when taken
            self.pending.append(c)
            moved = True
        if not self.spill_buffer and not self.spill_in_flight and self.route is Route.BEHIND_SPILL \
                and self.state is not Lifecycle.CLOSING:
            self._set(route=Route.MEMORY)  # after the move: new chunks go behind it
        return moved

    # -- the spill thread's hooks --------------------------------------------------------

    def take_for_spill_locked(self, max_pairs: int) -> tuple[list, int]:
        chunks, count = [], 0
        while self.spill_buffer and count < max_pairs:
            c = self.spill_buffer.popleft()
            chunks.append(c)
            count += chunk_len(c)
        self.spill_buffer_pairs -= count
        self.spill_in_flight += count
        return chunks, count

    def spilled_locked(self, count: int) -> None:
        self.spill_in_flight -= count

    def spill_failed_locked(self, chunks: list, count: int) -> None:
        """Back to the front, in order; the spill thread retries."""
        self.spill_in_flight -= count
        self.spill_buffer.extendleft(reversed(chunks))
        self.spill_buffer_pairs += count

    # -- stop()'s hooks --------------------------------------------------------------------

    def take_all_pending_locked(self) -> list:
        out = list(self.pending)
        self.ledger.taken += sum(chunk_len(c) for c in out)
        self.pending.clear()
        return out

    def take_spill_buffer_locked(self) -> list:
        out = list(self.spill_buffer)
        self.spill_buffer.clear()
        self.spill_buffer_pairs = 0
        return out

    def in_memory_pairs_locked(self) -> int:
        return sum(chunk_len(c) for c in list(self.pending))


def seen_chunk(pairs, entry_ids) -> HeldChunk:
    """Pairs that may have been written already (taken back from a stopped worker, or late)."""
    return HeldChunk(-1, tuple(pairs), 0, list(entry_ids), True)
