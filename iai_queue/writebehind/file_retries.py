"""Files that failed to replay wait their turn again, and nothing behind them overtakes them.

Guarantee 4 (order per record) across files: spill files and journal segments
are replayed oldest first, and a file that cannot be claimed, read or removed
right now (a read-only or failing disk) is retried after a delay — while it
waits, no younger file is replayed, since a younger file may hold later entries
of the same records. :meth:`FileRetries.ready` is the one place that cut is made.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence, TypeVar

__all__ = ["FileRetries"]

T = TypeVar("T")


class FileRetries:
    """When each failed file may be tried again, and how often it has failed in a row."""

    def __init__(self, retry_after_s: float):
        self.retry_after_s = retry_after_s
        self._not_before: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def failed(self, name: str) -> int:
        """``name`` failed now: it waits ``retry_after_s``. Returns its failures in a row."""
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
