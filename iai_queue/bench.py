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

The helpers shared with the scripts in ``scripts/`` (percentiles, seeding, the
table printer, a store gate) live in :mod:`iai_queue.benchkit` and are
re-exported here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .benchkit import (StoreGate, percentiles, print_table, progress_bar, random_cues, random_ids, report_targets,
                       rss_bytes, seed_store)

__all__ = ["add_arguments", "run", "UsageError", "check_output_file", "percentiles", "seed_store", "random_ids",
           "print_table", "StoreGate", "report_targets", "rss_bytes"]

DIM = 384
MODES = ("queued", "sync", "noop")


# -- the main job -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli.args import nonempty_path, positive_int

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
    from .cli.args import add_storage_option_argument

    add_storage_option_argument(parser)


class UsageError(Exception):
    """A bad argument found before the run: one line, exit 2."""


def check_output_file(path: Path, flag: str) -> None:
    """Raise UsageError unless ``path`` can be written as a new file (checked before the run)."""
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
        check_output_file(args.json, "--json")
    if args.plot is not None:
        check_output_file(args.plot, "--plot")
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
    from .cli.args import storage_options_of

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
