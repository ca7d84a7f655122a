"""ProvenanceWriteQueue: write-behind for provenance appends, nothing lost.

The recall path calls :meth:`ProvenanceWriteQueue.enqueue`, which validates the
pairs, appends them to an in-memory FIFO and returns; a daemon worker thread
coalesces them into batches for ``store.append_provenance_batch``.

Guarantees
==========
1. **Store outages.** A failing write is retried with exponential backoff and
   jitter (``retry_initial_s`` doubling up to ``retry_max_s``). Enqueue keeps
   accepting meanwhile: memory up to ``max_queue_size`` pairs, then the spill
   directory. When the store is back, every entry lands. An outage (every write
   fails) never quarantines anything.
2. **Poison pairs.** A failing batch is bisected. A single pair that fails
   three times in a row while the pairs after it write is quarantined with the
   error text (``spill.py`` owns the format); the rest land.
3. **Exactly-once effect.** Each accepted pair gets an entry id: a per-queue
   random prefix, the enqueue call's sequence number and the pair's index — no
   uuid4 on the hot path. Retries and replays are flagged ``verify``; the store
   skips ids it already has, and ``get()`` shows an id once.
4. **Order.** Writes follow acceptance order. Once anything spills, later
   entries spill behind it until the spill has drained, and spill files replay
   oldest first; pairs spilled late (at stop) are named older than the files
   already written. A queue that starts with spill files of its store waiting
   also spills behind them.
5. **Spill files** are durable and never half-visible; crash leftovers are
   recovered at start (see ``spill.py``).
6. **Several processes, one directory.** A live queue replays its own files;
   files of dead writers are replayed by one process at a time (``flock``).
7. **Lifecycle.** ``stop()`` drains for a bounded time, then spills what is
   left (the batch being written included, flagged for verification). An
   enqueue after ``stop()`` is written synchronously, or spilled when the store
   fails or earlier entries are still spilled — never lost.
8. **Fork.** In a child the queue starts empty with fresh locks; it starts a
   worker on first use and never writes the parent's entries. The child must
   open its own store: LanceDB does not survive ``fork()``.
9. **Exit.** ``start()`` registers the queue's exit handler with
   ``atexit.register`` and ``stop()`` unregisters it, so a stopped queue is
   never kept alive by atexit. The handler waits at most ``exit_timeout``
   seconds for the store, then spills, and never raises. (CPython before 3.12
   keeps an empty slot per unregistered handler: 8 bytes per start/stop.)
10. **Disk trouble.** When spilling fails (ENOSPC, EACCES, a read-only dir), the
    entries stay in memory — beyond the ``max_queue_size`` batches, up to
    ``max_memory_pairs`` pairs more — while spilling is retried.

Bounds: ``max_queue_size`` counts batches (enqueue calls) held for the store,
as ``queue.Queue(maxsize)`` does; ``max_memory_pairs`` counts pairs held on
their way to the spill directory.

The one drop path: an entry is dropped only when memory already holds
``max_memory_pairs`` and the spill directory cannot be written, or when
``stop()`` finds neither the store nor the directory able to take what is
left. Each drop is counted in ``stats().dropped`` and logged at ERROR with the
count. Entries still in memory when the process is SIGKILLed are lost: at most
``max_queue_size`` batches, ``max_memory_pairs`` pairs on their way to disk, and
the batch being written (``max_batch_pairs``).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import os
import random
import re
import secrets
import threading
import time
import weakref
from array import array
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence
from uuid import UUID

from .events import RateLimiter, emit
from .spill import BadLine, SpillDirectory, default_spill_dir, encode_line, parse_file
from .store import ProvenanceBatch

__all__ = ["ProvenanceWriteQueue", "QueueStats", "ProvenanceSink", "validate_pairs"]

log = logging.getLogger("iai_queue.queue")

_UUID_STR = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_NEVER = float("inf")
_POISON_FAILURES = 3  # a single pair failing this often while later pairs write is poison

_NEW, _RUNNING, _CLOSING, _STOPPED = "new", "running", "closing", "stopped"


class ProvenanceSink(Protocol):
    """What the queue writes to: a store's synchronous append."""

    def append_provenance_batch(self, pairs: Sequence[tuple[UUID, dict]], records_cache: Any = None) -> None: ...


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


def _bad_pair(i: int, p: Any) -> Exception:
    if type(p) is not tuple and not isinstance(p, tuple):
        return TypeError(f"pairs[{i}] must be a (UUID, dict) tuple, got {type(p).__name__}: {p!r:.200}")
    if len(p) != 2:
        return ValueError(f"pairs[{i}] must have 2 elements (UUID, dict), got {len(p)}: {p!r:.200}")
    rid, entry = p
    if isinstance(rid, str):
        if not _UUID_STR.match(rid):
            return ValueError(f"pairs[{i}][0] is not a canonical UUID string: {rid!r:.200}")
    elif not isinstance(rid, UUID):
        return TypeError(f"pairs[{i}][0] must be a UUID, got {type(rid).__name__}: {rid!r:.200}")
    if not isinstance(entry, dict):
        return TypeError(f"pairs[{i}][1] must be a dict, got {type(entry).__name__}: {entry!r:.200}")
    return None


