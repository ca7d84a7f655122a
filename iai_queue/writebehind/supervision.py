"""Supervision: no thread of the queue dies silently.

A crash of the worker or the spill thread (an exception out of its loop) is
logged at ERROR (``thread.crashed``, with the traceback), counted
(``stats().thread_restarts``), and the loop runs again after a backoff delay —
until the run is abandoned by ``stop()``. The worker resumes the batch it held;
the spill thread has put its chunks back, in order.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .ledger import Ledger
from .lifecycle import Backoff, StopSignal

__all__ = ["supervised"]

log = logging.getLogger("iai_queue.queue")


def supervised(name: str, run: Callable[[StopSignal], None], stop: StopSignal, *, lock: threading.Lock,
               ledger: Ledger, backoff: Backoff) -> None:
    attempt = 0
    while not stop.abandoned:
        try:
            run(stop)
            return
        except BaseException as exc:
            with lock:
                ledger.count(thread_restarts=1)
            try:
                log.error("thread.crashed role=%s error=%r", name, exc, exc_info=True,
                          extra={"event": "thread.crashed", "role": name, "error": repr(exc)[:300]})
            except Exception:  # a broken log handler must not stop the restart
                pass
            stop.requested.wait(backoff.delay(attempt))  # no busy loop on a crash that repeats
            attempt += 1
