"""Benchmark the provenance queue against synchronous and no-op writes, in one run.

``iai-queue bench`` seeds a temporary LanceDB store with ``--records`` random
384-d records, then runs ``memory_recall`` traffic (k=10) three ways, in
interleaved rounds so that drift on a shared machine hits every mode alike:

``queued``  provenance goes through the write-behind queue (``enable_provenance_queue``);
``sync``    the queue is disabled: ``append_provenance_batch`` runs on the caller's thread;
``noop``    ``append_provenance_batch`` is replaced on the instance by a function that does nothing.

For each mode it reports the latency of ``store.queue_provenance_batch`` (the
enqueue for ``queued``, the whole write for ``sync``; µs) and of the whole
recall (ms). After the run every queued entry is checked to be in the store.

The helpers here (percentiles, seeding, the table printer, a store gate) are
shared with the scripts in ``scripts/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence
from uuid import UUID

__all__ = ["add_arguments", "run", "percentiles", "seed_store", "random_ids", "print_table", "StoreGate"]

DIM = 384
MODES = ("queued", "sync", "noop")


# -- shared helpers ---------------------------------------------------------------------


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


# -- the main job -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import nonempty_path, positive_int

    parser.add_argument("--json", type=nonempty_path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--plot", type=nonempty_path, metavar="FILE.png",
                        help="also draw the latency CDFs of enqueue and recall per mode (needs the plot extra)")
    parser.add_argument("--records", type=positive_int, default=10_000, metavar="N",
                        help="records to seed (default 10000)")
    parser.add_argument("--recalls", type=positive_int, default=600, metavar="N",
                        help="recalls per mode (default 600)")
    parser.add_argument("--rounds", type=positive_int, default=5, metavar="N",
                        help="interleaved rounds the recalls are split into (default 5)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    parser.add_argument("--dir", type=nonempty_path, metavar="PATH",
                        help="work directory, kept and reused: a second run reuses its seeded store "
                             "(default: a new temp dir, removed after)")
    parser.add_argument("--store", metavar="URI",
                        help="run against this store location (e.g. s3://bucket/prefix): the records are "
                             "seeded under a new sub-prefix, dropped after; spill files stay in the work dir")
    from .cli import add_storage_option_argument

    add_storage_option_argument(parser)


class UsageError(Exception):
    """A bad argument found before the run: one line, exit 2."""


def _check_output_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a directory, not a file")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {str(path)!r}: directory {str(parent)!r} is not writable")


def check_args(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be known before seeding; raises UsageError."""
    if args.json is not None:
        _check_output_file(args.json, "--json")
    if args.plot is not None:
        _check_output_file(args.plot, "--plot")
        from .plot import check_plot_path

        try:
            check_plot_path(args.plot)
        except (ValueError, ImportError) as exc:
            raise UsageError(f"--plot: {exc}") from None
    if args.dir is not None:
        work: Path = args.dir
        if work.exists() and not work.is_dir():
            raise UsageError(f"--dir {str(work)!r} is a file, not a directory")
        if (work / "records.lance").exists():
            raise UsageError(f"--dir {str(work)!r} is a memory store; give a work directory "
                             f"(the benchmark's store goes in DIR/db)")
        found = _store_dim(work / "db")
        if found is not None and found != DIM:
            raise UsageError(f"--dir {str(work)!r} holds a store of {found}-d embeddings; the benchmark "
                             f"uses {DIM}-d: choose another directory")


