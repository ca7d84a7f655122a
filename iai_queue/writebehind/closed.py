"""The closed route: what happens to an enqueue once ``stop()`` has begun.

Guarantee 7 (lifecycle), the closed half: from the moment ``stop()`` begins, an
enqueue waits for the drain (at most the stop's deadline plus
``CLOSING_WAIT_MARGIN_S``) and then goes *behind* it: to the queue that replaced
this one (the store's toggle links them), or written on the caller's thread —
after replaying, on that thread, whatever this store still has waiting on disk —
or, when the store fails, spilled behind what is on disk. Never beside the drain,
never beside a ``start()``: closed-route writes hold ``lock``, and ``start()`` takes it too.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from ..pairs import EntryIds, ProvenanceBatch
from ..spill import SpillDirectory
from .admission import Admission
from .chunks import Chunk, HeldChunk, chunk_parts, chunk_seq
from .delivery import Delivery
from .ledger import Ledger
from .lifecycle import Abandoned, GiveUp, Lifecycle, StopSignal
from .replay import Replayer
from .spilling import Spiller

__all__ = ["CLOSING_WAIT_MARGIN_S", "ClosedRoute"]

CLOSING_WAIT_MARGIN_S = 5.0  # beyond stop()'s own deadline: its joins and final spills


class ClosedRoute:
    """Writes that arrive with the route closed. ``deadline()`` is the running stop's deadline."""

    def __init__(self, queue_lock: threading.Lock, admission: Admission, ledger: Ledger, ids: EntryIds,
                 delivery: Delivery, spiller: Spiller, directory: SpillDirectory, replayer: Replayer,
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
        self.successor: Optional[Callable[[list], None]] = None  # the queue that replaced this one

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
        if state is Lifecycle.STOPPED:
            if self.left_on_disk:  # what waits on disk goes first: replayed here, on the caller's thread
                self.left_on_disk = not self._replay_here()
            if not self.left_on_disk:
                error = self.delivery.try_write(ProvenanceBatch(pairs, eids))  # unencodable entries set aside there
                if error is None:
                    with self.queue_lock:
                        self.ledger.mark_done((seq,))
                    return
        self.left_on_disk = True
        self.spiller.spill_or_drop([HeldChunk(seq, tuple(pairs), 0, eids, True)])
        self.directory.release()

    def _replay_here(self) -> bool:
        """Replay this store's waiting spill files on the calling thread (bounded). True when none is left."""
        stop = StopSignal()
        stop.deadline = time.monotonic() + self.replay_budget_s
        try:
            while self.replayer.replay_some(stop):
                pass
        except (GiveUp, Abandoned):
            return False
        return not self.directory.replayable()
