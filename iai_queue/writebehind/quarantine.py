"""Quarantine policy: what the queue sets aside, and how it is counted.

Lines that cannot be parsed, pairs the store rejects (poison) and entries
JSON cannot hold go to the spill directory's quarantine (raw lines plus a
``.reason`` file, see :mod:`iai_queue.spill.directory`) — never deleted, never
blocking the rest. If even that fails, the lines are counted as dropped and
logged at ERROR.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

from ..events import emit
from ..pairs import ProvenanceBatch
from ..spill import BadLine, SpillDirectory, encode_line
from ..spill.codec import unencodable_line
from .ledger import Ledger

__all__ = ["Quarantine"]

log = logging.getLogger("iai_queue.queue")


class Quarantine:
    def __init__(self, lock: threading.Lock, ledger: Ledger, directory: SpillDirectory):
        self.lock = lock
        self.ledger = ledger
        self.directory = directory

    def pairs(self, batch: ProvenanceBatch, reason: str, kind: str = "poison") -> None:
        """Set pairs aside (with their entry ids) under ``<writer>-<kind>``."""
        bad = []
        for (rid, entry), eid in zip(batch, batch.entry_ids):
            try:
                raw = encode_line(rid, entry, eid, True)
            except (TypeError, ValueError):
                raw = unencodable_line(rid, entry, eid)
            bad.append(BadLine(0, raw, reason))
        self.lines(f"{self.directory.writer}-{kind}", bad)

    def lines(self, stem: str, bad: list[BadLine], whole: Optional[Path] = None) -> None:
        """Set ``bad`` aside; ``whole``: a file none of whose lines was good, moved as it is."""
        count = len(bad) if whole is None or bad[0].lineno else 1
        try:
            target = self.directory.quarantine(stem, bad, whole=whole)
        except OSError as exc:
            with self.lock:
                self.ledger.count(dropped=count)
            emit(log, logging.ERROR, "drop", count=count, reason=f"cannot quarantine: {exc}")
            return
        with self.lock:
            self.ledger.count(quarantined_files=1, quarantined_lines=count)
        emit(log, logging.WARNING, "quarantine", file=target.name, lines=count, reason=bad[0].reason[:300])
