"""Issue 10: how fast the queue drains a large backlog, against raw LanceDB appends of the same rows.

* queue: a ``ProvenanceWriteQueue(store, max_batch_pairs=..., backlog_batch_pairs=..., replay_batch_pairs=...)``
  whose store is held shut (``StoreGate``, a wrapper on the instance) while
  ``--entries`` entries are enqueued in ``--pairs``-pair calls (max_queue_size
  is set above the number of calls: all of it waits in memory, nothing
  spills). Timed from opening the store until ``flush()`` returns: the drain
  alone, with the worker's validation-free path, entry ids, JSON encoding,
  Arrow conversion and one LanceDB commit per batch.
* raw: ``lancedb`` ``table.add`` of the same rows (record_id, entry_id, seq,
  entry JSON) in ``--raw-batch-rows``-row slices of one prebuilt Arrow table:
  LanceDB alone, no Python per row. Also, for reference, the same rows in
  ``--replay-batch-pairs``-row slices: what one commit per large batch costs.

The target (issue 10) is a drain at least 2x the 256-row raw appends, which
needs batches that grow under backlog; ``writes`` and ``pairs/write`` show
what the worker did. Runs alternate over ``--rounds`` on fresh stores; each
figure is total entries / total seconds.

    python scripts/bench_drain_backlog.py [--entries 200000] [--max-batch-pairs 256]
                                          [--replay-batch-pairs 8192] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import lancedb
import pyarrow as pa

from iai_queue import MemoryStore, ProvenanceWriteQueue
from iai_queue.cli import positive_int
from iai_queue.bench import (StoreGate, UsageError, check_output_file, print_table, random_ids, report_targets,
                             seed_store)

ENTRY = {"ts": "2025-01-01T00:00:00+00:00", "cue": "what did we decide about the cache", "session_id": "bench"}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


class WriteCounter:
    """Wraps ``store.append_provenance_batch`` on the instance: commits and their sizes."""

    def __init__(self, store):
        self.real = store.append_provenance_batch
        self.calls = 0
        self.pairs = 0
        self.largest = 0
        self.lock = threading.Lock()
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        result = self.real(pairs, records_cache=records_cache)
        with self.lock:
            self.calls += 1
            self.pairs += len(pairs)
            self.largest = max(self.largest, len(pairs))
        return result


def entries(n: int) -> list[dict]:
    return [dict(ENTRY, n=i) for i in range(n)]


def run_queue(work: Path, args, ids) -> dict:
    store = MemoryStore(work / "db", dim=args.dim, maintenance="never")
    seed_store(store, args.records, seed=args.seed, progress=False, chunk=args.records)
    ents = entries(args.entries)
    calls = [[(ids[(i + j) % len(ids)], ents[i + j]) for j in range(min(args.pairs, args.entries - i))]
             for i in range(0, args.entries, args.pairs)]
    gate = StoreGate(store)
    counter = WriteCounter(store)  # outside the gate: counts only what reaches the store
    before = store.provenance_rows()
    q = ProvenanceWriteQueue(store, spill_dir=work / "spill", max_batch_pairs=args.max_batch_pairs,
                             backlog_batch_pairs=args.backlog_batch_pairs,
                             replay_batch_pairs=args.replay_batch_pairs, max_queue_size=len(calls) + 1,
                             max_memory_pairs=args.entries + 1).start()
    try:
        t0 = time.perf_counter()
        for c in calls:
            q.enqueue(c)
        enqueue_s = time.perf_counter() - t0
        st = q.stats()
        if st.spilled_pairs or st.pending != args.entries:
            raise RuntimeError(f"the backlog is not all in memory: {st}")
        t0 = time.perf_counter()
        gate.open()
        ok = q.flush(timeout=args.timeout)
        seconds = time.perf_counter() - t0
    finally:
        gate.open()
        q.stop(timeout=60)
    landed = store.provenance_rows() - before
    return {"seconds": seconds, "enqueue_seconds": round(enqueue_s, 3), "entries": args.entries,
            "written": q.stats().written, "landed": landed, "writes": counter.calls,
            "largest_write": counter.largest, "ok": ok and landed == args.entries == q.stats().written}


def raw_table(args, ids) -> pa.Table:
    n = args.entries
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    return pa.table({"record_id": [str(ids[i % len(ids)]) for i in range(n)],
                     "entry_id": [f"raw-{i}" for i in range(n)],
                     "seq": pa.array(range(n), pa.int64()),
                     "entry": [dumps(e) for e in entries(n)]}, schema=MemoryStore._provenance_schema())


def run_raw(work: Path, data: pa.Table, rows: int) -> dict:
    tbl = lancedb.connect(work / "raw").create_table("provenance", schema=data.schema)
    n = data.num_rows
    t0 = time.perf_counter()
    for start in range(0, n, rows):
        tbl.add(data.slice(start, rows))
    seconds = time.perf_counter() - t0
    landed = tbl.count_rows()
    return {"seconds": seconds, "entries": n, "landed": landed, "writes": -(-n // rows), "largest_write": min(rows, n),
            "ok": landed == n}


def parse_args(argv) -> argparse.Namespace:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=positive_int, default=200_000, help="entries in the backlog (default 200000)")
    ap.add_argument("--pairs", type=positive_int, default=10, help="pairs per enqueue call (default 10, one recall's)")
    ap.add_argument("--max-batch-pairs", type=positive_int, default=256,
                    help="the queue's max_batch_pairs (default 256)")
    ap.add_argument("--backlog-batch-pairs", type=positive_int, default=8192,
                    help="the queue's backlog_batch_pairs: what one write takes while a backlog waits (default 8192; "
                         "set it to --max-batch-pairs to measure fixed-size batches)")
    ap.add_argument("--replay-batch-pairs", type=positive_int, default=8192,
                    help="the queue's replay_batch_pairs, and the reference raw batch size (default 8192)")
    ap.add_argument("--raw-batch-rows", type=positive_int, default=256, help="rows per raw append (default 256)")
    ap.add_argument("--records", type=positive_int, default=1000, help="records in the queue's store (default 1000)")
    ap.add_argument("--rounds", type=positive_int, default=2, help="alternating rounds (default 2)")
    ap.add_argument("--dim", type=positive_int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one drain (default 600)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.json:
        check_output_file(Path(args.json).resolve(), "--json")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"bench_drain_backlog.py: error: {exc}", file=sys.stderr)
        return 2
    ids = random_ids(args.records, args.seed)
    data = raw_table(args, ids)
    names = {"queue": f"queue (max_batch_pairs={args.max_batch_pairs}, backlog_batch_pairs={args.backlog_batch_pairs})",
             "raw": f"raw lancedb add, {args.raw_batch_rows} rows",
             "raw_large": f"raw lancedb add, {args.replay_batch_pairs} rows (reference)"}
    res: dict[str, list] = {k: [] for k in names}
    work = Path(tempfile.mkdtemp(prefix="iai-bench-drain-backlog-"))
    try:
        # Warm-up, untimed: the first store writes of a process pay for imports and LanceDB's start.
        warm = argparse.Namespace(**(vars(args) | {"entries": min(args.entries, 2000)}))
        run_queue(work / "warm-queue", warm, ids)
        run_raw(work / "warm-raw", data.slice(0, warm.entries), args.raw_batch_rows)
        for r in range(args.rounds):
            order = ("raw", "queue", "raw_large") if r % 2 == 0 else ("queue", "raw", "raw_large")
            for k in order:
                d = work / f"{k}{r}"
                d.mkdir()
                if k == "queue":
                    out = run_queue(d, args, ids)
                else:
                    out = run_raw(d, data, args.raw_batch_rows if k == "raw" else args.replay_batch_pairs)
                res[k].append(out)
                shutil.rmtree(d, ignore_errors=True)
                print(f"{k} round {r + 1}: {out['entries'] / out['seconds']:,.0f} entries/s, {out['writes']} writes",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(runs):
        return round(sum(x["entries"] for x in runs) / sum(x["seconds"] for x in runs))

    out = {"benchmark": "drain_backlog", "config": vars(args) | {"json": None}}
    for k in names:
        out[k] = {"entries_per_s": rate(res[k]), "runs": res[k]}
    q = out["queue"]["entries_per_s"]
    out["ratio"] = {"queue_vs_raw": round(q / out["raw"]["entries_per_s"], 3),
                    "queue_vs_raw_large": round(q / out["raw_large"]["entries_per_s"], 3)}
    out["ok"] = all(x["ok"] for runs in res.values() for x in runs)
    out["targets"] = {f"drain_ge_2x_raw_{args.raw_batch_rows}_rows": out["ratio"]["queue_vs_raw"] >= 2.0,
                      "every_entry_landed": out["ok"]}
    print(f"drain of a {args.entries}-entry backlog ({args.pairs}-pair calls, held in memory while the store was "
          f"shut); {args.rounds} alternating rounds")
    rows = []
    for k, label in names.items():
        runs = res[k]
        rows.append([label, out[k]["entries_per_s"], " ".join(f"{x['seconds']:.2f}" for x in runs),
                     runs[-1]["writes"], round(args.entries / runs[-1]["writes"]),
                     round(q / out[k]["entries_per_s"], 3)])
    print_table(["writer", "entries/s", "seconds (per run)", "writes", "pairs/write", "queue / this"], rows)
    print("all entries landed (rows counted): " + ("OK" if out["ok"] else "MISMATCH"))
    report_targets(out, args.json)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
