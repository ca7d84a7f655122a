"""The journal's part of ``iai-queue spill replay`` and ``iai-queue spill status``.

Guarantee: ``spill replay`` replays the journal segments of dead writers of
the given store (their writer lock is free) exactly once, in order per record,
through :class:`~iai_queue.writebehind.journal_replay.JournalReplayer` — the
same code a queue runs at start; a live writer's segments are never read (it
replays them itself). ``spill status`` counts the segments beside the spill
files, so one directory listing shows everything not yet in a store.

The CLI module calls :func:`replay_dead_journals` and :func:`journal_summary`;
nothing here parses arguments or prints except through the ``say`` callable
the CLI passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

__all__ = ["JournalReplayOutcome", "journal_counts", "journal_summary", "replay_dead_journals"]


@dataclass(frozen=True)
class JournalReplayOutcome:
    replayed: int  # pairs written to the store
    segments: int  # segments replayed (and deleted)
    damaged_spans: int  # set aside as <stem>.failed-<ts>.wal with a .reason
    left: int  # dead writers' segments still on disk (the store kept failing, or another replayer holds the lock)
    store_errors: int


def replay_dead_journals(store, spill_dir: Path, timeout_s: float,
                         say: Callable[[str], None]) -> JournalReplayOutcome:
    """Replay every dead writer's journal of ``store`` in ``spill_dir``; give up after ``timeout_s`` without progress."""
    from ..writebehind.journal_replay import JournalReplayer
    from ..writebehind.lifecycle import GiveUp, StopSignal

    replayer = JournalReplayer.for_store(store, spill_dir)
    counts = replayer.ledger.n
    segments = 0
    last_progress = time.monotonic()
    while replayer.orphans():
        stop = StopSignal()
        stop.deadline = last_progress + timeout_s  # a failing store: give up after this long without progress
        try:
            done = replayer.replay_all(stop)
        except GiveUp:
            break
        if done:
            segments += done
            last_progress = time.monotonic()
            say(f"  {counts['replayed']} journaled entries replayed, {segments} segment(s) done")
        elif time.monotonic() - last_progress > timeout_s:
            break
        else:
            time.sleep(0.2)  # another process holds the replay lock
    return JournalReplayOutcome(counts["replayed"], segments, counts["quarantined_lines"], len(replayer.orphans()),
                                counts["store_errors"])


def journal_counts(status) -> dict:
    """Journal fields for ``spill status --json``: segments, whole-record entries, bytes, and how many are
    of live writers (``status``: a :class:`~iai_queue.spill.SpillStatus`)."""
    segs = [f for f in status.files if f.state == "journal"]
    return {"journal_segments": len(segs), "journal_entries": sum(f.entries for f in segs),
            "journal_bytes": sum(f.bytes for f in segs),
            "journal_segments_live": sum(1 for f in segs if f.writer_alive)}


def journal_summary(status, size: Callable[[int], str]) -> Optional[str]:
    """The ``journal`` line of ``spill status`` (None when there are no segments)."""
    c = journal_counts(status)
    if not c["journal_segments"]:
        return None
    dead = c["journal_segments"] - c["journal_segments_live"]
    return (f"journal          {c['journal_segments']} segment(s) ({c['journal_segments_live']} of live writers, "
            f"{dead} of writers gone: replayed at the next start or by spill replay), "
            f"{c['journal_entries']} entries, {size(c['journal_bytes'])}")
