"""Issue 4, benchmark 4: enqueue latency while spilling, and replay throughput of spilled entries.

1. Baseline: ``--calls`` 1-pair enqueues (bursts of 64, 1 ms pauses) into a queue
   whose store is healthy (nothing spills).
2. The same calls into a queue with ``max_queue_size=--queue-size`` whose store is
   blocked (append_provenance_batch waits on a gate): past the first few hundred,
   every call goes to the spill buffer and the spill thread writes files.
3. Replay: ``--replay`` more entries are spilled (10-pair calls), then the gate
   opens; timed until ``flush()`` returns. Baseline in the same run:
   ``append_provenance_batch`` of the same number of entries in 4096-pair batches.

    python scripts/bench_overflow.py [--json PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from iai_queue import MemoryStore
from iai_queue.bench import StoreGate, percentiles, print_table, report_targets, seed_store

ENTRY = {"ts": "2025-01-01T00:00:00+00:00", "cue": "what did we decide about the cache", "session_id": "bench"}


def paced(enqueue, lists, burst=64, pause=0.001):
    lat, clock = [], time.perf_counter_ns
    for s in range(0, len(lists), burst):
        for p in lists[s:s + burst]:
            t0 = clock()
            enqueue(p)
            lat.append(clock() - t0)
        time.sleep(pause)
    return lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--replay", type=int, default=100_000)
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="iai-bench-overflow-"))
    out = {"benchmark": "overflow", "config": vars(args) | {"json": None}}
    try:
        stores = {n: MemoryStore(work / n, dim=384, maintenance="never") for n in ("healthy", "blocked", "direct")}
        ids = None
        for s in stores.values():
            ids = seed_store(s, args.records, seed=args.seed, progress=False)
        mk = lambda n, t: [[(ids[i % len(ids)], dict(ENTRY, n=i, t=t))] for i in range(n)]  # noqa: E731
        # 1. healthy baseline
        qh = stores["healthy"].enable_provenance_queue(spill_dir=work / "spill-h", max_queue_size=args.queue_size)
        paced(qh.enqueue, mk(500, "w"))
        qh.flush(60)
        lat_h = paced(qh.enqueue, mk(args.calls, "h"))
        qh.flush(60)
        out["healthy_enqueue_us"] = percentiles(lat_h)
        out["healthy_spilled"] = qh.stats().spilled_pairs
        stores["healthy"].disable_provenance_queue()
        # 2. blocked store: spilling
        bs = stores["blocked"]
        gate = StoreGate(bs)
        qb = bs.enable_provenance_queue(spill_dir=work / "spill-b", max_queue_size=args.queue_size)
        rows0 = bs.provenance_rows()
        lat_s = paced(qb.enqueue, mk(args.calls, "s"))
        out["spilling_enqueue_us"] = percentiles(lat_s)
        # 3. replay
        ten = [[(ids[(i + j) % len(ids)], dict(ENTRY, n=i + j)) for j in range(10)] for i in range(0, args.replay, 10)]
        for p in ten:
            qb.enqueue(p)
        while qb.stats().spill_buffered:
            time.sleep(0.01)
        st = qb.stats()
        out["spilled_pairs"], out["spilled_files"] = st.spilled_pairs, st.spilled_files
        t0 = time.perf_counter()
        gate.open()
        ok = qb.flush(timeout=600)
        dt = time.perf_counter() - t0
        st = qb.stats()
        out["replayed"] = st.replayed
        out["replay_seconds"] = round(dt, 3)
        out["replay_entries_per_s"] = round(st.replayed / dt)
        bs.disable_provenance_queue()
        total = args.calls + args.replay
        out["landed"] = bs.provenance_rows() - rows0
        out["ok"] = ok and out["landed"] == total and st.dropped == 0
        # baseline: the store alone, same entries, 4096-pair batches
        ds = stores["direct"]
        flat = [p[0] for p in ten]
        flat = [pp for p in ten for pp in p]
        t0 = time.perf_counter()
        for s in range(0, len(flat), 4096):
            ds.append_provenance_batch(flat[s:s + 4096])
        out["direct_append_entries_per_s"] = round(len(flat) / (time.perf_counter() - t0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    h, s = out["healthy_enqueue_us"], out["spilling_enqueue_us"]
    out["ratio_spilling_vs_healthy"] = {k: round(s[k] / h[k], 2) for k in ("p50", "p99", "p99.9", "max")}
    out["ratio_replay_vs_direct"] = round(out["replay_entries_per_s"] / out["direct_append_entries_per_s"], 3)
    out["targets"] = {"overflow_enqueue_p99_le_100us": s["p99"] <= 100,
                      "replay_ge_100k_per_s": out["replay_entries_per_s"] >= 100_000}
    print(f"overflow: {args.calls} paced 1-pair enqueues, max_queue_size={args.queue_size}")
    print_table(["enqueue", "p50 µs", "p99 µs", "p99.9 µs", "max µs"],
                [["healthy store (baseline)", h["p50"], h["p99"], h["p99.9"], h["max"]],
                 ["blocked store, spilling", s["p50"], s["p99"], s["p99.9"], s["max"]],
                 ["spilling / healthy", *out["ratio_spilling_vs_healthy"].values()]])
    print(f"replay: {out['replayed']} entries from {out['spilled_files']} spill files in {out['replay_seconds']} s = "
          f"{out['replay_entries_per_s']:,}/s; store alone (4096-pair appends) {out['direct_append_entries_per_s']:,}/s "
          f"-> {out['ratio_replay_vs_direct']}x; landed {out['landed']} -> {'OK' if out['ok'] else 'MISMATCH'}")
    report_targets(out, args.json)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