def _store_dim(path: Path) -> int | None:
    if not (path / "records.lance").exists():
        return None
    import lancedb

    try:
        table = lancedb.connect(path).open_table("records")
    except (ValueError, FileNotFoundError):
        return None
    return getattr(table.schema.field("embedding").type, "list_size", None)


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except UsageError as exc:
        print(f"iai-queue bench: error: {exc}", file=sys.stderr, flush=True)
        return 2
    store_uri = getattr(args, "store", None)
    if store_uri is not None:
        from .location import StoreLocation

        try:
            StoreLocation.parse(store_uri)  # before any long work: a bad URI is a usage error
        except (TypeError, ValueError) as exc:
            print(f"iai-queue bench: error: --store: {exc}", file=sys.stderr)
            return 2
    from .cli import storage_options_of

    work = args.dir if args.dir else Path(tempfile.mkdtemp(prefix="iai-queue-bench-"))
    try:
        result = recall_benchmark(work, records=args.records, recalls=args.recalls, rounds=args.rounds,
                                  seed=args.seed, keep_samples=args.plot is not None, store_uri=store_uri,
                                  storage_options=storage_options_of(args))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    samples = result.pop("samples", None)
    print_recall_table(result)
    print(verdict(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None and samples is not None:
        from .plot import plot_latency_cdfs

        plot_latency_cdfs(samples, args.plot, title=f"{result['config']['records']} records, "
                                                    f"{result['config']['recalls_per_mode']} recalls per mode")
        print(f"plot: {args.plot}")
    return 0 if result["drain"]["ok"] else 1


def verdict(result: dict) -> str:
    """The closing line: each target met or missed, and whether every queued entry landed."""
    ratio = result["ratios"]["queued"]["recall_p50_vs_noop"]
    met = all(result["targets"].values())
    d = result["drain"]
    drained = (f"all {d['queued_entries']} queued entries in the store" if d["ok"]
               else f"MISMATCH: {d['drained_entries']} of {d['queued_entries']} queued entries drained")
    return (f"verdict: {'PASS' if met and d['ok'] else 'FAIL'} - queued recall p50 is {ratio}x noop "
            f"(target <= 1.05x: {'met' if met else 'MISSED'}); {drained}")


def recall_benchmark(work: Path, *, records: int = 10_000, recalls: int = 600, rounds: int = 5, seed: int = 0,
                     k: int = 10, progress: bool = True, keep_samples: bool = False, store_uri: str | None = None,
                     storage_options: dict | None = None) -> dict:
    """The three modes on a fresh store in ``work`` (or under a new sub-prefix of ``store_uri``, dropped after);
    the figures as a dict (``keep_samples``: also the raw latencies, under "samples")."""
    from .store import MemoryStore

    if store_uri is None:
        return _recall_benchmark(MemoryStore(work / "db", dim=DIM, maintenance="never"), work, records=records,
                                 recalls=recalls, rounds=rounds, seed=seed, k=k, progress=progress,
                                 keep_samples=keep_samples)
    import secrets

    location = f"{store_uri.rstrip('/')}/iai-queue-bench-{secrets.token_hex(4)}"
    store = MemoryStore(location, dim=DIM, storage_options=storage_options, maintenance="never")
    try:
        result = _recall_benchmark(store, work, records=records, recalls=recalls, rounds=rounds, seed=seed, k=k,
                                   progress=progress, keep_samples=keep_samples)
        result["store"] = store.location
        return result
    finally:
        for name in ("records", "provenance"):
            try:
                store._db.drop_table(name)
            except Exception:  # best effort: a benchmark leaves at most its own sub-prefix behind
                pass


def _recall_benchmark(store, work: Path, *, records: int, recalls: int, rounds: int, seed: int, k: int,
                      progress: bool, keep_samples: bool) -> dict:
    from .core import dispatch

    spill_dir = work / "spill"
    t_seed = time.perf_counter()
    seed_store(store, records, seed=seed, progress=progress)
    seed_s = time.perf_counter() - t_seed
    rounds = max(1, min(rounds, recalls))
    cues = random_cues(recalls * len(MODES), DIM, seed)
    enqueue_ns: dict[str, list[int]] = {m: [] for m in MODES}
    recall_ns: dict[str, list[int]] = {m: [] for m in MODES}
    pairs_by_mode = dict.fromkeys(MODES, 0)
    accepted = written = 0
    rows_before = store.provenance_rows()

    real_queue = store.queue_provenance_batch  # the bound method, looked up before the wrapper goes in
    current: list = [None]
    clock = time.perf_counter_ns

    def timed_queue(pairs):
        t0 = clock()
        real_queue(pairs)
        t1 = clock()
        enqueue_ns[current[0]].append(t1 - t0)
        pairs_by_mode[current[0]] += len(pairs)

    store.queue_provenance_batch = timed_queue
    current[0] = "sync"
    # Warm up every path once (LanceDB caches, imports), untimed.
    for _ in range(3):
        dispatch(store, "memory_recall", {"cue": "warm", "session_id": "bench", "cue_embedding": cues[0], "k": k})
    rows_before = store.provenance_rows()
    for m in MODES:
        enqueue_ns[m].clear()
        pairs_by_mode[m] = 0

    t_run = time.perf_counter()
    ci = 0
    per_round = [recalls // rounds + (1 if r < recalls % rounds else 0) for r in range(rounds)]
    bar = progress_bar(recalls * len(MODES), "recalls", "recalls", enabled=progress).__enter__()
    for r, count in enumerate(per_round):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]  # rotate who goes first
        for mode in order:
            current[0] = mode
            q = None
            if mode == "queued":
                q = store.enable_provenance_queue(spill_dir=spill_dir)
            elif mode == "noop":
                store.append_provenance_batch = lambda pairs, records_cache=None: None
            try:
                for _ in range(count):
                    args = {"cue": f"cue {ci}", "session_id": "bench", "cue_embedding": cues[ci], "k": k}
                    ci += 1
                    t0 = clock()
                    dispatch(store, "memory_recall", args)
                    recall_ns[mode].append(clock() - t0)
                bar.update(count)
            finally:
                if mode == "noop":
                    del store.append_provenance_batch
                if q is not None:
                    q.flush(timeout=60)
                    store.disable_provenance_queue(timeout=60)
                    st = q.stats()
                    accepted += st.accepted
                    written += st.written + st.replayed
    bar.__exit__(None, None, None)
    del store.queue_provenance_batch

    landed = store.provenance_rows() - rows_before
    expected = pairs_by_mode["queued"] + pairs_by_mode["sync"]
    leftover_spill = sorted(p.name for p in spill_dir.glob("*.jsonl")) if spill_dir.exists() else []
    drain = {
        "queued_entries": pairs_by_mode["queued"],
        "accepted": accepted,
        "drained_entries": written,
        "sync_entries": pairs_by_mode["sync"],
        "noop_entries": pairs_by_mode["noop"],
        "rows_landed": landed,
        "rows_expected": expected,
        "spill_files_left": len(leftover_spill),
    }
    drain["ok"] = (written == accepted == pairs_by_mode["queued"] and landed == expected and not leftover_spill)

    modes = {}
    for m in MODES:
        modes[m] = {"enqueue_us": percentiles(enqueue_ns[m]),
                    "recall_ms": percentiles(recall_ns[m], scale=1e-6, qs=(50, 99))}
    noop_p50 = modes["noop"]["recall_ms"]["p50"]
    noop_enq = modes["noop"]["enqueue_us"]["p50"]
    ratios = {m: {"recall_p50_vs_noop": round(modes[m]["recall_ms"]["p50"] / noop_p50, 3) if noop_p50 else None,
                  "enqueue_p50_vs_noop": round(modes[m]["enqueue_us"]["p50"] / noop_enq, 3) if noop_enq else None}
              for m in MODES}
    out = {
        "benchmark": "recall",
        "config": {"records": records, "records_in_store": store.count(), "recalls_per_mode": recalls, "rounds": rounds, "k": k, "dim": DIM,
                   "seed": seed, "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "seed_s": round(seed_s, 2),
        "run_s": round(time.perf_counter() - t_run, 2),
        "modes": modes,
        "ratios": ratios,
        "drain": drain,
        "targets": {"queued_recall_p50_le_1.05x_noop": bool(ratios["queued"]["recall_p50_vs_noop"] is not None
                                                            and ratios["queued"]["recall_p50_vs_noop"] <= 1.05)},
    }
    if keep_samples:
        out["samples"] = {m: {"enqueue_us": [x / 1e3 for x in enqueue_ns[m]],
                              "recall_ms": [x / 1e6 for x in recall_ns[m]]} for m in MODES}
    return out


def print_recall_table(result: dict, file=None) -> None:
    out = file or sys.stdout
    cfg = result["config"]
    extra = cfg.get("records_in_store", cfg["records"]) - cfg["records"]
    print(f"recall benchmark: {cfg['records']} records x {cfg['dim']}-d, {cfg['recalls_per_mode']} recalls "
          f"per mode (k={cfg['k']}), {cfg['rounds']} interleaved rounds"
          + (f" (the store in --dir holds {extra} more records from earlier runs)" if extra > 0 else ""), file=out)
    rows = []
    for m in MODES:
        e, r = result["modes"][m]["enqueue_us"], result["modes"][m]["recall_ms"]
        rows.append([m, e.get("p50"), e.get("p99"), e.get("p99.9"), e.get("max"), r.get("p50"), r.get("p99"),
                     result["ratios"][m]["recall_p50_vs_noop"]])
    print_table(["mode", "enqueue p50 µs", "p99 µs", "p99.9 µs", "max µs", "recall p50 ms", "p99 ms",
                 "recall p50 / noop"], rows, file=out)
    d = result["drain"]
    print(f"drained: {d['drained_entries']} of {d['queued_entries']} queued entries written by the queue; "
          f"store rows added {d['rows_landed']} (expected {d['rows_expected']} = queued + sync); "
          f"spill files left {d['spill_files_left']} -> {'OK' if d['ok'] else 'MISMATCH'}", file=out)
