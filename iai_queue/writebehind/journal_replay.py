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
up once per segment by entry-id range (``stored_between``); a stopped queue of
this process: every batch is verified by the store (which also waits for a
write of theirs still under way). How a segment's bytes become store writes —
decoded in bounded runs, in commits, merged by seq with the writer's spill
files — is :mod:`.journal_merge`'s.

A dead writer's spill files (calls its journal refused, e.g. on a full disk,
spilled by memory mode's path) are claimed with its first segment and merged
into its journal, so its calls land in the order they were accepted; the
queue's worker and the CLI therefore replay journals before spill files
(:class:`JournalsFirst`).

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
from typing import Callable, Optional

from ..events import RateLimiter, emit
from ..journal import read_checkpoint
from ..journal.checkpoint import remove_checkpoint
from ..journal.format import JournalHeader, decode_header
from ..journal.reader import Damage, read_segment_bytes
from ..pairs import ProvenanceSink
from ..spill import SpillDirectory
from ..spill.directory import fsync_dir
from ..spill.locks import lock_held, locks_available
from ..spill.names import is_journal_name, parse_name, stem_of, writer_lock_name
from .delivery import Batch, Delivery
from .journal_merge import CommitBuffer, Replayed, SpillMerges, decode_suffix
from .ledger import Ledger
from .lifecycle import StopSignal
from .file_retries import UNREADABLE_SET_ASIDE_AFTER, FileRetries
from .replay import StandaloneParts, files_waiting

__all__ = ["JournalReplayer", "JournalsFirst", "memory_mode_replay"]

log = logging.getLogger("iai_queue.queue")


