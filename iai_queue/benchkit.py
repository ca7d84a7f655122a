"""Helpers the benchmarks share: percentiles, a seeded store, the table printer, a store gate.

Used by ``iai-queue bench`` (:mod:`iai_queue.bench`, which re-exports them, so
``from iai_queue.bench import percentiles`` keeps working) and by the scripts in
``scripts/``. Guarantee: the same seed gives the same records, ids and cues in
every run, so two runs (two commits) measure the same work.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence
from uuid import UUID

__all__ = ["percentiles", "random_ids", "seed_store", "progress_bar", "random_cues", "print_table",
           "report_targets", "rss_bytes", "StoreGate"]


def percentiles(samples_ns: Sequence[int], scale: float = 1e-3, qs=(50, 99, 99.9)) -> dict[str, float]:
    """``{"n", "p50", "p99", "p99.9", "max"}`` of nanosecond samples, in ``scale`` units (default µs)."""
    s = sorted(samples_ns)
    n = len(s)
    out: dict[str, float] = {"n": n}
    if not n:
        return out
    for q in qs:
        idx = min(n - 1, max(0, int(round(q / 100.0 * n + 0.5)) - 1))  # nearest-rank
        out[f"p{q:g}"] = round(s[idx] * scale, 3)
    out["max"] = round(s[-1] * scale, 3)
    return out


def random_ids(n: int, seed: int = 0) -> list[UUID]:
    rnd = random.Random(seed)
    return [UUID(int=rnd.getrandbits(128), version=4) for _ in range(n)]


def seed_store(store, n: int, seed: int = 0, progress: bool = True, chunk: int = 2000) -> list[UUID]:
    """Make the store hold ``n`` records with random unit ``store.dim``-d embeddings; returns their ids.

    The ids and embeddings follow from ``seed``: records already in the store
    (a second run on one ``--dir``) are kept, only the missing ones are inserted.
    """
    import numpy as np

    from .store import MemoryRecord

    rng = np.random.default_rng(seed)
    ids = random_ids(n, seed)
    present = store.existing_ids(ids) if store.count() else set()
    with progress_bar(n, "seeding", "records", enabled=progress) as bar:
        bar.update(len(present))
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            emb = rng.standard_normal((m, store.dim), dtype=np.float32)  # drawn for every chunk: same vectors
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            todo = [i for i in range(m) if ids[start + i] not in present]
            if todo:
                rows = emb.tolist()
                store.insert_many([MemoryRecord(id=ids[start + i], text=f"record {start + i}", embedding=rows[i])
                                   for i in todo])
                bar.update(len(todo))
    return ids


class progress_bar:
    """A tqdm bar on stderr when it is a terminal; otherwise one plain line when the phase ends.

    A log file or a CI console gets no carriage-return redraws: ``seeding: 10000 records in 12.3s``.
    """

    def __init__(self, total: int, desc: str, unit: str, *, enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.count = 0
        self._bar = None

    def __enter__(self) -> "progress_bar":
        self._t0 = time.perf_counter()
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=f" {self.unit}", file=sys.stderr, leave=True,
                             dynamic_ncols=True)
        return self

    def update(self, n: int) -> None:
        self.count += n
        if self._bar is not None and n:
            self._bar.update(n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and exc[0] is None:
            print(f"{self.desc}: {self.count} {self.unit} in {time.perf_counter() - self._t0:.1f}s",
                  file=sys.stderr, flush=True)


def random_cues(n: int, dim: int, seed: int) -> list[list[float]]:
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal((n, dim), dtype=np.float32).tolist()


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], file=None) -> None:
    rows = [["" if c is None else (f"{c:,.3f}".rstrip("0").rstrip(".") if isinstance(c, float) else str(c))
             for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = file or sys.stdout
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), file=out)


def report_targets(result: dict, json_path: str | None) -> None:
    """The closing ``targets:`` line every benchmark prints, and its ``--json`` file."""
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; falls back to ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StoreGate:
    """Installed on a store instance: ``append_provenance_batch`` blocks until ``open()``."""

    def __init__(self, store):
        self.store = store
        self.real = store.append_provenance_batch
        self.opened = threading.Event()
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        self.opened.wait()
        return self.real(pairs, records_cache=records_cache)

    def open(self) -> None:
        self.opened.set()

    def remove(self) -> None:
        self.open()
        self.store.__dict__.pop("append_provenance_batch", None)