def validate_pairs(pairs: Any) -> tuple:
    """The pairs as a tuple of ``(UUID, dict)``; raises TypeError/ValueError naming the bad element."""
    if not isinstance(pairs, list):
        raise TypeError(f"pairs must be a list of (UUID, dict) tuples, got {type(pairs).__name__}: {pairs!r:.200}")
    out = tuple(pairs)  # a copy: the caller may reuse its list
    for p in out:
        # The common case costs three type checks; anything else takes the slow path.
        if type(p) is not tuple or len(p) != 2 or type(p[0]) is not UUID or type(p[1]) is not dict:
            break
    else:
        return out
    normal = []
    for i, p in enumerate(out):
        exc = _bad_pair(i, p)
        if exc is not None:
            raise exc
        rid, entry = p
        normal.append((rid if isinstance(rid, UUID) else UUID(rid), entry))
    return tuple(normal)


class _GiveUp(Exception):
    """The stop deadline passed while a batch was still unwritten."""


class _Abandoned(Exception):
    """stop() gave up on the worker and took over its batch: do nothing more."""


class _Batch(ProvenanceBatch):
    """A batch on its way to the store; ``done_seqs``: the enqueue calls it completes."""

    __slots__ = ("done_seqs",)

    def __init__(self, pairs, entry_ids, verify: bool = False, done_seqs: Sequence[int] = ()):
        super().__init__(pairs, entry_ids, verify)
        self.done_seqs = list(done_seqs)


# A chunk is the pairs of one enqueue call still in memory: the plain tuple
# (seq, pairs, start, seen) — ``pairs[start:]`` are pending. A tuple, not a
# class, because building one is on the hot path. ``seen`` chunks hold
# ((id, entry), entry_id) items that may have been written already.
_SEQ, _PAIRS, _START, _SEEN = range(4)


def _chunk_len(c: tuple) -> int:
    return len(c[_PAIRS]) - c[_START]


def _seq_ranges(seqs) -> array:
    """Seqs (ascending) as flat (first, last) runs: a spill file's calls are mostly consecutive."""
    out = array("q")
    for s in seqs:
        if out and s == out[-1] + 1:
            out[-1] = s
        else:
            out.extend((s, s))
    return out


def _expand(runs):
    return (s for i in range(0, len(runs), 2) for s in range(runs[i], runs[i + 1] + 1))


_live_queues: "weakref.WeakSet[ProvenanceWriteQueue]" = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for q in list(_live_queues):
        q._reinit_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


