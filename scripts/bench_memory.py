"""Issue 4, benchmark 5: RSS stays bounded over a sustained 10x overload.

The store is throttled to ``--capacity`` entries/s (a wrapper sleeps after each
real write); the caller enqueues 10x that (``--overload``) in 10-pair calls for
``--seconds``. Memory holds at most max_memory_pairs; the rest spills to disk.
RSS is sampled every 0.25 s together with the queue's stats; reported: baseline
(before the load), max, last, the curve (RSS at every 10% of the run), and the
growth after warm-up: max RSS after warm-up minus the max up to its end.

Warm-up ends when the first spill file has been replayed (``stats().replayed >
0``), not at a fixed fraction of the run: at 10x overload the in-memory queue
(``max_queue_size`` batches) fills in ~2 s, but the worker then needs ~20 s to
write it out at the store's rate before it replays anything, and the first
large replay write is a one-off step in RSS (Arrow/LanceDB write buffers).
Until then every path has not yet run once, so growth measured from "the first
10%" counted the fill-up as a leak. Also reported: the least-squares RSS slope
after warm-up (MB/min), which is what a slow leak shows up in.

    python scripts/bench_memory.py [--seconds 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from iai_queue import MemoryStore
from iai_queue.bench import report_targets, rss_bytes, seed_store

MB = 1 << 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--capacity", type=int, default=2000, help="store capacity, entries/s (default 2000)")
    ap.add_argument("--overload", type=float, default=10.0)
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="iai-bench-memory-"))
    try:
        store = MemoryStore(work / "db", dim=384, maintenance="never")
        ids = seed_store(store, args.records, progress=False)
        real = store.append_provenance_batch

        def throttled(pairs, records_cache=None):
            t0 = time.monotonic()
            real(pairs, records_cache=records_cache)
            time.sleep(max(0.0, len(pairs) / args.capacity - (time.monotonic() - t0)))

        store.append_provenance_batch = throttled
        q = store.enable_provenance_queue(spill_dir=work / "spill")
        samples: list[tuple[float, int]] = []
        warm_until: list[float] = []  # when the first spill file had been replayed
        stop = threading.Event()

        def sampler():
            t0 = time.monotonic()
            while not stop.wait(0.25):
                t = time.monotonic() - t0
                if not warm_until and q.stats().replayed:
                    warm_until.append(t)
                samples.append((t, rss_bytes()))

        base = rss_bytes()
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        rate = args.capacity * args.overload  # entries/s
        entry = {"ts": "2025-01-01T00:00:00+00:00", "cue": "what did we decide about the cache", "session_id": "b"}
        t0 = time.monotonic()
        sent, tick = 0, 0.01
        max_mem_pairs = 0
        while (now := time.monotonic() - t0) < args.seconds:
            due = int(rate * now)
            while sent + 10 <= due:
                q.enqueue([(ids[(sent + j) % len(ids)], dict(entry, n=sent + j)) for j in range(10)])
                sent += 10
            st = q.stats()
            max_mem_pairs = max(max_mem_pairs, st.pending + st.spill_buffered)
            time.sleep(tick)
        stop.set()
        th.join()
        st = q.stats()
        store.disable_provenance_queue(timeout=1.0)
        peak = max(r for _, r in samples)
        warm = warm_until[0] if warm_until else None
        early = [r for t, r in samples if warm is None or t <= warm] or [base]
        late = [(t, r) for t, r in samples if warm is not None and t > warm]
        growth = (max(r for _, r in late) - max(early)) / MB if late else None
        slope = None
        if len(late) >= 8:  # least squares, MB per minute
            mt = sum(t for t, _ in late) / len(late)
            mr = sum(r for _, r in late) / len(late)
            var = sum((t - mt) ** 2 for t, _ in late)
            slope = sum((t - mt) * (r - mr) for t, r in late) / var * 60 / MB if var else None
        curve = [round(next(r for t, r in samples if t >= f * args.seconds / 10 - 0.25) / MB, 1)
                 for f in range(1, 10) if any(t >= f * args.seconds / 10 - 0.25 for t, _ in samples)]
        curve.append(round(samples[-1][1] / MB, 1))
        out = {"benchmark": "memory", "config": vars(args) | {"json": None},
               "accepted": st.accepted, "written": st.written, "spilled_pairs": st.spilled_pairs,
               "dropped": st.dropped, "max_in_memory_pairs": max_mem_pairs,
               "max_memory_pairs_limit": q.max_memory_pairs, "max_queue_size_batches": q.max_queue_size,
               "rss_baseline_mb": round(base / MB, 1), "rss_max_mb": round(peak / MB, 1),
               "rss_last_mb": round(samples[-1][1] / MB, 1), "rss_curve_mb": curve,
               "warmup_s": None if warm is None else round(warm, 1),
               "rss_growth_after_warmup_mb": None if growth is None else round(growth, 1),
               "rss_slope_after_warmup_mb_per_min": None if slope is None else round(slope, 2)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Not measurable (no replay happened, or too little run after it) counts as missed.
    out["targets"] = {"rss_bounded": out["rss_growth_after_warmup_mb"] is not None
                      and len(late) >= 8 and out["rss_growth_after_warmup_mb"] < 50 and out["dropped"] == 0}
    print(f"memory: {args.seconds:.0f} s at {args.overload:g}x overload ({rate:,.0f} entries/s offered, store takes "
          f"{args.capacity:,}/s): accepted {out['accepted']:,}, written {out['written']:,}, spilled "
          f"{out['spilled_pairs']:,}, dropped {out['dropped']}")
    print(f"RSS: baseline {out['rss_baseline_mb']} MB, max {out['rss_max_mb']} MB, last {out['rss_last_mb']} MB; "
          f"curve at each 10% of the run: {out['rss_curve_mb']}")
    if warm is None or len(late) < 8:
        print(f"RSS after warm-up: not measurable (warm-up = until the first spill file is replayed: "
              f"{'never' if warm is None else f'{warm:.1f} s'}); run longer (--seconds 60)")
    else:
        print(f"RSS after warm-up (first spill file replayed at {warm:.1f} s): growth "
              f"{out['rss_growth_after_warmup_mb']} MB, slope {out['rss_slope_after_warmup_mb_per_min']} MB/min")
    print(f"max pairs in memory "
          f"{out['max_in_memory_pairs']:,} (documented bound: {out['max_queue_size_batches']:,} batches of 10 "
          f"+ {out['max_memory_pairs_limit']:,} pairs)")
    report_targets(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