class JournalReplayer:
    """Replays orphan journal segments of one store. ``live_names()``: our current run's segment names;
    ``own_prefix()``/``own_done()``: our entry-id prefix and done-watermark (our stopped runs' records
    at or below it are in the store already)."""

    def __init__(self, lock: threading.Lock, ledger: Ledger, directory: SpillDirectory, delivery: Delivery,
                 warn: RateLimiter, *, batch_pairs: int, retry_unreadable_s: float,
                 live_names: Callable[[], set] = set, own_prefix: Callable[[], Optional[str]] = lambda: None):
        self.lock = lock
        self.ledger = ledger
        self.directory = directory
        self.delivery = delivery
        self.warn = warn
        self.batch_pairs = batch_pairs
        self.live_names = live_names
        self.own_prefix = own_prefix
        # The store's range lookup of entry ids (MemoryStore.stored_entry_ids_between); None: verify per batch.
        self.stored_between: Optional[Callable[[str, str], set]] = None
        self.encoded_entries = False  # the store takes entries as their JSON (see use_store)
        self.retries = FileRetries(retry_unreadable_s, lock, ledger, warn, "journal.replay_failed", "journal.set_aside")
        self._merges = SpillMerges(directory)  # dead writers' spill files, merged into their journals by seq
        self.oldest_orphan_mtime: Optional[float] = None

    @classmethod
    def for_store(cls, store: ProvenanceSink, spill_dir, *, batch_pairs: int = 8192, retry_initial_s: float = 0.05,
                  retry_max_s: float = 1.0) -> "JournalReplayer":
        """A replayer of its own (no queue): for ``iai-queue spill replay``. Its counts are in ``ledger.n``."""
        p = StandaloneParts.for_store(store, spill_dir, retry_initial_s, retry_max_s)
        return cls(p.lock, p.ledger, p.directory, p.delivery, p.warn, batch_pairs=batch_pairs,
                   retry_unreadable_s=retry_max_s).use_store(store)

    def use_store(self, store: ProvenanceSink) -> "JournalReplayer":
        """Take up what ``store`` offers beyond its append (a :class:`~iai_queue.store.MemoryStore` offers
        both): a range lookup of stored entry ids (``stored_entry_ids_between``: one query per segment
        instead of one per batch), and ``takes_encoded_entries`` (entries handed over as their JSON, no
        decode and re-encode)."""
        self.stored_between = getattr(store, "stored_entry_ids_between", None)
        self.encoded_entries = getattr(store, "takes_encoded_entries", False) is True
        return self

    def orphans(self) -> list[str]:
        """Orphan segments of our store, oldest first (empty where file locks are unavailable)."""
        if not locks_available():
            return []
        directory = self.directory
        live = self.live_names()
        alive: dict[str, bool] = {}
        out = []
        oldest = None
        for n in directory.regular_names():
            if not is_journal_name(n) or n in live:
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

    def ready_orphans(self) -> list[str]:
        """:meth:`orphans` up to the first that waits for a retry (the younger ones wait behind it)."""
        return self.retries.ready(self.orphans())

    def replay_some(self, stop: StopSignal) -> bool:
        """Replay the oldest orphan segment. True when it did (or set one aside)."""
        if not self.ready_orphans():
            return False
        with self.directory.replay_lock() as held:
            if not held:
                return False
            names = self.ready_orphans()  # again, under the lock
            if names:
                writer = _writer_of(names[0])
                if self._merges.files_of(writer):  # merged with its spill files: all of it in this lock hold
                    for name in [n for n in names if _writer_of(n) == writer]:
                        if not self.replay_segment(name, stop):
                            break  # it stays for a retry: the younger segments wait behind it
                else:
                    self.replay_segment(names[0], stop)
            return True

    def replay_all(self, stop: StopSignal) -> int:
        """Every orphan segment (for the CLI), up to the first that must wait for a retry. Returns how many
        segments were replayed or set aside."""
        done = 0
        with self.directory.replay_lock() as held:
            if not held:
                return 0
            while names := self.ready_orphans():
                if not self.replay_segment(names[0], stop):
                    break
                done += 1
        return done

    def _put_aside(self, stem: str, path, reason: str):
        return self.directory.set_aside(stem, path, reason, suffix=".wal")

    def replay_segment(self, name: str, stop: StopSignal) -> bool:
        """One segment: deliver (verified), set the damage aside, then delete it. Call under the replay lock.
        True when it is done with (or gone); False when it stays for a retry (a filesystem error, logged).

        Raises GiveUp/Abandoned as :meth:`Delivery.deliver` does; the segment then stays, for a later replay.
        """
        directory = self.directory
        path = directory.path / name
        stem = stem_of(name)
        try:
            data = read_segment_bytes(path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            return self.retries.failed(name, exc) >= UNREADABLE_SET_ASIDE_AFTER \
                and self.retries.set_aside(path, stem, exc, self._put_aside)
        head = decode_header(data)
        if isinstance(head, str):
            header, damage, replayed = None, [Damage(0, len(data), head)], Replayed()
        else:
            header, pos = head
            try:
                replayed, damage = self._deliver_records(data, pos, header, stop)
            except _Skip as exc:
                self.retries.failed(name, exc.args[0])
                return False
        if damage:
            reasons = "".join(f"bytes {d.offset}..{d.end} ({d.end - d.offset} bytes) of {name}: {d.reason}\n"
                              for d in damage)
            try:
                target = directory.quarantine_bytes(stem, b"".join(data[d.offset:d.end] for d in damage), reasons)
            except OSError as exc:
                self.retries.failed(name, exc)  # the segment stays: replayed again (verified) later
                return False
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
            self.retries.failed(name, exc)
            return False
        self.retries.done(name)
        emit(log, logging.INFO, "journal.replay", file=name, records=replayed.records, pairs=replayed.pairs,
             damaged_spans=len(damage))
        if header is not None and not any(is_journal_name(n) and f"-{header.writer}-" in n
                                          for n in directory.names()):
            merge = self._merges.take(header.writer)
            if merge is not None:  # its last segment: the spill lines after it, then the files go
                self._merges.finish(merge, CommitBuffer(self._commit, header.prefix, stop, Replayed(), verify=True),
                                    self.retries.failed)
            remove_checkpoint(directory.path, header.writer)
        return True

    def _deliver_records(self, data: bytes, pos: int, header: JournalHeader,
                         stop: StopSignal) -> tuple[Replayed, list[Damage]]:
        """Every good record after the checkpoint into the store, in order; returns what was replayed and
        the damaged spans. Bounded memory: decoded and written in bounded runs (:mod:`.journal_merge`)."""
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
        out = Replayed(own_run=own_run)
        try:
            merge = self._merges.claim(header)
        except OSError as exc:
            raise _Skip(exc) from exc
        # With a merge: spill lines may have landed (claimed, or seen), so every batch is verified.
        sink = CommitBuffer(self._commit, header.prefix, stop, out, verify=stored_between is None or merge is not None,
                            merge=merge.items if merge is not None else None)
        sink.encoded = self.encoded_entries
        try:
            damage = decode_suffix(data, pos, header.prefix, done_up_to, sink, stored_between)
        except BaseException:
            self._merges.take(header.writer)  # rebuilt from the (claimed) files next time, verified
            raise
        if out.own_run and out.seqs:
            with self.lock:
                self.ledger.mark_done(out.seqs)
        return out, damage

    def _commit(self, pairs: list, entry_ids: list, verify: bool, stop: StopSignal) -> None:
        """One store write of a replay (raises GiveUp/Abandoned as :meth:`Delivery.deliver` does)."""
        self.delivery.deliver(Batch(pairs, entry_ids, verify=verify), stop, verify=verify)
        with self.lock:
            self.delivery.finish_locked(stop)
            self.ledger.count(replayed=len(pairs))

class _Skip(Exception):
    """A segment that cannot be replayed now (a filesystem error, logged): tried again later."""


def _writer_of(name: str) -> Optional[str]:
    parts = parse_name(stem_of(name))
    return parts.writer if parts is not None else None


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
                               retry_unreadable_s=cfg.idle_replay_s, own_prefix=lambda: prefix).use_store(store)
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
    (see :class:`~iai_queue.writebehind.journal_merge.SpillMerges`); the spill replayer must not take
    them first while the journal waits.
    """

    def __init__(self, journals: JournalReplayer, spill_files):
        self.journals = journals
        self.spill_files = spill_files

    def waiting(self) -> bool:
        """Something on disk that a write made now would overtake: a spill file
        (:func:`~iai_queue.writebehind.replay.files_waiting`) or an orphan journal segment (a stopped
        queue's of this process, or a dead writer's)."""
        return files_waiting(self.spill_files.directory) or bool(self.journals.orphans())

    def replay_some(self, stop: StopSignal, own_under_lock: bool = False) -> bool:
        """As :meth:`Replayer.replay_some <iai_queue.writebehind.replay.Replayer.replay_some>` (``own_under_lock``
        is passed on to it), orphan journal segments first."""
        orphans = self.journals.orphans()
        if not orphans:  # the common case: one listing of the directory
            return self.spill_files.replay_some(stop, own_under_lock=own_under_lock)
        if self.journals.replay_some(stop):
            return True
        # Orphans left (one waiting for a retry, or another process replaying it): younger spill files wait.
        return self.spill_files.replay_some(stop, own_under_lock=own_under_lock, before=stem_of(orphans[0]))
