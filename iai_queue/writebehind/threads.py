"""The queue's threads of one run: the worker, the spill thread and, in write-ahead mode, the journal thread.

Guarantee: each runs its loop under :func:`.supervision.supervised` (no thread
dies silently: a crash is logged, counted and the loop restarted), as a daemon
named ``iai_queue-<role>``, so none can hold the host's exit; ``stop()`` joins
them with bounded waits.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .ledger import Ledger
from .lifecycle import Backoff, StopSignal
from .supervision import supervised

__all__ = ["RunThreads"]

Loop = Callable[[StopSignal], None]


class RunThreads:
    """Starts one run's threads; ``worker``, ``spill`` and ``journal`` are the last run's (None before)."""

    def __init__(self, lock: threading.Lock, ledger: Ledger, backoff: Backoff):
        self._lock, self._ledger, self._backoff = lock, ledger, backoff
        self.worker: Optional[threading.Thread] = None
        self.spill: Optional[threading.Thread] = None
        self.journal: Optional[threading.Thread] = None

    def start(self, stop: StopSignal, worker: Loop, spill: Loop) -> None:
        """Start the worker and spill threads of a run that ``stop`` ends."""
        self.worker = self._thread("worker", worker, stop)
        self.spill = self._thread("spill", spill, stop)
        self.worker.start()
        self.spill.start()

    def start_journal(self, stop: StopSignal, journal: Loop) -> None:
        """Start the journal thread (write-ahead mode) of a run that ``stop`` ends."""
        self.journal = self._thread("journal", journal, stop)
        self.journal.start()

    def _thread(self, role: str, run: Loop, stop: StopSignal) -> threading.Thread:
        return threading.Thread(target=self._supervised, args=(role, run, stop), name=f"iai_queue-{role}",
                                daemon=True)

    def _supervised(self, role: str, run: Loop, stop: StopSignal) -> None:
        supervised(role, run, stop, lock=self._lock, ledger=self._ledger, backoff=self._backoff)
