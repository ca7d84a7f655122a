"""Recovery: journals of writers that are gone, replayed into the store exactly once, in order.

A journal segment is replayed by someone else only when its writer's lock
(``.writer-<writer>.lock``, the spill directory's) is free: the writer died,
or stopped. A live writer's segments are never read by another process.
Orphan segments of this queue's store are replayed oldest first, one process
at a time (under the directory's replay lock), by a queue's worker when its
memory is empty, or by ``iai-queue spill replay``.

Per segment: records at or below the writer's checkpoint are skipped (the
store has them); the rest are delivered in order with ``verify`` set, so the
store skips entry ids it already has — a replay cut short by a crash and run
again never applies anything twice. Damage (a torn tail, flipped bytes; see
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
from typing import Callable, Optional

from ..events import RateLimiter, emit
from ..journal import read_checkpoint, scan_segment
from ..journal.checkpoint import remove_checkpoint
from ..journal.reader import read_segment_bytes
from ..pairs import ProvenanceSink
from ..spill import SpillDirectory
from ..spill.directory import fsync_dir
from ..spill.locks import lock_held, locks_available
from ..spill.names import is_journal_name, parse_name, stem_of, writer_lock_name
from .delivery import Batch, Delivery
from .ledger import Ledger
from .lifecycle import Backoff, StopSignal
from .quarantine import Quarantine

__all__ = ["JournalReplayer"]

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
        self.retry_unreadable_s = retry_unreadable_s
        self.live_names = live_names
        self.own_prefix = own_prefix
        self._skip_until: dict[str, float] = {}
        self.oldest_orphan_mtime: Optional[float] = None

    @classmethod
    def for_store(cls, store: ProvenanceSink, spill_dir, *, batch_pairs: int = 8192, retry_initial_s: float = 0.05,
                  retry_max_s: float = 1.0) -> "JournalReplayer":
        """A replayer of its own (no queue): for ``iai-queue spill replay``. Its counts are in ``ledger.n``."""
        lock = threading.Lock()
        ledger = Ledger(lock)
        directory = SpillDirectory(spill_dir, store_path=getattr(store, "path", None))
        warn = RateLimiter()
        quarantine = Quarantine(lock, ledger, directory, warn)
        delivery = Delivery(lock, ledger, lambda b: store.append_provenance_batch(b, records_cache=None),
                            Backoff(retry_initial_s, retry_max_s), warn, quarantine.pairs)
        return cls(lock, ledger, directory, delivery, warn, batch_pairs=batch_pairs, retry_unreadable_s=retry_max_s)

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
        scan = scan_segment(path, data)
        header = scan.header
        done_up_to = 0
        own_run = False
        if header is not None:
            done_up_to = read_checkpoint(directory.path, header.writer)
            own_run = header.prefix == self.own_prefix()
            if own_run:
                with self.lock:
                    done_up_to = max(done_up_to, self.ledger.written_seq)
        records = [r for r in scan.records if r.seq > done_up_to]
        pairs: list = []
        entry_ids: list = []
        for r in records:
            pre = f"{header.prefix}{r.seq:x}."
            for i, (rid, entry) in enumerate(r.items):
                pairs.append((rid, entry))
                entry_ids.append(pre + str(i))
        for start in range(0, len(pairs), self.batch_pairs):
            end = start + self.batch_pairs
            self.delivery.deliver(Batch(pairs[start:end], entry_ids[start:end], verify=True), stop, verify=True)
            with self.lock:
                self.delivery.finish_locked()
                self.ledger.count(replayed=len(pairs[start:end]))
        if own_run:
            with self.lock:
                self.ledger.mark_done(r.seq for r in records)
        if scan.damage:
            reasons = "".join(f"bytes {d.offset}..{d.end} ({d.end - d.offset} bytes) of {name}: {d.reason}\n"
                              for d in scan.damage)
            try:
                target = directory.quarantine_bytes(stem, b"".join(data[d.offset:d.end] for d in scan.damage),
                                                    reasons)
            except OSError as exc:
                self._failed(name, exc)  # the segment stays: replayed again (verified) later
                return
            with self.lock:
                self.ledger.count(quarantined_files=1, quarantined_lines=len(scan.damage))
            self.warn.emit(log, logging.ERROR, "journal.damaged", key=name, file=target.name,
                           spans=len(scan.damage), reason=scan.damage[0].reason[:300])
        try:
            os.unlink(path)
            fsync_dir(directory.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._failed(name, exc)
            return
        emit(log, logging.INFO, "journal.replay", file=name, records=len(records), pairs=len(pairs),
             damaged_spans=len(scan.damage))
        if header is not None and not any(is_journal_name(n) and f"-{header.writer}-" in n
                                          for n in directory.names()):
            remove_checkpoint(directory.path, header.writer)
