"""Replay: spill files back into the store, oldest first.

claim (rename to ``.claimed``) → parse → deliver → quarantine the bad lines →
remove. Used by the queue's worker when memory is empty, and by
``iai-queue spill replay`` directly.

Guarantee 5 (spill files): a file is removed only after its lines are in the
store; a crash before that leaves it claimed, and the next replayer verifies
every line against the store. A dead writer's ``.tmp`` is recovered first.

Guarantee 6 (several processes, one directory): a live queue replays its own
files, in order; files of dead writers (orphans) are replayed by one process at
a time, under the directory's replay lock.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from ..events import RateLimiter, emit
from ..pairs import ProvenanceSink
from ..spill import SpillDirectory, parse_file
from ..spill.names import is_pending_name, is_tmp_name, is_writer_of_this_process, parse_name, stem_of
from .delivery import Batch, Delivery
from .file_retries import UNREADABLE_SET_ASIDE_AFTER, FileRetries
from .ledger import Ledger
from .lifecycle import Backoff, StopSignal
from .quarantine import Quarantine

__all__ = ["Replayer", "StandaloneParts", "files_waiting"]

log = logging.getLogger("iai_queue.queue")


def _name(file: tuple[str, bool]) -> str:
    return file[0]


class StandaloneParts(NamedTuple):
    """What a replayer needs when no queue provides it (``iai-queue spill replay``): one lock, ledger,
    directory, rate limiter, quarantine and a delivery into ``store.append_provenance_batch``."""

    lock: threading.Lock
    ledger: Ledger
    directory: SpillDirectory
    warn: RateLimiter
    quarantine: Quarantine
    delivery: Delivery

    @classmethod
    def for_store(cls, store: ProvenanceSink, spill_dir, retry_initial_s: float,
                  retry_max_s: float) -> "StandaloneParts":
        lock = threading.Lock()
        ledger = Ledger(lock)
        directory = SpillDirectory(spill_dir, store_path=getattr(store, "path", None),
                                   tag=getattr(store, "identity", None))
        warn = RateLimiter()
        quarantine = Quarantine(lock, ledger, directory, warn)
        delivery = Delivery(lock, ledger, lambda b: store.append_provenance_batch(b, records_cache=None),
                            Backoff(retry_initial_s, retry_max_s), warn, quarantine.pairs)
        return cls(lock, ledger, directory, warn, quarantine, delivery)


class Replayer:
    def __init__(self, lock: threading.Lock, ledger: Ledger, directory: SpillDirectory, delivery: Delivery,
                 quarantine: Quarantine, warn: RateLimiter, *, batch_pairs: int, retry_unreadable_s: float,
                 memory_empty: Callable[[], bool] = lambda: True):
        self.lock = lock
        self.ledger = ledger
        self.directory = directory
        self.delivery = delivery
        self.quarantine = quarantine
        self.warn = warn
        self.batch_pairs = batch_pairs
        self.retries = FileRetries(retry_unreadable_s, lock, ledger, warn, "replay.failed", "replay.set_aside")
        self.memory_empty = memory_empty  # the queue's memory holds no call (its own files may be newer)

    @classmethod
    def for_store(cls, store: ProvenanceSink, spill_dir, *, batch_pairs: int = 8192, retry_initial_s: float = 0.05,
                  retry_max_s: float = 1.0) -> "Replayer":
        """A replayer of its own (no queue): for ``iai-queue spill replay``. Its counts are in ``ledger.n``."""
        p = StandaloneParts.for_store(store, spill_dir, retry_initial_s, retry_max_s)
        return cls(p.lock, p.ledger, p.directory, p.delivery, p.quarantine, p.warn, batch_pairs=batch_pairs,
                   retry_unreadable_s=retry_max_s)

    def replay_some(self, stop: StopSignal, own_under_lock: bool = False, before: Optional[str] = None) -> bool:
        """Replay the oldest files this process may claim. True when it replayed (or quarantined) any.

        ``before``: only files whose stem sorts before it (older files on disk that must land first).

        ``own_under_lock``: replay our own files under the replay lock too, like
        orphans — for a stopped queue, whose files every other replayer of the
        store already takes for orphans: two replayers of one run of files
        would write them side by side, out of order.

        Raises GiveUp/Abandoned as :meth:`Delivery.deliver` does; the file
        being written then stays claimed, for a verified replay later.
        """
        directory = self.directory
        listed = self._older(directory.replayable(), before)
        files = self.retries.ready(listed, _name)
        if not files:
            return not listed and before is None and self._recover_lone_tmp_files()
        if files[0][1] and not own_under_lock:
            # Asked again now that the files are listed: a call may have reached memory since the caller
            # found it empty, and a file listed since then may hold later calls of the same records.
            if self.memory_empty():
                self._replay_files(self._oldest_run(files), stop)
            return True
        with directory.replay_lock() as held:
            if not held:
                return False
            if directory.recover_tmp_files():
                files = self.retries.ready(self._older(directory.replayable(), before), _name)
            if not files:
                return True  # the picture changed under us: look again
            if own_under_lock:
                self._replay_files([name for name, _ in files], stop)  # one replayer: every kind, in order
            elif files[0][1]:
                return True  # the picture changed under us: look again
            else:
                self._replay_files(self._oldest_run(files), stop)
            directory.remove_stale_writer_locks()
            return True

    @staticmethod
    def _older(files: list[tuple[str, bool]], before: Optional[str]) -> list[tuple[str, bool]]:
        if before is None:
            return files
        return [f for f in files if stem_of(f[0]) < before]

    @staticmethod
    def _oldest_run(files: list[tuple[str, bool]]) -> list[str]:
        """The oldest files of one kind (ours, or orphans under the lock), in order."""
        own = files[0][1]
        run = []
        for name, is_own in files:
            if is_own != own:
                break
            run.append(name)
        return run

    def _put_aside(self, stem: str, claimed: Path, reason: str) -> Path:
        return self.directory.set_aside(stem, claimed, reason, suffix=".jsonl")  # `spill requeue` brings it back

    def _recover_lone_tmp_files(self) -> bool:
        """A dead writer's tmp file with no spill file beside it: recover it too (under the replay lock)."""
        if not self.directory.has_tmp_files():
            return False
        with self.directory.replay_lock() as held:
            return held and bool(self.directory.recover_tmp_files())

    def _replay_files(self, names: list[str], stop: StopSignal) -> None:
        """Claim, parse and write spill files oldest first.

        Small files are gathered into one store write (a LanceDB commit costs
        the same for 10 rows or 4000). A file is removed only after its lines
        are written; a crash before that leaves it claimed, for a verified replay.
        """
        group = []
        gathered = 0
        for name in names:
            if stop.abandoned:  # a later run may be replaying these: claim nothing more
                break
            try:
                claimed, recovered = self.directory.claim(name)
            except FileNotFoundError:
                # Claimed since we listed it (another replayer, or a worker of ours that stop() gave up on):
                # the younger files wait until the next listing shows where it went, so they never land first.
                break
            except OSError as exc:  # a read-only directory: this file, and so the younger ones, later
                self.retries.failed(name, exc)
                break
            stem = claimed.name.removesuffix(".claimed")
            try:
                parsed = parse_file(claimed, stem)
            except OSError as exc:
                if self.retries.failed(claimed.name, exc) < UNREADABLE_SET_ASIDE_AFTER \
                        or not self.retries.set_aside(claimed, stem, exc, self._put_aside):
                    break
                with self.lock:
                    self.ledger.file_replayed(name)  # done with, as quarantined lines are: flush() does not wait
                continue
            self.retries.done(name)
            self.retries.done(claimed.name)
            group.append((name, claimed, stem, recovered, parsed))
            gathered += len(parsed.pairs)
            if gathered >= self.batch_pairs:
                break
        pairs = [p for g in group for p in g[4].pairs]
        entry_ids = [e for g in group for e in g[4].entry_ids]
        # Lines that may have landed before (a crash mid-replay, a stuck write at
        # stop, an older writer's line) make the store check ids first.
        verify = any(recovered or parsed.seen for _, _, _, recovered, parsed in group)
        for start in range(0, len(pairs), self.batch_pairs):
            end = start + self.batch_pairs
            self.delivery.deliver(Batch(pairs[start:end], entry_ids[start:end], verify=verify), stop, verify=verify)
            with self.lock:
                self.delivery.finish_locked(stop)
                self.ledger.count(replayed=len(pairs[start:end]))
        for name, claimed, stem, recovered, parsed in group:
            kept = True
            if parsed.bad:
                kept = self.quarantine.lines(stem, parsed.bad, whole=claimed if not parsed.pairs else None,
                                             still_on_disk=True)
            if kept and (parsed.pairs or not parsed.bad):
                try:
                    self.directory.remove(claimed)
                except OSError as exc:  # written, but still there: replayed again later, verified
                    self.retries.failed(claimed.name, exc)
            emit(log, logging.INFO, "replay", file=stem, pairs=len(parsed.pairs), bad_lines=len(parsed.bad),
                 verified=recovered)
            with self.lock:
                self.ledger.file_replayed(name)


def files_waiting(directory: SpillDirectory) -> bool:
    """Spill files of this store that a write made now would overtake.

    Those a replayer of ``directory`` may take (its own, and dead writers'), and
    every file of this store written by a queue of this process — a live one's,
    or a ``.tmp`` a stopping queue is still writing — whose entries were accepted
    before now. Another process's live writer is not waited for: order is per process.
    """
    if directory.replayable():
        return True
    for name in directory.regular_names():
        if is_tmp_name(name):
            stem = stem_of(name[1:-len(".tmp")])
        elif is_pending_name(name) or name.endswith(".claimed"):
            stem = stem_of(name)
        else:
            continue
        parts = parse_name(stem)
        if parts is not None and parts.store == directory.store and is_writer_of_this_process(parts.writer):
            return True
    return False
