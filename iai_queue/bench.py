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
    """Insert ``n`` records with random unit ``store.dim``-d embeddings; returns their ids."""
    import numpy as np

    from .store import MemoryRecord

    rng = np.random.default_rng(seed)
    ids = random_ids(n, seed)
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        emb = rng.standard_normal((m, store.dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        rows = emb.tolist()
        store.insert_many([MemoryRecord(id=ids[start + i], text=f"record {start + i}", embedding=rows[i])
                           for i in range(m)])
        if progress:
            print(f"\rseeding {start + m}/{n} records ({time.perf_counter() - t0:.1f}s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return ids


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
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--records", type=int, default=10_000, metavar="N", help="records to seed (default 10000)")
    parser.add_argument("--recalls", type=int, default=600, metavar="N",
                        help="recalls per mode (default 600)")
    parser.add_argument("--rounds", type=int, default=5, metavar="N",
                        help="interleaved rounds the recalls are split into (default 5)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    parser.add_argument("--dir", metavar="PATH", help="work directory (default: a new temp dir, removed after)")
    parser.add_argument("--store", metavar="URI",
                        help="run against this store location (e.g. s3://bucket/prefix): the records are "
                             "seeded under a new sub-prefix, dropped after; spill files stay in the work dir")
    from .cli import add_storage_option_argument

    add_storage_option_argument(parser)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("records", "recalls", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"iai-queue bench: --{name} must be >= 1")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    store_uri = getattr(args, "store", None)
    if store_uri is not None:
        from .location import StoreLocation

        try:
            StoreLocation.parse(store_uri)  # before any long work: a bad URI is a usage error
        except (TypeError, ValueError) as exc:
            print(f"iai-queue bench: error: --store: {exc}", file=sys.stderr)
            return 2
    from .cli import storage_options_of

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="iai-queue-bench-"))
    try:
        result = recall_benchmark(work, records=args.records, recalls=args.recalls, rounds=args.rounds,
                                  seed=args.seed, store_uri=store_uri, storage_options=storage_options_of(args))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print_recall_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["drain"]["ok"] else 1


def recall_benchmark(work: Path, *, records: int = 10_000, recalls: int = 600, rounds: int = 5, seed: int = 0,
                     k: int = 10, progress: bool = True, store_uri: str | None = None,
                     storage_options: dict | None = None) -> dict:
    """The three modes on a fresh store in ``work`` (or under a new sub-prefix of ``store_uri``, dropped after)."""
    from .store import MemoryStore

    if store_uri is None:
        return _recall_benchmark(MemoryStore(work / "db", dim=DIM, maintenance="never"), work, records=records,
                                 recalls=recalls, rounds=rounds, seed=seed, k=k, progress=progress)
    import secrets

    location = f"{store_uri.rstrip('/')}/iai-queue-bench-{secrets.token_hex(4)}"
    store = MemoryStore(location, dim=DIM, storage_options=storage_options, maintenance="never")
    try:
        result = _recall_benchmark(store, work, records=records, recalls=recalls, rounds=rounds, seed=seed, k=k,
                                   progress=progress)
        result["store"] = store.location
        return result
    finally:
        for name in ("records", "provenance"):
            try:
                store._db.drop_table(name)
            except Exception:  # best effort: a benchmark leaves at most its own sub-prefix behind
                pass


def _recall_benchmark(store, work: Path, *, records: int, recalls: int, rounds: int, seed: int, k: int,
                      progress: bool) -> dict:
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
            finally:
                if mode == "noop":
                    del store.append_provenance_batch
                if q is not None:
                    q.flush(timeout=60)
                    store.disable_provenance_queue(timeout=60)
                    st = q.stats()
                    accepted += st.accepted
                    written += st.written + st.replayed
        if progress:
            print(f"\rrecalls: round {r + 1}/{rounds} ({time.perf_counter() - t_run:.1f}s)",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
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
    return {
        "benchmark": "recall",
        "config": {"records": records, "recalls_per_mode": recalls, "rounds": rounds, "k": k, "dim": DIM,
                   "seed": seed, "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "seed_s": round(seed_s, 2),
        "run_s": round(time.perf_counter() - t_run, 2),
        "modes": modes,
        "ratios": ratios,
        "drain": drain,
        "targets": {"queued_recall_p50_le_1.05x_noop": bool(ratios["queued"]["recall_p50_vs_noop"] is not None
                                                            and ratios["queued"]["recall_p50_vs_noop"] <= 1.05)},
    }


def print_recall_table(result: dict, file=None) -> None:
    out = file or sys.stdout
    cfg = result["config"]
    print(f"recall benchmark: {cfg['records']} records x {cfg['dim']}-d, {cfg['recalls_per_mode']} recalls "
          f"per mode (k={cfg['k']}), {cfg['rounds']} interleaved rounds", file=out)
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
