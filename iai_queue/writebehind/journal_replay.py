"""Recovery: journals of writers that are gone, replayed into the store exactly once, in order.

A journal segment is replayed by someone else only when its writer's lock
(``.writer-<writer>.lock``, the spill directory's) is free: the writer died,
or stopped. A live writer's segments are never read by another process.
Orphan segments of this queue's store are replayed oldest first, one process
at a time (under the directory's replay lock), by a queue's worker when its
memory is empty, or by ``iai-queue spill replay``.

Per segment: records at or below the writer's checkpoint are skipped (the
store has them); the rest are delivered in order, without any entry id the
store already has — a replay cut short by a crash and run again never applies
anything twice. A dead writer of another process: its suffix's ids are looked
up once per segment by entry-id range (``stored_between``), then written in
commits of ``COMMIT_PAIRS``; a stopped queue of this process: every batch is
verified by the store (which also waits for a write of theirs still under way).
Segments are decoded in bounded runs, so memory does not grow with the journal.

A dead writer's spill files (calls its journal refused, e.g. on a full disk,
spilled by memory mode's path) are merged into its journal by seq, so its
calls land in the order they were accepted; the queue's worker and the CLI
therefore replay journals before spill files (:class:`JournalsFirst`).

Damage (a torn tail, flipped bytes; see
:mod:`iai_queue.journal.reader` for the resync policy) is set aside byte for
byte as ``<stem>.failed-<unix_ts>.wal`` with a ``.reason`` file naming each
span's offsets and cause, *before* the segment is deleted. A segment is
deleted only after its records are in the store and its damage is set aside.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Callable, Optional

from ..events import RateLimiter, emit
from ..journal import read_checkpoint
from ..journal.checkpoint import remove_checkpoint
from ..journal.bulk import decode_run, entry_id_ranges, first_after, first_bad, seq_at
from ..journal.format import JournalHeader, decode_header
from ..journal.reader import Damage, good_frames, read_segment_bytes, scan_records
from ..pairs import ProvenanceSink
from ..spill import SpillDirectory, parse_file
from ..spill.directory import fsync_dir
from ..spill.locks import lock_held, locks_available
from ..spill.names import is_journal_name, is_pending_name, parse_name, stem_of, writer_lock_name
from .delivery import Batch, Delivery
from .ledger import Ledger
from .lifecycle import Backoff, StopSignal
from .quarantine import Quarantine

__all__ = ["JournalReplayer", "JournalsFirst", "memory_mode_replay"]

log = logging.getLogger("iai_queue.queue")

COMMIT_PAIRS = 16_384  # pairs per store write in a replay (one LanceDB commit each)
COMMIT_BYTES = 32 << 20  # and at most this many journal bytes' worth (records with many pairs)
RUN_BYTES = 1 << 20  # journal bytes decoded per call


class JournalReplayer:
    """Replays orphan journal segments of one store. ``live_names()``: our current run's segment names;
    ``own_prefix()``/``own_done()``: our entry-id prefix and done-watermark (our stopped runs' records
    at or below it are in the store already)."""

    def __init__(self, lock: threading.Lock, ledger: Ledger, directory: SpillDirectory, delivery: Delivery,
                 warn: RateLimiter, *, batch_pairs: int, retry_unreadable_s: float,
                 live_names: Callable[[], set] = set, own_prefix: Callable[[], Optional[str]] = lambda: None,
                 stored_between: Optional[Callable[[str, str], set]] = None):
        self.lock = lock
        self.ledger = ledger
        self.directory = directory
        self.delivery = delivery
        self.warn = warn
        self.batch_pairs = batch_pairs
        self.retry_unreadable_s = retry_unreadable_s
        self.live_names = live_names
        self.own_prefix = own_prefix
        # The store's range lookup of entry ids (MemoryStore.stored_entry_ids_between); None: verify per batch.
        self.stored_between = stored_between
        self._skip_until: dict[str, float] = {}
        self._merging: dict[str, _SpillMerge] = {}  # writer -> its spill files, merged into its journal by seq
        self.oldest_orphan_mtime: Optional[float] = None

    @classmethod
    def for_store(cls, store: ProvenanceSink, spill_dir, *, batch_pairs: int = 8192, retry_initial_s: float = 0.05,
                  retry_max_s: float = 1.0) -> "JournalReplayer":
        """A replayer of its own (no queue): for ``iai-queue spill replay``. Its counts are in ``ledger.n``."""
        lock = threading.Lock()
        ledger = Ledger(lock)
        directory = SpillDirectory(spill_dir, store_path=getattr(store, "path", None),
                                   tag=getattr(store, "identity", None))
        warn = RateLimiter()
        quarantine = Quarantine(lock, ledger, directory, warn)
        delivery = Delivery(lock, ledger, lambda b: store.append_provenance_batch(b, records_cache=None),
                            Backoff(retry_initial_s, retry_max_s), warn, quarantine.pairs)
        return cls(lock, ledger, directory, delivery, warn, batch_pairs=batch_pairs, retry_unreadable_s=retry_max_s,
                   stored_between=getattr(store, "stored_entry_ids_between", None))

    def orphans(self) -> list[str]:
        """Orphan segments of our store, oldest first (empty where file locks are unavailable)."""
        if not locks_available():
            return []
        directory = self.directory
        live = self.live_names()
        alive: dict[str, bool] = {}
        out = []
        oldest = None
        now = time.monotonic()
        for n in directory.regular_names():
            if not is_journal_name(n) or n in live or self._skip_until.get(n, 0.0) > now:
                continue
            parts = parse_name(stem_of(n))
            if parts is None or parts.store != directory.store:
                continue
            w = parts.writer
            if w != directory.writer:
                if w not in alive:
                    alive[w] = lock_held(directory.path / writer_lock_name(w)) is not False  # unknown: alive
                if alive[w]:
                    continue
            out.append(n)
        out.sort(key=stem_of)
        if out:
            try:
                oldest = os.stat(directory.path / out[0]).st_mtime
            except OSError:
                pass
        self.oldest_orphan_mtime = oldest
        return out

    def replay_some(self, stop: StopSignal) -> bool:
        """Replay the oldest orphan segment. True when it did (or set one aside)."""
        if not self.orphans():
            return False
        with self.directory.replay_lock() as held:
            if not held:
                return False
            names = self.orphans()  # again, under the lock
            if names:
                writer = _writer_of(names[0])
                if self._spill_files_of(writer):  # merged with its spill files: all of it in this lock hold
                    for name in [n for n in names if _writer_of(n) == writer]:
                        self.replay_segment(name, stop)
                else:
                    self.replay_segment(names[0], stop)
            return True

    def replay_all(self, stop: StopSignal) -> int:
        """Every orphan segment (for the CLI). Returns how many segments were replayed."""
        done = 0
        with self.directory.replay_lock() as held:
            if not held:
                return 0
            while names := self.orphans():
                self.replay_segment(names[0], stop)
                done += 1
        return done

    def _failed(self, name: str, exc: OSError) -> None:
        with self.lock:
            self.ledger.count(spill_errors=1)
        self.warn.emit(log, logging.WARNING, "journal.replay_failed", key=name, file=name, error=str(exc))
        self._skip_until[name] = time.monotonic() + self.retry_unreadable_s

    def replay_segment(self, name: str, stop: StopSignal) -> None:
        """One segment: deliver (verified), set the damage aside, then delete it. Call under the replay lock.

        Raises GiveUp/Abandoned as :meth:`Delivery.deliver` does; the segment then stays, for a later replay.
        """
        directory = self.directory
        path = directory.path / name
        stem = stem_of(name)
        try:
            data = read_segment_bytes(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._failed(name, exc)
            return
        head = decode_header(data)
        if isinstance(head, str):
            header, damage, replayed = None, [Damage(0, len(data), head)], _Replayed()
        else:
            header, pos = head
            try:
                replayed, damage = self._deliver_records(data, pos, header, stop)
            except _Skip as exc:
                self._failed(name, exc.args[0])
                return
        if damage:
            reasons = "".join(f"bytes {d.offset}..{d.end} ({d.end - d.offset} bytes) of {name}: {d.reason}\n"
                              for d in damage)
            try:
                target = directory.quarantine_bytes(stem, b"".join(data[d.offset:d.end] for d in damage), reasons)
            except OSError as exc:
                self._failed(name, exc)  # the segment stays: replayed again (verified) later
                return
            with self.lock:
                self.ledger.count(quarantined_files=1, quarantined_lines=len(damage))
            self.warn.emit(log, logging.ERROR, "journal.damaged", key=name, file=target.name,
                           spans=len(damage), reason=damage[0].reason[:300])
        try:
            os.unlink(path)
            fsync_dir(directory.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._failed(name, exc)
            return
        emit(log, logging.INFO, "journal.replay", file=name, records=replayed.records, pairs=replayed.pairs,
             damaged_spans=len(damage))
        if header is not None and not any(is_journal_name(n) and f"-{header.writer}-" in n
                                          for n in directory.names()):
            merge = self._merging.pop(header.writer, None)
            if merge is not None:  # its last segment: the spill lines after it, then the files go
                self._finish_merge(merge, header.prefix, stop)
            remove_checkpoint(directory.path, header.writer)

    def _deliver_records(self, data: bytes, pos: int, header: JournalHeader,
                         stop: StopSignal) -> tuple["_Replayed", list[Damage]]:
        """Every good record after the checkpoint into the store, in order; returns what was replayed and
        the damaged spans. Bounded memory: payloads are decoded and written ``COMMIT_PAIRS`` at a time."""
        done_up_to = read_checkpoint(self.directory.path, header.writer)
        own_run = header.prefix == self.own_prefix()
        if own_run:
            with self.lock:
                done_up_to = max(done_up_to, self.ledger.written_seq)
        # Ids a dead writer of another process may have written: looked up once per segment, by range.
        # Our own process's (a stopped queue of ours) are verified per batch: that also waits for a
        # write of theirs still under way (see delivery.WRITES_IN_FLIGHT).
        other_process = _writer_pid(header.writer) != os.getpid()
        stored_between = self.stored_between if other_process else None
        out = _Replayed(own_run=own_run)
        sink = _CommitBuffer(self, header.prefix, stop, out, verify=stored_between is None)
        try:
            merge = self._merge_of(header)
        except OSError as exc:
            raise _Skip(exc) from exc
        if merge is not None:
            sink.merge, sink.verify = merge.items, True  # spill lines may have landed (claimed, or seen)
        try:
            return self._deliver_suffix(data, pos, header, done_up_to, sink, stored_between, out)
        except BaseException:
            self._merging.pop(header.writer, None)  # rebuilt from the (claimed) files next time, verified
            raise

    def _deliver_suffix(self, data: bytes, pos: int, header: JournalHeader, done_up_to: int, sink: "_CommitBuffer",
                        stored_between, out: "_Replayed") -> tuple["_Replayed", list[Damage]]:
        bounds = good_frames(data, pos)
        first = first_after(data, bounds, done_up_to)
        sink.floor = done_up_to  # records at or below it are in the store (the search may not have skipped all)
        if stored_between is not None and first < len(bounds) - 1:
            last = seq_at(data, bounds, len(bounds) - 2)
            lo = seq_at(data, bounds, first)
            if lo is None or last is None or last < lo:
                sink.verify = True
            else:
                sink.stored = set().union(*(stored_between(a, b) for a, b in entry_id_ranges(header.prefix, lo, last)))
        last_seq = (seq_at(data, bounds, first - 1) or 0) if first else 0
        i, n = first, len(bounds) - 1
        while i < n:
            j, size = i, 0
            while j < n and size < RUN_BYTES:
                size += bounds[j + 1] - bounds[j]
                j += 1
            objs = decode_run(data, bounds, i, j)
            bad = first_bad(objs, last_seq)
            if bad:
                last_seq = objs[bad - 1][0]
                sink.add(objs[:bad] if bad < len(objs) else objs, size)
            if bad < j - i:
                pos = bounds[i + bad]  # not a good record by the bulk check: the reader's policy decides
                break
            i = j
        else:
            pos = bounds[-1]
        damage: list[Damage] = []
        if pos < len(data):
            records, damage = scan_records(data, pos, last_seq)
            if records:
                sink.verify = True  # past the damage: not covered by the range lookup above
                sink.add([(r.seq, r.items) for r in records], 0)
        sink.flush()
        if out.own_run and out.seqs:
            with self.lock:
                self.ledger.mark_done(out.seqs)
        return out, damage


    # -- a dead writer's spill files, merged into its journal by seq -----------------------------------

    def _spill_files_of(self, writer: Optional[str]) -> list[str]:
        """Pending or claimed spill files of ``writer`` for our store, oldest first."""
        if writer is None:
            return []
        out = []
        for n in self.directory.regular_names():
            if is_pending_name(n) or n.endswith(".claimed"):
                parts = parse_name(stem_of(n))
                if parts is not None and parts.writer == writer and parts.store == self.directory.store:
                    out.append(n)
        return sorted(out, key=stem_of)

    def _merge_of(self, header: JournalHeader) -> Optional["_SpillMerge"]:
        """The writer's spill lines (calls its journal refused), claimed and ordered by seq; None if none.

        A write-ahead writer whose journal failed (disk full) took memory mode's
        path for those calls and may have spilled them. Its journal and those
        files together hold its calls; replayed merged by seq, they land in the
        order they were accepted, per record.
        """
        merge = self._merging.get(header.writer)
        if merge is not None:
            return merge
        names = self._spill_files_of(header.writer)
        if not names:
            return None
        merge = _SpillMerge()
        prefix = header.prefix
        rows = []
        for name in names:
            try:
                claimed, _ = self.directory.claim(name)
            except FileNotFoundError:
                continue
            parsed = parse_file(claimed, stem_of(claimed.name))
            for pair, eid in zip(parsed.pairs, parsed.entry_ids):
                rows.append((_seq_of(eid, prefix), pair, eid))
            if parsed.bad:
                merge.keep.append(claimed.name)  # its bad lines: the spill replayer quarantines them (verified)
            else:
                merge.done.append(claimed)
        rows.sort(key=lambda r: r[0])  # stable: a file's lines keep their order
        merge.items = deque(rows)
        self._merging[header.writer] = merge
        return merge

    def _finish_merge(self, merge: "_SpillMerge", prefix: str, stop: StopSignal) -> None:
        """After the writer's last segment: its remaining spill lines, then its spill files go."""
        if merge.items:
            sink = _CommitBuffer(self, prefix, stop, _Replayed(), verify=True)
            sink.pairs = [pair for _, pair, _ in merge.items]
            sink.entry_ids = [eid for _, _, eid in merge.items]
            merge.items.clear()
            sink.flush()
        for claimed in merge.done:
            try:
                self.directory.remove(claimed)
            except FileNotFoundError:
                pass
            except OSError as exc:  # written, but still there: replayed again later, verified
                self._failed(claimed.name, exc)
        emit(log, logging.INFO, "journal.replay_spill_merged", files=len(merge.done) + len(merge.keep),
             left_for_quarantine=len(merge.keep))