class ProvenanceWriteQueue:
    """Write-behind queue for ``(record_id, entry)`` provenance pairs.

    ``enqueue`` never blocks on the store or the disk; a daemon worker writes
    coalesced batches through ``store.append_provenance_batch``, looked up at
    call time so a wrapper installed on the instance takes effect.
    """

    def __init__(self, store: ProvenanceSink, *, coalesce_ms: float = 50, max_queue_size: int = 4096,
                 max_batch_pairs: int = 256, spill_dir: str | os.PathLike[str] | None = None,
                 max_memory_pairs: Optional[int] = None, exit_timeout: float = 2.0,
                 retry_initial_s: float = 0.05, retry_max_s: float = 5.0, idle_replay_s: float = 5.0,
                 replay_batch_pairs: int = 8192, spill_file_pairs: int = 8192):
        for name, value in (("coalesce_ms", coalesce_ms), ("exit_timeout", exit_timeout),
                            ("retry_initial_s", retry_initial_s), ("retry_max_s", retry_max_s),
                            ("idle_replay_s", idle_replay_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name, value in (("max_queue_size", max_queue_size), ("max_batch_pairs", max_batch_pairs),
                            ("replay_batch_pairs", replay_batch_pairs), ("spill_file_pairs", spill_file_pairs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if max_memory_pairs is None:
            max_memory_pairs = 4 * max_queue_size
        if isinstance(max_memory_pairs, bool) or not isinstance(max_memory_pairs, int) or max_memory_pairs < 1:
            raise ValueError(f"max_memory_pairs must be an int >= 1, got {max_memory_pairs!r}")
        self._store = store
        self.coalesce_s = coalesce_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_batch_pairs = max_batch_pairs
        self.max_memory_pairs = max_memory_pairs
        self.exit_timeout = exit_timeout
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = max(retry_max_s, retry_initial_s)
        self.idle_replay_s = idle_replay_s
        self.replay_batch_pairs = max(replay_batch_pairs, max_batch_pairs)
        self.spill_file_pairs = spill_file_pairs
        # Resolved now, not at first spill: the environment may change later.
        self.spill_dir = Path(spill_dir) if spill_dir is not None else default_spill_dir()
        self._init_state()
        _live_queues.add(self)

    def _init_state(self) -> None:
        """Everything a forked child must not share with its parent."""
        self._lock = threading.Lock()
        self._warn = RateLimiter()  # has a lock of its own
        self._written = threading.Condition(self._lock)  # flush() waits on it for _written_seq
        self._spill_room = threading.Condition(self._lock)  # enqueue waits on it for the spill thread
        self._wake = threading.Event()  # the worker waits on it for work, a flush, or stop
        self._spill_wake = threading.Event()  # the spill thread waits on it for the spill buffer
        self._stop_requested = threading.Event()  # cuts the spill thread's and the worker's backoff short
        # Chunks for the store. enqueue() appends without the lock (deque.append
        # is atomic under the GIL); every other access holds the lock.
        self._pending: deque[tuple] = deque()
        self._seq = itertools.count(1)  # one number per enqueue call and per flush; next() is atomic
        self._fast = True  # enqueue may append to _pending: accepting, and nothing spilled ahead of it
        self._wake_threshold: float = _NEVER  # enqueue wakes the worker when len(_pending) reaches this
        self._spill_buffer: deque[tuple] = deque()
        self._spill_buffer_pairs = 0
        self._spill_in_flight = 0  # pairs the spill thread is writing right now
        self._spilling = False  # once set, new entries go behind the spill until it drains
        self._spill_failing = False  # the last spill write failed; cleared by the next success
        self._own_file_seqs: dict[str, array] = {}  # our spill file -> its enqueue calls, as (first, last) runs
        self._written_seq = 0  # every seq up to this one is done: written, quarantined or dropped
        self._done_above: list[int] = []  # a heap of done seqs above _written_seq
        self._flush_waiters = 0
        self._state = _NEW
        self._autostart = False  # a forked child starts its worker on first enqueue
        self._deadline = _NEVER  # stop(): when the worker gives up on the store
        self._in_flight: Optional[deque] = None  # the batch being written, split as it is bisected
        self._in_flight_on_disk = False  # a replay: its pairs are safe in the claimed file
        self._abandoned = False
        self._left_on_disk = False
        self._worker: Optional[threading.Thread] = None
        self._spiller: Optional[threading.Thread] = None
        self._last_empty = time.monotonic()  # when the worker last found memory empty
        self._replay_skip: dict[str, float] = {}  # spill file -> monotonic time to try it again
        self._prefix = f"q{secrets.token_hex(4)}-"
        self._spill = SpillDirectory(self.spill_dir, store_path=getattr(self._store, "path", None))
        self._rows_since_maintain = 0
        self._taken = 0  # pairs that left _pending (to the worker, or to stop())
        self._accepted_elsewhere = 0  # pairs accepted that never went through _pending
        self._n = dict.fromkeys(("written", "spilled_files", "spilled_pairs", "replayed",
                                 "quarantined_files", "quarantined_lines", "retries", "store_errors",
                                 "spill_errors", "dropped", "last_batch_size"), 0)
        self._last_write_s = 0.0

    def _reinit_after_fork(self) -> None:
        # The parent's pending entries stay the parent's: the child starts empty,
        # and starts a worker of its own on first enqueue if the parent's ran.
        was_running = self._state in (_RUNNING, _CLOSING)
        fd = self._spill._writer_fd
        if fd is not None:
            os.close(fd)  # the parent still holds its writer lock through its own fd
            self._spill._writer_fd = None
        self._init_state()
        self._autostart = was_running
        self._fast = not was_running

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "ProvenanceWriteQueue":
        """Start the worker and spill threads and register the exit handler. Idempotent."""
        with self._lock:
            if self._state in (_RUNNING, _CLOSING):
                return self
            self._state = _RUNNING
            self._autostart = False
            self._abandoned = False
            self._stop_requested.clear()
            self._deadline = _NEVER
            # Spill files of our store already waiting: new entries go behind them.
            self._spilling = self._spilling or bool(self._spill.replayable())
            self._fast = not self._spilling
            self._worker = threading.Thread(target=self._run_worker, name="iai_queue-worker", daemon=True)
            self._spiller = threading.Thread(target=self._run_spiller, name="iai_queue-spill", daemon=True)
            self._worker.start()
            self._spiller.start()
        # Per start(), by contract: hosts capture the handler from atexit.register.
        atexit.register(self._at_exit)
        return self

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Drain, then stop. Blocks up to ``timeout`` seconds (default ``exit_timeout``) for the store.

        What the store has not taken by then is spilled. Returns True when
        everything accepted was written. Idempotent; ``start()`` works again after.
        """
        timeout = self.exit_timeout if timeout is None else timeout
        atexit.unregister(self._at_exit)
        with self._lock:
            if self._state is _CLOSING:  # another thread is stopping it: wait for that to finish
                self._written.wait_for(lambda: self._state is _STOPPED, timeout + 2.0)
            if self._state in (_STOPPED, _CLOSING):
                return self._all_done()
            started = self._state == _RUNNING
            self._state = _CLOSING
            self._deadline = time.monotonic() + timeout
        self._stop_requested.set()
        self._wake.set()
        with self._lock:
            self._spill_room.notify_all()
        worker, spiller = self._worker, self._spiller
        if started and worker is not None and worker is not threading.current_thread():
            worker.join(max(0.0, self._deadline - time.monotonic()) + 0.05)
        with self._lock:
            # From here a worker still stuck in the store does nothing more, and
            # enqueues racing this stop() go behind what is spilled next.
            self._abandoned = True
            self._spilling = True
            self._fast = False
            older: list[tuple] = []
            if self._in_flight and not self._in_flight_on_disk:
                older += [(-1, tuple(zip(b, b.entry_ids)), 0, True) for b in self._in_flight]
            self._in_flight = None
            self._taken += sum(_chunk_len(c) for c in self._pending)
            older += self._pending
            self._pending.clear()
        if older:
            self._spill_now(older, before_own_files=True)
        if started and spiller is not None:
            self._spill_wake.set()
            spiller.join(max(1.0, self._deadline - time.monotonic()))
        own_files = bool(self._spill.own_files())
        with self._lock:
            # One step: a later enqueue sees _STOPPED and takes the slow path.
            rest = list(self._spill_buffer)
            self._spill_buffer.clear()
            self._spill_buffer_pairs = 0
            self._state = _STOPPED
            self._left_on_disk = own_files or bool(older) or bool(rest)
            self._written.notify_all()
        if rest:  # the spill thread did not get to them (or never ran)
            self._spill_now(rest)
        with self._lock:
            done = self._all_done()
        self._spill.release()
        if self._left_on_disk:
            emit(log, logging.WARNING, "exit.spilled", dir=str(self.spill_dir))
        return done

    def _at_exit(self) -> None:
        try:
            self.stop(self.exit_timeout)
        except BaseException:  # an exit handler must not raise
            log.exception("exit handler failed")

    def __enter__(self) -> "ProvenanceWriteQueue":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    async def __aenter__(self) -> "ProvenanceWriteQueue":
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.astop()

    async def astop(self, timeout: Optional[float] = None) -> bool:
        """:meth:`stop` on a worker thread: the event loop keeps running."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.stop, timeout)

    async def aflush(self, timeout: float = 2.0) -> bool:
        """:meth:`flush` on a worker thread: the event loop keeps running. Cancellable at once."""
        import anyio.to_thread

        # flush() only waits, so a cancelled caller may leave it behind; stop() must not be left.
        return await anyio.to_thread.run_sync(self.flush, timeout, abandon_on_cancel=True)

    # -- the hot path ------------------------------------------------------------------

    def enqueue(self, pairs: list) -> None:
        """Accept ``pairs`` (a list of ``(UUID, dict)``) for writing; returns at once.

        Never blocks on the store and never raises because of the store or the
        disk. Blocks only when memory already holds ``max_memory_pairs`` for a
        working spill directory that is slower than the callers (backpressure).
        Raises TypeError/ValueError naming the first bad element, and then
        accepts nothing from this call. An empty list is a no-op.
        """
        # validate_pairs, inlined for the common case: this is the recall hot path.
        if type(pairs) is list:
            items = tuple(pairs)
            for p in items:
                if type(p) is not tuple or len(p) != 2 or type(p[0]) is not UUID or type(p[1]) is not dict:
                    items = validate_pairs(pairs)
                    break
        else:
            items = validate_pairs(pairs)
        if not items:
            return
        if self._fast:
            pending = self._pending
            if len(pending) < self.max_queue_size:
                chunk = (next(self._seq), items, 0, False)
                pending.append(chunk)
                if len(pending) >= self._wake_threshold:
                    self._wake.set()
                if self._fast:
                    return
                # An overflow or stop() began while we appended. Take the chunk
                # back if it is still there; if not, the worker or stop() has it.
                with self._lock:
                    try:
                        pending.remove(chunk)
                    except ValueError:
                        return
                self._enqueue_locked(chunk)
                return
        self._enqueue_locked((next(self._seq), items, 0, False))

    def _enqueue_locked(self, chunk: tuple) -> None:
        with self._lock:
            state = self._state
            if state is not _STOPPED and not (state is _NEW and self._autostart):
                if not self._spilling and len(self._pending) < self.max_queue_size:
                    self._pending.append(chunk)
                    if len(self._pending) >= self._wake_threshold:
                        self._wake.set()
                    return
                self._accepted_elsewhere += _chunk_len(chunk)
                self._overflow(chunk)
                return
        self._enqueue_slow(chunk)

    def _overflow(self, chunk: tuple) -> None:
        """Behind the spill from now on (called with the lock held)."""
        n = _chunk_len(chunk)
        self._spilling = True
        self._fast = False

        def waiting() -> int:
            return self._spill_buffer_pairs + self._spill_in_flight

        # A working disk slower than the callers: wait for the spill thread (the
        # one place enqueue waits, and only on a disk that is working).
        while (waiting() + n > self.max_memory_pairs and waiting() and not self._spill_failing
               and self._state is _RUNNING):
            self._spill_room.wait(1.0)
        if waiting() + n > self.max_memory_pairs and waiting():
            # The single drop path: the disk is failing and memory is full.
            self._n["dropped"] += n
            self._mark_done((chunk[_SEQ],))
            emit(log, logging.ERROR, "drop", count=n, total_dropped=self._n["dropped"],
                 reason="memory at max_memory_pairs and the spill directory is failing")
            return
        self._spill_buffer.append(chunk)
        self._spill_buffer_pairs += n
        self._spill_wake.set()

    def _all_done(self) -> bool:
        """Is everything enqueued so far done? Lock held."""
        now = next(self._seq)
        self._mark_done((now,))
        return self._written_seq >= now

    def _mark_done(self, seqs) -> None:
        """Record enqueue calls (and flushes) as done; advance _written_seq. Lock held."""
        w = self._written_seq
        heap = self._done_above
        for s in seqs:
            if s == w + 1:
                w = s
            elif s > w:
                heapq.heappush(heap, s)
        while heap and heap[0] <= w + 1:
            w = max(w, heapq.heappop(heap))
        if w != self._written_seq:
            self._written_seq = w
            self._written.notify_all()

    def _enqueue_slow(self, chunk: tuple) -> None:
        if self._state is _NEW and self._autostart:  # a forked child's first use
            self.start()
            self._enqueue_locked(chunk)  # keeps its seq: a fresh one would leave this one never done
            return
        # After stop(): write now on the caller's thread, or spill behind what is on disk.
        items = chunk[_PAIRS]
        eids = [f"{self._prefix}{chunk[_SEQ]:x}.{i}" for i in range(len(items))]
        with self._lock:
            self._accepted_elsewhere += len(items)
        if not self._left_on_disk:
            try:
                self._store.append_provenance_batch(_Batch(items, eids), records_cache=None)
                with self._lock:
                    self._n["written"] += len(items)
                    self._mark_done((chunk[_SEQ],))
                return
            except Exception as exc:
                with self._lock:
                    self._n["store_errors"] += 1
                self._warn.emit(log, logging.WARNING, "write.failed", error=repr(exc)[:300], pairs=len(items))
        self._left_on_disk = True
        self._spill_now([(chunk[_SEQ], tuple(zip(items, eids)), 0, True)])
        self._spill.release()

    # -- flush and stats ----------------------------------------------------------------

    def flush(self, timeout: float = 2.0) -> bool:
        """Block until everything enqueued before this call is in the store, or ``timeout`` passes.

        Returns True when it is, False on timeout (the entries are still
        pending, in memory or on disk, and will be written) or when the queue
        is stopped with entries left on disk. Safe from any thread.
        """
        with self._lock:
            target = next(self._seq)  # every call enqueued before us has a smaller number
            self._mark_done((target,))
            if self._written_seq >= target or self._state is _STOPPED:
                return self._written_seq >= target
            self._flush_waiters += 1
        self._wake.set()  # cut the coalescing window short
        try:
            with self._lock:
                return self._written.wait_for(lambda: self._written_seq >= target, timeout)
        finally:
            with self._lock:
                self._flush_waiters -= 1

    def stats(self) -> QueueStats:
        with self._lock:
            n = dict(self._n)
            in_memory = sum(_chunk_len(c) for c in list(self._pending))
            in_flight = sum(len(b) for b in self._in_flight) if self._in_flight and not self._in_flight_on_disk else 0
            pending = in_memory + in_flight
            age = time.monotonic() - self._last_empty if pending else 0.0
            return QueueStats(accepted=self._taken + self._accepted_elsewhere + in_memory, pending=pending,
                              spill_buffered=self._spill_buffer_pairs + self._spill_in_flight,
                              oldest_pending_age_s=age, last_write_s=self._last_write_s, **n)

    @property
    def running(self) -> bool:
        return self._state == _RUNNING

    # -- the worker ------------------------------------------------------------------

    def _run_worker(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._deliver(batch)
                with self._lock:
                    self._in_flight = None
                    self._mark_done(batch.done_seqs)
        except (_GiveUp, _Abandoned):
            return
        except BaseException:  # a bug: make it loud, stop() still spills what is left
            log.exception("provenance worker crashed")

    def _next_batch(self):
        """The next batch from memory; does idle work while there is none. None: time to exit."""
        coalesced = False
        while True:
            if self._abandoned:
                return None
            closing = self._state is not _RUNNING
            if not self._pending:
                self._last_empty = time.monotonic()
                if closing:
                    return None
                if self._idle_work():
                    continue
                self._wake_threshold = 1
                self._wake.clear()
                if not self._pending and self._state is _RUNNING:
                    if not self._wake.wait(min(self.idle_replay_s, 1.0)):
                        self._maintain()
                self._wake_threshold = _NEVER
                continue
            if not coalesced and not closing and not self._flush_waiters and not self._full_batch_waiting():
                coalesced = True
                # A chunk holds at least one pair: this many chunks make a full batch.
                self._wake_threshold = self.max_batch_pairs
                self._wake.clear()
                if not self._flush_waiters and not self._full_batch_waiting():
                    self._wake.wait(self.coalesce_s)
                self._wake_threshold = _NEVER
                continue
            return self._take()

    def _full_batch_waiting(self) -> bool:
        pending = list(self._pending)  # a copy: enqueue appends meanwhile
        if len(pending) >= self.max_batch_pairs:
            return True
        total = 0
        for c in pending:
            total += _chunk_len(c)
            if total >= self.max_batch_pairs:
                return True
        return False

    def _take(self, into: Optional[deque] = None):
        """Up to max_batch_pairs from memory, published as in flight (into ``into``) in the same step."""
        with self._lock:
            pairs: list = []
            eids: list = []
            done: list = []
            room = self.max_batch_pairs
            pending = self._pending
            while pending and room:
                seq, items, start, seen = pending[0]
                end = min(len(items), start + room)
                part = items[start:end]
                if seen:
                    pairs += [p for p, _ in part]
                    eids += [e for _, e in part]
                else:
                    pairs += part
                    pre = f"{self._prefix}{seq:x}."
                    eids += [pre + str(i) for i in range(start, end)]
                room -= end - start
                if end == len(items):
                    pending.popleft()
                    done.append(seq)
                else:
                    pending[0] = (seq, items, end, seen)
            self._taken += len(pairs)
            batch = _Batch(pairs, eids, done_seqs=done)
            if into is None:
                into = deque()
            into.append(batch)
            self._in_flight = into
            self._in_flight_on_disk = False
            return batch

    def _deliver(self, batch, verify: bool = False) -> None:
        """Write ``batch`` (a ProvenanceBatch), retrying and isolating poison, until done.

        Raises _GiveUp when the stop deadline passes first, _Abandoned when
        stop() has taken the batch over; the unwritten part is then in
        ``self._in_flight`` for stop() to spill.
        """
        with self._lock:
            if self._in_flight is None or self._in_flight[0] is not batch:
                self._in_flight = deque([batch])
                self._in_flight_on_disk = True  # a replay: its pairs are safe in the claimed file
            todo = self._in_flight
        attempt = 0
        single_failures = 0
        while todo:
            b = todo[0]
            if verify:
                b.verify = True
            error = self._try_write(b)
            if error is None:
                with self._lock:
                    if self._abandoned:
                        raise _Abandoned
                    todo.popleft()
                attempt = single_failures = 0
                continue
            b.verify = True  # it may have landed: from now on the store checks first
            if len(b) > 1:
                mid = len(b) // 2
                with self._lock:
                    todo.popleft()
                    todo.appendleft(_Batch(b[mid:], b.entry_ids[mid:], verify=True))
                    todo.appendleft(_Batch(b[:mid], b.entry_ids[:mid], verify=True))
                continue
            single_failures += 1
            if single_failures >= _POISON_FAILURES and self._is_poison(todo, batch):
                single_failures = 0
                continue
            self._backoff(attempt)
            attempt += 1

    def _try_write(self, b) -> Optional[Exception]:
        t0 = time.perf_counter()
        try:
            self._store.append_provenance_batch(b, records_cache=None)
        except Exception as exc:
            with self._lock:
                self._n["store_errors"] += 1
            self._warn.emit(log, logging.WARNING, "write.failed", key=type(exc).__name__,
                            error=repr(exc)[:300], pairs=len(b))
            return exc
        dt = time.perf_counter() - t0
        with self._lock:
            self._n["written"] += len(b)
            self._n["last_batch_size"] = len(b)
            self._last_write_s = dt
            self._rows_since_maintain += len(b)
        return None

    def _is_poison(self, todo: deque, batch) -> bool:
        """todo[0], a single pair, keeps failing: if what follows it writes, it is poison."""
        if len(todo) < 2:
            # Borrow the next pairs from memory as the probe.
            with self._lock:
                have_more = bool(self._pending)
            if not have_more:
                return False
            nxt = self._take(into=todo)
            batch.done_seqs += nxt.done_seqs  # the worker marks both done together
        probe = todo[1]
        err = self._try_write(probe)
        if err is not None:
            return False  # the store is failing everything: an outage, not poison
        with self._lock:
            if self._abandoned:
                raise _Abandoned
            poison = todo.popleft()
            todo.popleft()
        exc = self._try_write(poison)  # one last chance, now that the store is known good
        if exc is None:
            return True
        self._quarantine_pairs(poison, f"store rejected: {type(exc).__name__}: {exc}")
        return True

    def _backoff(self, attempt: int) -> None:
        cap = min(self.retry_max_s, self.retry_initial_s * (2 ** min(attempt, 30)))
        delay = cap / 2 + random.uniform(0, cap / 2)
        with self._lock:
            self._n["retries"] += 1
        emit(log, logging.DEBUG, "retry", attempt=attempt + 1, delay_s=round(delay, 3))
        if time.monotonic() + delay > self._deadline:
            time.sleep(max(0.0, self._deadline - time.monotonic()))
            raise _GiveUp
        end = time.monotonic() + delay
        while True:
            left = min(end, self._deadline) - time.monotonic()
            if left <= 0:
                break
            if self._stop_requested.wait(left):
                # stop() set a deadline: sleep out what is left of the shorter of the two.
                time.sleep(max(0.0, min(end, self._deadline) - time.monotonic()))
                break
        if self._abandoned:
            raise _Abandoned
        if time.monotonic() >= self._deadline:
            raise _GiveUp

    def _quarantine_pairs(self, batch, reason: str) -> None:
        bad = []
        for (rid, entry), eid in zip(batch, batch.entry_ids):
            try:
                raw = encode_line(rid, entry, eid, True)
            except (TypeError, ValueError):
                raw = (repr({"id": str(rid), "entry": entry, "eid": eid}) + "\n").encode()
            bad.append(BadLine(0, raw, reason))
        self._quarantine(f"{self._spill.writer}-poison", bad)

    def _quarantine(self, stem: str, bad: list, whole: Optional[Path] = None) -> None:
        lines = len(bad) if whole is None or bad[0].lineno else 1
        try:
            target = self._spill.quarantine(stem, bad, whole=whole)
        except OSError as exc:
            with self._lock:
                self._n["dropped"] += lines
            emit(log, logging.ERROR, "drop", count=lines, reason=f"cannot quarantine: {exc}")
            return
        with self._lock:
            self._n["quarantined_files"] += 1
            self._n["quarantined_lines"] += lines
        emit(log, logging.WARNING, "quarantine", file=target.name, lines=lines, reason=bad[0].reason[:300])

    # -- idle work: spill replay, memory refill, maintenance ----------------------------------

    def _idle_work(self) -> bool:
        """Called when memory is empty. True when it did something."""
        if self._replay_one():
            return True
        if not self._spilling:
            return False
        generation = self._n["spilled_files"]
        if self._spill.replayable():
            return False  # ours are still on disk, or orphans of our store wait for their replayer
        with self._lock:
            if self._spill_in_flight or self._n["spilled_files"] != generation:
                return False  # a file was written since we looked: it goes first
            moved = False
            while self._spill_buffer and len(self._pending) < self.max_queue_size:
                c = self._spill_buffer.popleft()
                self._spill_buffer_pairs -= _chunk_len(c)
                self._accepted_elsewhere -= _chunk_len(c)  # counted again when taken
                self._pending.append(c)
                moved = True
            if not self._spill_buffer and not self._spill_in_flight:
                self._spilling = False
                self._fast = self._state is _RUNNING  # after the move: new chunks go behind it
            return moved

    def _replay_one(self) -> bool:
        """Replay the oldest spill files we may claim. True when it replayed (or quarantined) any."""
        sd = self._spill
        now = time.monotonic()
        files = [f for f in sd.replayable() if self._replay_skip.get(f[0], 0.0) <= now]
        if not files:
            return self._recover_lone_tmp_files()
        lock_fd = None
        if not files[0][1]:
            lock_fd = sd.acquire_replay_lock()
            if lock_fd is None:
                return False
        try:
            if lock_fd is not None and sd.recover_tmp_files():
                files = sd.replayable()
            own = files[0][1]
            if own != (lock_fd is None):
                return True  # the picture changed under us: look again
            run = []  # the oldest files of one kind (ours, or orphans under the lock), in order
            for name, is_own in files:
                if is_own != own:
                    break
                run.append(name)
            self._replay_files(run)
            return True
        finally:
            sd.release_replay_lock(lock_fd)

    def _recover_lone_tmp_files(self) -> bool:
        """A dead writer's tmp file with no spill file beside it: recover it too (under the replay lock)."""
        sd = self._spill
        if not any(n.startswith(".") and n.endswith(".jsonl.tmp") for n in sd._names()):
            return False
        lock_fd = sd.acquire_replay_lock()
        if lock_fd is None:
            return False
        try:
            return bool(sd.recover_tmp_files())
        finally:
            sd.release_replay_lock(lock_fd)

    def _replay_files(self, names: list[str]) -> None:
        """Claim, parse and write spill files oldest first.

        Small files are gathered into one store write (a LanceDB commit costs
        the same for 10 rows or 4000). A file is removed only after its lines
        are written; a crash before that leaves it claimed, for a verified replay.
        """
        group = []
        gathered = 0
        for name in names:
            try:
                claimed, recovered = self._spill.claim(name)
            except FileNotFoundError:
                continue  # taken by someone else since we listed it
            stem = claimed.name.removesuffix(".claimed")
            try:
                parsed = parse_file(claimed, stem)
            except OSError as exc:
                self._warn.emit(log, logging.WARNING, "replay.failed", key=stem, file=claimed.name, error=str(exc))
                self._replay_skip[claimed.name] = time.monotonic() + self.idle_replay_s
                continue
            group.append((name, claimed, stem, recovered, parsed))
            gathered += len(parsed.pairs)
            if gathered >= self.replay_batch_pairs:
                break
        pairs = [p for g in group for p in g[4].pairs]
        entry_ids = [e for g in group for e in g[4].entry_ids]
        # Lines that may have landed before (a crash mid-replay, a stuck write at
        # stop, an older writer's line) make the store check ids first.
        verify = any(recovered or parsed.seen for _, _, _, recovered, parsed in group)
        for start in range(0, len(pairs), self.replay_batch_pairs):
            end = start + self.replay_batch_pairs
            self._deliver(_Batch(pairs[start:end], entry_ids[start:end], verify=verify), verify=verify)
            with self._lock:
                self._in_flight = None
                self._n["replayed"] += len(pairs[start:end])
        for name, claimed, stem, recovered, parsed in group:
            if parsed.bad:
                self._quarantine(stem, parsed.bad, whole=claimed if not parsed.pairs else None)
            if parsed.pairs or not parsed.bad:
                self._spill.remove(claimed)
            emit(log, logging.INFO, "replay", file=stem, pairs=len(parsed.pairs), bad_lines=len(parsed.bad),
                 verified=recovered)
            with self._lock:
                self._mark_done(_expand(self._own_file_seqs.pop(name, ())))

    def _maintain(self) -> None:
        if not self._rows_since_maintain:
            return
        maintain = getattr(self._store, "maintain", None)
        if maintain is None:
            return
        self._rows_since_maintain = 0
        try:
            maintain()
        except Exception as exc:
            self._warn.emit(log, logging.WARNING, "maintain.failed", error=repr(exc)[:300])

    # -- the spill thread ---------------------------------------------------------------

    def _run_spiller(self) -> None:
        attempt = 0
        while True:
            self._spill_wake.wait(1.0)
            self._spill_wake.clear()
            if self._spill_buffer_pairs < min(self.spill_file_pairs, self.max_memory_pairs // 2):
                # Under overload, wait a moment for more: few large files replay far
                # faster than many small ones. Small enough that enqueue never waits.
                self._stop_requested.wait(min(self.coalesce_s, 0.05))
            while True:
                with self._lock:
                    if not self._spill_buffer:
                        break
                    chunks, count = [], 0
                    while self._spill_buffer and count < self.spill_file_pairs:
                        c = self._spill_buffer.popleft()
                        chunks.append(c)
                        count += _chunk_len(c)
                    self._spill_buffer_pairs -= count
                    self._spill_in_flight += count
                ok = self._spill_chunks(chunks, in_flight=count)
                with self._lock:
                    self._spill_failing = not ok
                    if not ok:  # back to the front, in order; retried below
                        self._spill_in_flight -= count
                        self._spill_buffer.extendleft(reversed(chunks))
                        self._spill_buffer_pairs += count
                    self._spill_room.notify_all()
                if ok:
                    attempt = 0
                    self._wake.set()  # the worker may replay it when idle
                    continue
                delay = min(self.retry_max_s, self.retry_initial_s * (2 ** min(attempt, 30)))
                attempt += 1
                if self._state is not _RUNNING or self._stop_requested.wait(delay):
                    return  # stop() spills the buffer itself, or counts it dropped
            if self._state is not _RUNNING:
                return

    def _spill_chunks(self, chunks: list, before_ts: Optional[int] = None, in_flight: int = 0) -> bool:
        """Write chunks to one spill file. False when the directory failed (the chunks are untouched).

        ``in_flight``: pairs of these chunks counted in _spill_in_flight, moved
        to the spilled counters in the same step so stats() never counts them twice.
        """
        lines, bad = [], []
        seqs = _seq_ranges(c[_SEQ] for c in chunks if c[_SEQ] > 0)  # consecutive calls: one range
        for c in chunks:
            seq, items, start, seen = c
            if seen:
                it = ((p, e, True) for p, e in items[start:])
            else:
                pre = f"{self._prefix}{seq:x}."
                it = ((p, pre + str(i), False) for i, p in enumerate(items[start:], start))
            for (rid, entry), eid, seen in it:
                try:
                    lines.append(encode_line(rid, entry, eid, seen))
                except (TypeError, ValueError) as exc:
                    bad.append(BadLine(0, (repr({"id": str(rid), "entry": entry, "eid": eid}) + "\n").encode(),
                                       f"entry cannot be written as JSON: {exc}"))
        named: list[str] = []

        def register(name: str) -> None:
            # Before the rename: our own worker may replay the file at once and
            # must find the enqueue calls it completes.
            named.append(name)
            with self._lock:
                self._own_file_seqs[name] = seqs

        try:
            path = self._spill.write(lines, before_ts=before_ts, on_named=register) if lines else None
        except OSError as exc:
            with self._lock:
                for name in named:  # the file never appeared
                    self._own_file_seqs.pop(name, None)
                self._n["spill_errors"] += 1
            self._warn.emit(log, logging.ERROR, "spill.failed", key=exc.errno, dir=str(self.spill_dir), error=str(exc))
            return False
        if bad:
            self._quarantine(f"{self._spill.writer}-unencodable", bad)
        with self._lock:
            self._spill_in_flight -= in_flight
            if path is not None:
                self._n["spilled_files"] += 1
                self._n["spilled_pairs"] += len(lines)
            else:
                self._mark_done(seqs)  # every line was quarantined
        if path is not None:
            emit(log, logging.INFO, "spill", file=path.name, pairs=len(lines))
        return True

    def _spill_now(self, chunks: list, before_own_files: bool = False) -> None:
        """Spill on the calling thread (stop, late enqueues); count a failure as a drop."""
        before = self._spill.oldest_own_ts() if before_own_files else None
        if self._spill_chunks(chunks, before_ts=before):
            return
        n = sum(_chunk_len(c) for c in chunks)
        with self._lock:
            self._n["dropped"] += n
        emit(log, logging.ERROR, "drop", count=n, reason="stopping: neither the store nor the spill directory took them")
