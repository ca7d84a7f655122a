"""Issue 4, benchmark 6: get() latency of one record with 1 000 000 provenance rows in the store.

Seeds ``--records`` records, measures get() with no provenance (the baseline),
appends ``--rows`` provenance rows spread evenly over the records (bulk
``append_provenance_batch`` calls of ``--batch`` pairs, the throughput is
reported too), runs ``store.maintain()`` (BTree indexes + compaction), and
measures get() of random records again. Also reports get() before maintain().

    python scripts/bench_get.py [--rows 1000000] [--json PATH]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from iai_queue import MemoryStore
from iai_queue.bench import percentiles, print_table, report_targets, seed_store


def time_gets(store, ids, n, rnd, expect=None) -> tuple[dict, bool]:
    lat, ok = [], True
    for _ in range(n):
        rid = rnd.choice(ids)
        t0 = time.perf_counter_ns()
        rec = store.get(rid)
        lat.append(time.perf_counter_ns() - t0)
        ok &= rec is not None and (expect is None or len(rec.provenance) == expect)
    return percentiles(lat, scale=1e-6, qs=(50, 99)), ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=50_000)
    ap.add_argument("--gets", type=int, default=200)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    rnd = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="iai-bench-get-"))
    out = {"benchmark": "get", "config": vars(args) | {"json": None}}
    try:
        store = MemoryStore(work / "db", dim=args.dim, maintenance="never")
        ids = seed_store(store, args.records, seed=args.seed, progress=False)
        store.maintain()
        out["get_empty_ms"], ok0 = time_gets(store, ids, args.gets, rnd, expect=0)
        entry = {"ts": "2025-01-01T00:00:00+00:00", "cue": "what did we decide about the cache", "session_id": "b"}
        t0 = time.perf_counter()
        for start in range(0, args.rows, args.batch):
            m = min(args.batch, args.rows - start)
            store.append_provenance_batch([(ids[(start + i) % len(ids)], entry) for i in range(m)])
            print(f"\rappended {start + m}/{args.rows}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        out["append_entries_per_s"] = round(args.rows / (time.perf_counter() - t0))
        out["provenance_rows"] = store.provenance_rows()
        per = args.rows // args.records
        out["get_before_maintain_ms"], ok1 = time_gets(store, ids, max(10, args.gets // 10), rnd)
        t0 = time.perf_counter()
        store.maintain()
        out["maintain_s"] = round(time.perf_counter() - t0, 2)
        out["get_ms"], ok2 = time_gets(store, ids, args.gets, rnd)
        rec = store.get(ids[0])
        ok3 = len(rec.provenance) == per + (1 if args.rows % args.records else 0) or args.rows % args.records != 0
        out["entries_per_record"] = per
        out["ok"] = ok0 and ok1 and ok2 and ok3
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["ratio_vs_empty_p50"] = round(out["get_ms"]["p50"] / out["get_empty_ms"]["p50"], 2)
    out["targets"] = {"get_p50_le_10ms": out["get_ms"]["p50"] <= 10}
    print(f"get(): {args.records} records, {out['provenance_rows']} provenance rows (~{out['entries_per_record']} per record)")
    print_table(["store state", "p50 ms", "p99 ms", "n"],
                [["no provenance (baseline)", out["get_empty_ms"]["p50"], out["get_empty_ms"]["p99"], out["get_empty_ms"]["n"]],
                 ["1M rows, before maintain()", out["get_before_maintain_ms"]["p50"], out["get_before_maintain_ms"]["p99"],
                  out["get_before_maintain_ms"]["n"]],
                 ["1M rows, after maintain()", out["get_ms"]["p50"], out["get_ms"]["p99"], out["get_ms"]["n"]]])
    print(f"bulk append {out['append_entries_per_s']:,} entries/s; maintain() {out['maintain_s']} s; "
          f"after/baseline p50 {out['ratio_vs_empty_p50']}x; results {'OK' if out['ok'] else 'WRONG'}")
    report_targets(out, args.json)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
