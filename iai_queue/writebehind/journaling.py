"""Write-ahead mode: ``enqueue`` journals each call before it returns; memory is only a cache.

Chosen at construction (``durability`` other than ``"memory"``): the facade
binds :meth:`JournaledAdmission.enqueue` as the queue's ``enqueue``, so memory
mode's hot path (:meth:`Admission.enqueue`) is not touched at all.

Guarantee (write-ahead): when ``enqueue`` returns, the call is a whole record
in the journal (:mod:`iai_queue.journal`): it reaches the store even if the
process dies next — replayed by the next queue on the store, exactly once
(entry ids verified), in order per record.

Memory is a cache: a call goes to memory too while memory has room and no
backlog waits. Once memory is full the calls stay on disk only (the
*backlog*); the worker re-reads them, in order, when memory is empty (how
they are read back: :mod:`.journal_backlog`), and calls go to memory again
once it has caught up. Nothing spills.

At start, while journals of dead writers or spill files of the store wait,
new calls wait in the backlog behind them (order per record).

When the journal cannot be written (ENOSPC, EROFS, a removed directory):
``enqueue`` still accepts — the call takes memory mode's path (memory, then
the spill directory), counted in ``stats().journal_fallbacks`` and logged at
ERROR (rate-limited); the journal is tried again after ``retry_s`` and
journaling resumes once the disk takes it. Calls that arrive while a backlog
waits are held behind it (``after_backlog``), so order is kept there too. When
the fallback overflowed memory into the spill, the calls journaled after it
wait in the backlog until the spill has gone back to memory or the store
(``refill``): journaled, and behind the older calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Optional
from uuid import UUID

from ..events import RateLimiter
from ..journal import Durability, JournalWriter, Segment
from ..pairs import known_id_strings, validate_pairs
from .admission import Admission, Route
from .chunks import HeldChunk, chunk_seq
from .journal_backlog import REFILL_BYTES, as_chunks, read_backlog, segment_after
from .ledger import Ledger
from .lifecycle import Lifecycle, StopSignal

__all__ = ["JournaledAdmission", "JournalThread"]

log = logging.getLogger("iai_queue.queue")

SYNC_WAIT_S = 10.0  # fsync-always: enqueue waits at most this long for its fsync, then returns (logged)


class JournaledAdmission:
    """The journal's side of admission: the write-ahead ``enqueue``, the backlog, and stop()'s hooks."""

    def __init__(self, admission: Admission, lock: threading.Lock, ledger: Ledger, warn: RateLimiter,
                 new_writer: Callable[[], JournalWriter], durability: Durability, max_memory_pairs: int):
        self.adm = admission
        self.pending = admission.pending  # the memory cache's deque (the same object for the queue's life)
        self.next_seq = admission.next_seq
        self.lock = lock  # the queue's lock (order: writer.lock, then this one)
        self.ledger = ledger
        self.warn = warn
        self.new_writer = new_writer
        self.always = durability is Durability.FSYNC_ALWAYS
        self.max_queue_size = admission.max_queue_size
        self.max_memory_pairs = max_memory_pairs
        self.writer: JournalWriter = new_writer()
        self.backlog: Optional[tuple[Segment, int]] = None  # the first journaled call not in memory
        self.backlog_seq = 0  # calls up to this one are in memory already (or were)
        self.backlog_pairs = 0
        self.backlog_since = 0.0
        self.hold = False  # the backlog waits for older entries on disk (dead writers' journals, spill files)
        self.after_backlog: deque = deque()  # unjournaled calls that came while a backlog waited
        self.after_backlog_pairs = 0
        self.unjournaled: set[int] = set()  # seqs of calls in memory that the journal does not hold
        self.fallbacks = 0

    # -- the hot path ------------------------------------------------------------------

    def enqueue(self, pairs: list) -> None:
        # The same inline check as memory mode's hot path (Admission.enqueue), for the same reason.
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
        if not items:
            return
        adm = self.adm
        fast = adm._fast
        if not fast and adm.state is not Lifecycle.RUNNING:
            # Not started, or stop() began: the closed route, which journals it if the queue is (or is by
            # then) running — never memory directly: a start() in between would leave it unjournaled there.
            adm.on_closed((adm.next_seq(), items))
            return
        writer = self.writer
        lock = writer.lock
        closed = False
        lock.acquire()  # not ``with``: its __exit__ call costs ~0.1 µs here
        try:
            seq = self.next_seq()
            if writer.accepting:  # this run's writer, and stop() has not begun
                try:
                    seg, offset = writer.append_locked(seq, items)
                except (OSError, TypeError) as exc:
                    chunk = self._unjournaled_locked(seq, items, exc)
                else:
                    pending = self.pending
                    # Not fast while running: a fallback spilled, and this call waits on disk behind it.
                    if fast and self.backlog is None and len(pending) < self.max_queue_size:
                        pending.append((seq, items))
                        if len(pending) >= adm.wake_threshold:
                            adm.wake_worker()  # and disarm: the rest of the burst does not set it again
                    else:
                        self._behind_backlog_locked(seq, len(items), seg, offset)
                    if not self.always:
                        return
                    chunk = None
            else:
                # stop() began, or a later run's writer replaced the one read above: the closed route takes
                # it (never memory: after a restart it would pass what the last run left in the journal).
                chunk, closed = (seq, items), True
        finally:
            lock.release()
        if closed:
            adm.on_closed(chunk)
        elif chunk is not None:
            adm._enqueue_locked(chunk)
        elif not writer.wait_synced(seq, SYNC_WAIT_S):
            self.warn.emit(log, logging.ERROR, "journal.fsync_slow", key="fsync", wait_s=SYNC_WAIT_S)

    def _behind_backlog_locked(self, seq: int, n_pairs: int, seg: Segment, offset: int) -> None:
        """Memory is full (or a backlog waits): the call stays on disk only, in the backlog."""
        if self.backlog is None:
            self.backlog, self.backlog_seq, self.backlog_since = (seg, offset), seq - 1, time.monotonic()
        self.backlog_pairs += n_pairs
        if not self.adm.pending:
            self.adm.worker_wake.set()

    def _unjournaled_locked(self, seq: int, items: tuple, exc: Exception) -> Optional[tuple]:
        """The journal refused a call: memory mode's path for it (writer lock held). Returns the chunk
        for the caller to admit after the lock, or None when it waits behind the backlog."""
        self.unjournaled.add(seq)
        if isinstance(exc, OSError):
            self.fallbacks += 1
            self.warn.emit(log, logging.ERROR, "journal.failed", key="journal", error=str(exc)[:300],
                           fallbacks=self.fallbacks, reason="the journal cannot be written: entries stay in "
                           "memory (memory mode) until it can")
        chunk = (seq, items)
        if self.backlog is None:
            return chunk
        self.after_backlog.append(chunk)
        self.after_backlog_pairs += len(items)
        return None

    # -- start, and the worker's idle work ------------------------------------------------------

    def start(self, hold: bool) -> None:
        """A new run: a fresh writer and its first segment. Failing to open it is a fallback, not an error."""
        writer = self.writer = self.new_writer()
        try:
            writer.open()
        except OSError as exc:
            with writer.lock:
                writer._failed_locked(exc)
            self.warn.emit(log, logging.ERROR, "journal.failed", key="journal", error=str(exc)[:300],
                           reason="cannot open the journal: entries stay in memory until it can be written")
        with writer.lock:
            writer.accepting = True
            self.hold = hold
            seg = writer.current
            if hold and seg is not None:
                self.backlog, self.backlog_seq, self.backlog_since = (seg, seg.data_start), 0, time.monotonic()

    @property
    def holding(self) -> bool:
        """New calls wait on disk, in the backlog (behind older entries on disk, or memory is full)."""
        return self.backlog is not None

    def refill(self, stop: StopSignal, older_waiting: Callable[[], bool]) -> bool:
        """Memory is empty: move backlog calls from the journal into memory. True when it moved any.

        Only for the run that ``stop`` ends, while it takes calls: checked in both locked steps, as
        stop() closes admission and the journal under the writer's lock, and a new run has a new writer.
        """
        writer = self.writer
        with writer.lock:
            if not self._refilling_locked(stop, writer) or self.backlog is None:
                return False
            if self.adm.route is Route.BEHIND_SPILL:
                return False  # a fallback's calls wait in the spill: older than the backlog's
            if self.hold:
                if older_waiting():
                    return False
                self.hold = False
            seg, offset = self.backlog
            end = min(seg.size, offset + REFILL_BYTES)
            room = self.max_queue_size - len(self.adm.pending)
            after_seq = self.backlog_seq
        taken, new_offset = read_backlog(writer.read_records, seg, offset, end, room, after_seq)
        chunks = as_chunks(taken)
        moved = 0
        with writer.lock:
            if not self._refilling_locked(stop, writer):
                return False  # what was read stays in the journal, for the run that replays it
            pending = self.adm.pending
            for c in chunks:
                pending.append(c)
                moved += len(c[1])
            self.backlog_pairs -= moved
            if taken:
                self.backlog_seq = taken[-1].seq
            self._advance_locked(seg, new_offset)
        return bool(taken) or self.backlog is None

    def _refilling_locked(self, stop: StopSignal, writer: JournalWriter) -> bool:
        return not stop.abandoned and writer.accepting and self.writer is writer

    def _advance_locked(self, seg: Segment, offset: int) -> None:
        writer = self.writer
        if offset < seg.size:
            self.backlog = (seg, offset)
            return
        later = segment_after(writer.segments, seg)
        if seg is writer.current or later is None:
            self._caught_up_locked()
        else:
            self.backlog = (later, later.data_start)

    def _caught_up_locked(self) -> None:
        """Every journaled call is in memory (or done): calls go to memory again, after the held ones."""
        self.backlog = None
        self.backlog_pairs = 0
        pending = self.adm.pending
        while self.after_backlog:
            pending.append(self.after_backlog.popleft())
        self.after_backlog_pairs = 0

    def backlog_segment(self, seg: Segment) -> bool:
        b = self.backlog
        return b is not None and b[0] is seg

    # -- stop()'s hooks ---------------------------------------------------------------------

    def close_admission(self) -> list:
        """stop() began: no more journaled calls; returns the held calls (unjournaled) for stop() to spill."""
        with self.writer.lock:
            self.writer.accepting = False
            held = list(self.after_backlog)
            self.after_backlog.clear()
            self.after_backlog_pairs = 0
            return held

    def only_unjournaled(self, chunks: list, prefix: str) -> list:
        """Of chunks taken back at stop, the ones the journal does not hold (the rest stay on disk)."""
        return unjournaled_only(chunks, self.unjournaled, prefix)

    def close(self, done_seq: int) -> bool:
        """The run is over: fsync, checkpoint, close. True when journaled calls remain on disk."""
        writer = self.writer
        writer.close(done_seq)
        with writer.lock:
            self.backlog = None
            self.backlog_pairs = 0
            self.hold = False
        # Forget the ones that are done; a fallback call still on its way to memory stays known as unjournaled.
        self.unjournaled = {s for s in self.unjournaled if s > done_seq}
        return bool(writer.remaining_after_close)

    # -- stats ------------------------------------------------------------------------------

    def sync(self, timeout: float) -> bool:
        """Block until every call journaled before this one is fsynced; False on timeout or a failing disk."""
        writer = self.writer
        with writer.lock:
            target = writer.appended_seq
        try:
            if not writer.durability.fsyncs and not writer.closed:
                writer.sync()  # "process": no thread fsyncs on a timer, so do it here
        except OSError:
            return False
        return writer.wait_synced(target, timeout)

    def stats_locked(self, replayer) -> dict:
        """The journal's fields of ``stats()`` (the writer's lock held)."""
        mtime = replayer.oldest_orphan_mtime
        orphan_age = max(0.0, time.time() - mtime) if mtime is not None else 0.0
        backlog_age = time.monotonic() - self.backlog_since if self.backlog is not None else 0.0
        return dict(self.writer.stats_locked(), journal_fallbacks=self.fallbacks, journal_backlog=self.backlog_pairs,
                    oldest_unreplayed_age_s=max(backlog_age, orphan_age))


def unjournaled_only(chunks: list, unjournaled: set[int], prefix: str) -> list:
    """Of ``chunks``, the calls (by seq) and pairs (by entry id ``<prefix><seq:x>.<i>``, for pairs taken over
    from the worker) in ``unjournaled``; pairs of other queues' ids are kept too."""
    out = []
    for c in chunks:
        seq = chunk_seq(c)
        if seq > 0:
            if seq in unjournaled:
                out.append(c)
            continue
        keep = [i for i, eid in enumerate(c.entry_ids[c.start:], c.start)
                if not eid.startswith(prefix) or int(eid[len(prefix):].split(".")[0], 16) in unjournaled]
        if keep:
            out.append(HeldChunk(-1, tuple(c.items[i] for i in keep), 0, [c.entry_ids[i] for i in keep], True))
    return out


