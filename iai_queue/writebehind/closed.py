"""The closed route: what happens to an enqueue once ``stop()`` has begun.

Guarantee 7 (lifecycle), the closed half: from the moment ``stop()`` begins, an
enqueue waits for the drain (at most the stop's deadline plus
``CLOSING_WAIT_MARGIN_S``) and then goes *behind* it: to the queue that replaced
this one (the store's toggle links them), or written on the caller's thread —
after replaying, on that thread, whatever this store still has waiting on disk —
or, when the store fails, spilled behind what is on disk. Never beside the drain,
never beside a ``start()``: closed-route writes hold ``lock``, and ``start()`` takes it too.

Guarantee 4 (order), the synchronous half: a write on the caller's thread goes to
the store only when the spill directory holds nothing of this store that was
accepted before it — asked of the directory at every write, not of a flag: files
of any queue of this process (the store's toggle makes one queue after another,
and a caller may still hold any of them), files of dead writers, spill files
still being written, and journal segments that a stopped queue of this process
or a dead writer left. What waits is replayed here first, under the directory's
replay lock (one replayer at a time, so one run of files is never written side
by side), journal segments before spill files (a writer's spill lines are merged
into its journal); when some of it cannot be (another replayer has it, the store
fails), the entry is spilled behind it, named after every file there.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from ..events import emit
from ..pairs import EntryIds, ProvenanceBatch
from ..spill import SpillDirectory
from .admission import Admission
from .chunks import Chunk, HeldChunk, chunk_parts, chunk_seq
from .delivery import Delivery
from .journal_replay import JournalsFirst
from .ledger import Ledger
from .lifecycle import Abandoned, GiveUp, Lifecycle, StopSignal
from .spilling import Spiller

__all__ = ["CLOSING_WAIT_MARGIN_S", "ClosedRoute"]

log = logging.getLogger("iai_queue.queue")

CLOSING_WAIT_MARGIN_S = 5.0  # beyond stop()'s own deadline: its joins and final spills


class ClosedRoute:
    """Writes that arrive with the route closed. ``deadline()`` is the running stop's deadline."""

    def __init__(self, queue_lock: threading.Lock, admission: Admission, ledger: Ledger, ids: EntryIds,
                 delivery: Delivery, spiller: Spiller, directory: SpillDirectory, replayer: JournalsFirst,
                 deadline: Callable[[], float], replay_budget_s: float):
        self.queue_lock = queue_lock
        self.admission = admission
        self.ledger = ledger
        self.ids = ids
        self.delivery = delivery
        self.spiller = spiller
        self.directory = directory
        self.replayer = replayer
        self.deadline = deadline
        self.replay_budget_s = replay_budget_s
        self.lock = threading.RLock()  # closed-route writes, one at a time; start() waits for them
        self.left_on_disk = False  # entries this queue accepted wait in spill files
        self.successor: Optional[Callable[[list], None]] = None  # where later writes go (the store's toggle)

    def forward_to(self, enqueue: Callable[[list], None]) -> None:
        """Later writes go to ``enqueue``; returns once a closed-route write in progress is done (its
        spill file, if any, in place), so a queue started after this sees that file and goes behind it."""
        with self.lock:
            self.successor = enqueue

    def wait_for_drain(self) -> Lifecycle:
        """While ``stop()`` drains, wait for it (bounded); the state after."""
        adm = self.admission
        with self.queue_lock:
            if adm.state is Lifecycle.CLOSING:
                wait_s = min(max(0.0, self.deadline() - time.monotonic()), 3600.0) + CLOSING_WAIT_MARGIN_S
                self.ledger.done_advanced.wait_for(lambda: adm.state is not Lifecycle.CLOSING, wait_s)
            return adm.state

    def take(self, chunk: Chunk, state: Lifecycle, again: Callable[[Chunk], None]) -> None:
        """Write ``chunk`` behind everything before it (``state``: CLOSING past its bound, or STOPPED).
        ``again``: the whole route once more, when the queue was started meanwhile."""
        with self.lock:
            if self.admission.state is not state:
                again(chunk)
                return
            self._write_behind(chunk, state)

    def _write_behind(self, chunk: Chunk, state: Lifecycle) -> None:
        pairs, eids, _ = chunk_parts(chunk, self.ids)
        seq = chunk_seq(chunk)
        successor = self.successor
        if successor is not None and state is Lifecycle.STOPPED:
            successor(list(pairs))
            with self.queue_lock:
                self.ledger.mark_done((seq,))
            return
        with self.queue_lock:
            self.ledger.accepted_elsewhere += len(pairs)
        if state is Lifecycle.STOPPED and self._nothing_earlier_on_disk():
            error = self.delivery.try_write(ProvenanceBatch(pairs, eids))  # unencodable entries set aside there
            if error is None:
                with self.queue_lock:
                    self.ledger.mark_done((seq,))
                return
        self.left_on_disk = True
        self.spiller.spill_or_drop([HeldChunk(seq, tuple(pairs), 0, eids, True)])
        self.directory.release()

    def _nothing_earlier_on_disk(self) -> bool:
        """True when no spill file or journal segment of this store waits; replays what does here first
        (bounded)."""
        if not self.replayer.waiting():
            self.left_on_disk = False
            return True
        stop = StopSignal()
        stop.deadline = time.monotonic() + self.replay_budget_s
        try:
            # Bounded by time too, not only when the store fails: a large journal left by a disabled
            # write-ahead queue is replayed a segment at a time, and past the budget the entry spills behind.
            while time.monotonic() < stop.deadline and self.replayer.replay_some(stop, own_under_lock=True):
                pass
            self.left_on_disk = self.replayer.waiting()
        except (GiveUp, Abandoned):
            return False
        except OSError as exc:  # the directory, never the caller's problem: spilled behind, replayed later
            with self.queue_lock:
                self.ledger.count(spill_errors=1)
            emit(log, logging.WARNING, "replay.failed", error=str(exc), where="closed route")
            return False
        return not self.left_on_disk