class _Skip(Exception):
    """A segment that cannot be replayed now (a filesystem error, logged): tried again later."""


class _SpillMerge:
    __slots__ = ("items", "done", "keep")

    def __init__(self) -> None:
        self.items: deque = deque()
        self.done: list = []  # claimed paths to remove once everything is in the store
        self.keep: list = []  # claimed files with bad lines, left for the spill replayer


def _writer_of(name: str) -> Optional[str]:
    parts = parse_name(stem_of(name))
    return parts.writer if parts is not None else None


def _seq_of(entry_id: str, prefix: str) -> int:
    """The call number in ``<prefix><seq:x>.<i>``; 0 (first) for an id of another prefix."""
    if not entry_id.startswith(prefix):
        return 0
    try:
        return int(entry_id[len(prefix):entry_id.index(".", len(prefix))], 16)
    except ValueError:
        return 0


class _Replayed:
    __slots__ = ("records", "pairs", "seqs", "own_run")

    def __init__(self, own_run: bool = False):
        self.records = 0
        self.pairs = 0
        self.seqs: list[int] = []  # kept only for our own stopped run (its ledger marks them done)
        self.own_run = own_run


class _CommitBuffer:
    """Records gathered into store writes of up to COMMIT_PAIRS pairs (a LanceDB commit costs about the same
    for 256 rows or 50 000), with their entry ids; ids in ``stored`` (already in the store) are left out."""

    def __init__(self, replayer: JournalReplayer, prefix: str, stop: StopSignal, out: _Replayed, verify: bool):
        self.replayer = replayer
        self.prefix = prefix
        self.stop = stop
        self.out = out
        self.verify = verify
        self.stored: set = set()
        self.floor = 0  # records at or below this seq are in the store already
        self.merge: Optional[deque] = None  # (seq, pair, entry id) of the writer's spill lines, by seq
        self.pairs: list = []
        self.entry_ids: list = []
        self.bytes = 0

    def add(self, records, size: int) -> None:
        if records and self.floor and records[0][0] <= self.floor:  # seqs increase: only a first run has any
            records = [r for r in records if r[0] > self.floor]
        pairs, eids, prefix = self.pairs, self.entry_ids, self.prefix
        merge = self.merge
        if not merge and all(len(items) == 1 for _, items in records):  # one pair per call: in bulk
            pairs += [items[0] for _, items in records]
            eids += [f"{prefix}{seq:x}.0" for seq, _ in records]
            records_iter = ()
        else:
            records_iter = records
        for seq, items in records_iter:
            while merge and merge[0][0] < seq:  # the writer's spill lines that come before this call
                _, pair, eid = merge.popleft()
                pairs.append(pair)
                eids.append(eid)
            pairs += items
            if len(items) == 1:
                eids.append(f"{prefix}{seq:x}.0")
            else:
                head = f"{prefix}{seq:x}."
                eids += [head + str(k) for k in range(len(items))]
        out = self.out
        out.records += len(records)
        if out.own_run:
            out.seqs += [seq for seq, _ in records]
        self.bytes += max(0, size)
        if len(pairs) >= COMMIT_PAIRS or self.bytes >= COMMIT_BYTES:
            self.flush()

    def flush(self) -> None:
        pairs, eids = self.pairs, self.entry_ids
        self.pairs, self.entry_ids, self.bytes = [], [], 0
        if self.stored:
            stored = self.stored
            keep = [k for k, e in enumerate(eids) if e not in stored]
            if len(keep) < len(eids):
                pairs, eids = [pairs[k] for k in keep], [eids[k] for k in keep]
        if not pairs:
            return
        r = self.replayer
        for start in range(0, len(pairs), COMMIT_PAIRS):
            end = start + COMMIT_PAIRS
            r.delivery.deliver(Batch(pairs[start:end], eids[start:end], verify=self.verify), self.stop,
                               verify=self.verify)
            with r.lock:
                r.delivery.finish_locked()
                r.ledger.count(replayed=len(pairs[start:end]))
        self.out.pairs += len(pairs)


