"""Files that failed to replay wait their turn again, and nothing behind them overtakes them.

Guarantee 4 (order per record) across files: spill files and journal segments
are replayed oldest first, and a file that cannot be claimed, read or removed
right now (a read-only or failing disk) is retried after a delay — while it
waits, no younger file is replayed, since a younger file may hold later entries
of the same records. :meth:`FileRetries.ready` is the one place that cut is made.
A file unreadable ``UNREADABLE_SET_ASIDE_AFTER`` times in a row is set aside
whole (:meth:`FileRetries.set_aside`), so that it cannot hold up the rest forever.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from ..events import RateLimiter
from .ledger import Ledger

__all__ = ["FileRetries", "UNREADABLE_SET_ASIDE_AFTER"]

log = logging.getLogger("iai_queue.queue")

T = TypeVar("T")

# A file that cannot be read this many times in a row (an I/O error, a permission) is set aside.
UNREADABLE_SET_ASIDE_AFTER = 5

PutAside = Callable[[str, Path, str], Path]  # (stem, path, reason) -> where the file now is


class FileRetries:
    """When each failed file may be tried again, and how often it has failed in a row; failures are
    logged (``<events>.failed``, rate-limited) and counted in ``spill_errors``."""

    def __init__(self, retry_after_s: float, lock: threading.Lock, ledger: Ledger, warn: RateLimiter,
                 failed_event: str, set_aside_event: str):
        self.retry_after_s = retry_after_s
        self.lock, self.ledger, self.warn = lock, ledger, warn
        self.failed_event, self.set_aside_event = failed_event, set_aside_event
        self._not_before: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def failed(self, name: str, exc: OSError) -> int:
        """A filesystem error on ``name``: it waits ``retry_after_s``. Returns its failures in a row."""
        with self.lock:
            self.ledger.count(spill_errors=1)
        self.warn.emit(log, logging.WARNING, self.failed_event, key=name, file=name, error=str(exc))
        self._not_before[name] = time.monotonic() + self.retry_after_s
        self._failures[name] = self._failures.get(name, 0) + 1
        return self._failures[name]

    def done(self, name: str) -> None:
        self._not_before.pop(name, None)
        self._failures.pop(name, None)

    def ready(self, files: Sequence[T], name_of: Callable[[T], str] = str) -> list[T]:
        """The oldest ``files`` (given oldest first) up to the first one still waiting for its retry."""
        if not self._not_before:
            return list(files)
        now = time.monotonic()
        out = []
        for f in files:
            if self._not_before.get(name_of(f), 0.0) > now:
                break
            out.append(f)
        return out

    def set_aside(self, path: Path, stem: str, exc: OSError, put_aside: PutAside) -> bool:
        """Move ``path`` (unreadable ``UNREADABLE_SET_ASIDE_AFTER`` times in a row) aside with ``put_aside``,
        logged at ERROR and counted in ``quarantined_files``. False when that failed too (counted)."""
        try:
            target = put_aside(stem, path, f"unreadable {UNREADABLE_SET_ASIDE_AFTER} times in a row, set aside: {exc}")
        except OSError as again:
            self.failed(path.name, again)
            return False
        self.done(path.name)
        with self.lock:
            self.ledger.count(quarantined_files=1)
        self.warn.emit(log, logging.ERROR, self.set_aside_event, key=path.name, file=target.name, error=str(exc))
        return True
