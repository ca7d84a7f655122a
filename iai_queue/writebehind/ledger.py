"""Sequence numbers, the done-watermark ``flush()`` waits on, and the counters ``stats()`` reports.

Every enqueue call (and every flush) draws one number from one counter. A call
is *done* once all its pairs are written, quarantined or dropped — wherever
they went (memory, a spill file, the caller's thread). ``written_seq`` is the
highest number below which every call is done; calls finishing out of order
wait in a heap above it.

Guarantee (flush): ``flush()`` returns True once every call numbered before it
is done; a spill file's calls are registered before the file becomes visible,
so a replay can never finish calls the ledger has not heard of.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from array import array
from typing import Iterable, Iterator

from ..spill.names import stem_of

__all__ = ["COUNTERS", "Ledger", "expand_runs", "seq_runs"]

COUNTERS = ("written", "spilled_files", "spilled_pairs", "replayed", "quarantined_files", "quarantined_lines",
            "retries", "store_errors", "spill_errors", "dropped", "last_batch_size", "skipped_unknown",
            "thread_restarts")


def seq_runs(seqs: Iterable[int]) -> array:
    """Seqs (ascending) as flat (first, last) runs: a spill file's calls are mostly consecutive."""
    out = array("q")
    for s in seqs:
        if out and s == out[-1] + 1:
            out[-1] = s
        else:
            out.extend((s, s))
    return out


def expand_runs(runs) -> Iterator[int]:
    return (s for i in range(0, len(runs), 2) for s in range(runs[i], runs[i + 1] + 1))


class Ledger:
    """Numbers, done-marks and counters. Every method but :meth:`next_seq` wants ``lock`` held."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock
        self.seq = itertools.count(1)  # one number per enqueue call and per flush; next() is atomic
        self.next_seq = self.seq.__next__
        self.done_advanced = threading.Condition(lock)  # flush() and stop() wait on it
        self.written_seq = 0  # every seq up to this one is done: written, quarantined or dropped
        self._done_above: list[int] = []  # a heap of done seqs above written_seq
        self.n = dict.fromkeys(COUNTERS, 0)
        self.taken = 0  # pairs that left memory for the store (to the worker, or to stop())
        self.accepted_elsewhere = 0  # pairs accepted that never went through memory for the store
        self.last_write_s = 0.0
        self.rows_since_maintain = 0
        self.own_file_seqs: dict[str, array] = {}  # our spill file's stem -> its enqueue calls, as runs
        self.flush_waiters = 0  # the worker does not linger while someone flushes

    def mark_done(self, seqs: Iterable[int]) -> None:
        w = self.written_seq
        heap = self._done_above
        for s in seqs:
            if s == w + 1:
                w = s
            elif s > w:
                heapq.heappush(heap, s)
        while heap and heap[0] <= w + 1:
            w = max(w, heapq.heappop(heap))
        if w != self.written_seq:
            self.written_seq = w
            self.done_advanced.notify_all()

    def boundary(self) -> int:
        """A number drawn now and done at once: the calls numbered before it are every call so far."""
        now = self.next_seq()
        self.mark_done((now,))
        return now

    def all_done(self) -> bool:
        """Is every call numbered so far done?"""
        now = self.boundary()  # before written_seq is read: marking it done may advance that
        return self.written_seq >= now

    def count(self, **deltas: int) -> None:
        n = self.n
        for name, k in deltas.items():
            n[name] += k

    def wrote(self, pairs: int, seconds: float) -> None:
        n = self.n
        n["written"] += pairs
        n["last_batch_size"] = pairs
        self.last_write_s = seconds
        self.rows_since_maintain += pairs

    def file_written(self, name: str, seqs: array) -> None:
        """A spill file about to appear completes these calls once replayed."""
        self.own_file_seqs[stem_of(name)] = seqs

    def file_never_written(self, name: str) -> None:
        self.own_file_seqs.pop(stem_of(name), None)

    def file_replayed(self, name: str) -> None:
        """``name`` (pending or claimed) is done with: written, or set aside."""
        self.mark_done(expand_runs(self.own_file_seqs.pop(stem_of(name), ())))