def _writer_pid(writer: str) -> Optional[int]:
    """The pid in a writer name ``w<pid>x<hex>``, or None."""
    try:
        return int(writer[1:writer.index("x")])
    except ValueError:
        return None


def memory_mode_replay(lock: threading.Lock, ledger: Ledger, directory: SpillDirectory, delivery: Delivery,
                       warn: RateLimiter, cfg, prefix: str, store,
                       held_behind: Callable[[], bool]) -> tuple[JournalReplayer, Callable[[StopSignal], bool]]:
    """A memory-mode queue's replayer of dead writers' journals, and the worker's idle hook for it.

    Memory mode writes no journal, but a writer that ran in a write-ahead mode
    on this store and died left one: it is replayed exactly once, like a spill
    file of a dead writer. While such a journal waits for another process's
    replay (the replay lock is held elsewhere) and new entries are held behind
    older ones on disk (``held_behind``), the hook waits instead of letting them pass.
    """
    replayer = JournalReplayer(lock, ledger, directory, delivery, warn, batch_pairs=cfg.replay_batch_pairs,
                               retry_unreadable_s=cfg.idle_replay_s, own_prefix=lambda: prefix,
                               stored_between=getattr(store, "stored_entry_ids_between", None))
    wait_s = min(cfg.idle_replay_s, 0.2)

    def idle(stop: StopSignal) -> bool:
        if replayer.replay_some(stop):
            return True
        if held_behind() and replayer.orphans():
            stop.sleep(wait_s)
            return True
        return False

    return replayer, idle


class JournalsFirst:
    """The worker's replayer: dead writers' journals first, then spill files.

    A dead write-ahead writer's spill files are merged into its journal by seq
    (see :meth:`JournalReplayer._merge_of`); the spill replayer must not take
    them first while the journal waits.
    """

    def __init__(self, journals: JournalReplayer, spill_files):
        self.journals = journals
        self.spill_files = spill_files

    def replay_some(self, stop: StopSignal) -> bool:
        return self.journals.replay_some(stop) or self.spill_files.replay_some(stop)