class JournalThread:
    """Group commit and housekeeping: fsync every interval (fsync modes), notice a removed directory,
    checkpoint the done-watermark and delete segments the store has."""

    def __init__(self, journal: JournaledAdmission, done_seq: Callable[[], int], interval_s: float):
        self.journal = journal
        self.done_seq = done_seq
        self.interval_s = interval_s

    def run(self, stop: StopSignal) -> None:
        writer = self.journal.writer
        fsyncs = writer.durability.fsyncs
        while not stop.requested.is_set():
            writer.sync_wanted.wait(self.interval_s)
            writer.sync_wanted.clear()
            if stop.requested.is_set():
                return
            try:
                if fsyncs:
                    writer.sync()
                writer.check_linked()
                writer.retire(self.done_seq(), in_use=self.journal.backlog_segment)
            except OSError as exc:  # the disk: logged, tried again next round
                self.journal.warn.emit(log, logging.ERROR, "journal.sync_failed", key="sync", error=str(exc)[:300])


def journal_parts(adm: Admission, lock: threading.Lock, ledger: Ledger, warn: RateLimiter, spill, ids, delivery,
                  cfg) -> tuple["JournaledAdmission", object, Callable]:
    """The journaled admission, the replayer of dead writers' journals, and the worker's idle hook."""
    from .journal_replay import JournalReplayer

    journal = JournaledAdmission(
        adm, lock, ledger, warn, lambda: JournalWriter(spill, ids.prefix, cfg.durability,
                                                       segment_bytes=cfg.journal_segment_bytes,
                                                       fsync_interval_s=cfg.fsync_interval_s,
                                                       retry_s=cfg.retry_max_s),
        cfg.durability, cfg.max_memory_pairs)
    replayer = JournalReplayer(lock, ledger, spill, delivery, warn, batch_pairs=cfg.replay_batch_pairs,
                               retry_unreadable_s=cfg.idle_replay_s,
                               live_names=lambda: {s.path.name for s in journal.writer.segments},
                               own_prefix=lambda: ids.prefix)

    def journal_idle(stop) -> bool:
        return replayer.replay_some(stop) or journal.refill(stop, lambda: bool(replayer.orphans())
                                                            or bool(spill.replayable()))

    return journal, replayer, journal_idle
