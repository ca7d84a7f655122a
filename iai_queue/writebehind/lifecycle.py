"""The queue's lifecycle, and how one run of its threads is told to stop.

Guarantee 7 (lifecycle): ``stop()`` drains for a bounded time, then spills what
is left (the batch being written included, flagged for verification). An
enqueue after ``stop()`` is written synchronously, or spilled when the store
fails or earlier entries are still spilled — never lost. ``start()`` after
``stop()`` starts a new run: threads of an old run that are still stuck in the
store hold that run's :class:`StopSignal`, which stays abandoned.
"""

from __future__ import annotations

import random
import threading
import time
from enum import Enum

__all__ = ["Abandoned", "Backoff", "GiveUp", "Lifecycle", "StopSignal"]

NEVER = float("inf")


class Lifecycle(Enum):
    NEW = "new"  # constructed (or a forked child's copy): not started
    RUNNING = "running"
    CLOSING = "closing"  # stop() is draining
    STOPPED = "stopped"


class GiveUp(Exception):
    """The stop deadline passed while a batch was still unwritten."""


class Abandoned(Exception):
    """stop() gave up on the worker and took over its batch: do nothing more."""


class Backoff:
    """Exponential backoff with jitter: ``retry_initial_s`` doubling up to ``retry_max_s``, half of it random.

    The one formula for the worker's store retries and the spill thread's disk retries.
    """

    def __init__(self, initial_s: float, max_s: float):
        self.initial_s = initial_s
        self.max_s = max_s

    def delay(self, attempt: int) -> float:
        cap = min(self.max_s, self.initial_s * (2 ** min(attempt, 30)))
        return cap / 2 + random.uniform(0, cap / 2)


class StopSignal:
    """One run's stop: ``stop()`` sets a deadline for the store, then may abandon the run's worker.

    ``requested`` cuts the threads' waits short; ``deadline`` is when the worker
    gives up on the store (:class:`GiveUp`); ``abandoned`` means stop() has taken
    over what the worker held (:class:`Abandoned`); ``over``, that stop() has
    finished with the run's buffers (a thread still busy then must not hand
    anything back to them: they may be a later run's). All set under the queue's lock.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.deadline = NEVER
        self.abandoned = False
        self.over = False  # stop() has taken the run's spill buffer and marked the queue stopped

    def request(self, deadline: float) -> None:
        self.deadline = deadline
        self.requested.set()

    def raise_if_abandoned(self) -> None:
        """Raises Abandoned once stop() has given up on the run. A thread about to change what runs share
        calls it under the queue's lock, which ``abandoned`` is set under: then nothing changes after."""
        if self.abandoned:
            raise Abandoned

    def check(self) -> None:
        self.raise_if_abandoned()
        if time.monotonic() >= self.deadline:
            raise GiveUp

    def sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, never past the deadline; raises GiveUp/Abandoned as :meth:`check`."""
        if time.monotonic() + delay > self.deadline:
            time.sleep(max(0.0, self.deadline - time.monotonic()))
            raise GiveUp
        end = time.monotonic() + delay
        while True:
            left = min(end, self.deadline) - time.monotonic()
            if left <= 0:
                break
            if self.requested.wait(left):
                # stop() set a deadline: sleep out what is left of the shorter of the two.
                time.sleep(max(0.0, min(end, self.deadline) - time.monotonic()))
                break
        self.check()
