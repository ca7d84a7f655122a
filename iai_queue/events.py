"""Structured log events, with repeated warnings rate-limited.

Every record goes through ``logging.getLogger("iai_queue.<part>")`` with the
event name as the message and ``extra={"event": name, **fields}``, so a JSON
formatter sees stable keys. Event names: ``spill``, ``spill.failed``,
``spill.recover_tmp``, ``replay``, ``quarantine``, ``write.failed``, ``retry``,
``drop``, ``maintain.failed``, ``exit.spilled``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["emit", "RateLimiter"]


def emit(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        logger.log(level, "%s %s", event, detail, extra={"event": event, **fields})


class RateLimiter:
    """Lets one record per ``key`` through every ``interval`` seconds; counts the rest.

    The count suppressed since the last record is passed on as ``suppressed``.
    """

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[Any, tuple[float, int]] = {}

    def emit(self, logger: logging.Logger, level: int, event: str, key: Any = None, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get((event, key), (float("-inf"), 0))
            if now - last < self.interval:
                self._last[(event, key)] = (last, suppressed + 1)
                return
            self._last[(event, key)] = (now, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        emit(logger, level, event, **fields)
