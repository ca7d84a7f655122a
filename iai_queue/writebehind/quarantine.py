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
from typing import Optional, Sequence

from ..events import RateLimiter, emit
from ..pairs import ProvenanceBatch
from ..spill import BadLine, SpillDirectory, encode_line
from ..spill.codec import unencodable_line
from .ledger import Ledger

__all__ = ["Quarantine"]

log = logging.getLogger("iai_queue.queue")


class Quarantine:
    def __init__(self, lock: threading.Lock, ledger: Ledger, directory: SpillDirectory, warn: RateLimiter):
        self.lock = lock
        self.warn = warn
        self.ledger = ledger
        self.directory = directory

    def pairs(self, batch: ProvenanceBatch, reasons: Sequence[str] | str, kind: str) -> None:
        """Set pairs aside (with their entry ids), one reason for all or one per pair.

        The file is named like a spill file of this queue's store and writer
        (plus ``-<kind>``), so a repaired file requeues into that store only.
        """
        if isinstance(reasons, str):
            reasons = [reasons] * len(batch)
        bad = []
        for (rid, entry), eid, reason in zip(batch, batch.entry_ids, reasons):
            try:
                raw = encode_line(rid, entry, eid, True)
            except (TypeError, ValueError):
                raw = unencodable_line(rid, entry, eid)
            bad.append(BadLine(0, raw, reason))
        self.lines(self.directory.quarantine_stem(kind), bad)

    def lines(self, stem: str, bad: list[BadLine], whole: Optional[Path] = None, still_on_disk: bool = False) -> bool:
        """Set ``bad`` aside; ``whole``: a file none of whose lines was good, moved as it is.

        False when the directory refused: the lines are then counted dropped,
        unless they are ``still_on_disk`` (in a claimed file the caller keeps).
        """
        count = sum(1 for b in bad if b.raw.strip())  # non-blank lines, as `spill status` counts them
        try:
            target = self.directory.quarantine(stem, bad, whole=whole)
        except OSError as exc:
            if whole is not None or still_on_disk:
                self.warn.emit(log, logging.ERROR, "quarantine.failed", key=stem, stem=stem, error=str(exc))
                return False
            with self.lock:
                self.ledger.count(dropped=count)
            self.warn.emit(log, logging.ERROR, "drop", key="quarantine", count=count,
                           reason=f"cannot quarantine: {exc}")
            return False
        with self.lock:
            self.ledger.count(quarantined_files=1, quarantined_lines=count)
        emit(log, logging.WARNING, "quarantine", file=target.name, lines=count, reason=bad[0].reason[:300])
        return True
