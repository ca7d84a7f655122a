"""Issue 4, benchmark 1: enqueue latency of a 1-pair batch while the worker writes to LanceDB.

ProvenanceWriteQueue.enqueue vs the conventional queue.Queue write-behind in
scripts/reference_queue.py. Each gets its own real LanceDB store (same seed
and size). Calls are paced in bursts (``--burst`` calls, then ``--pause-ms``)
so the worker keeps writing batches while the caller enqueues; the two queues
take turns in ``--rounds`` interleaved segments, each flushed before the other
is measured, so machine drift hits both alike. Reports p50/p99/p99.9/max (µs)
of each, their ratio, and the share of the measured time the worker spent
inside append_provenance_batch ("worker busy").

    python scripts/bench_enqueue.py [--calls 20000] [--json PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_queue import ReferenceWriteBehind  # noqa: E402

from iai_queue import MemoryStore  # noqa: E402
from iai_queue.bench import percentiles, print_table, report_targets, seed_store  # noqa: E402


class BusyMeter:
    """Wraps a store's append_provenance_batch on the instance; sums the time spent writing."""

    def __init__(self, store):
        self.real = store.append_provenance_batch
        self.busy_ns = 0
        self.calls = 0
        self.pairs = 0
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        t0 = time.perf_counter_ns()
        try:
            return self.real(pairs, records_cache=records_cache)
        finally:
            self.busy_ns += time.perf_counter_ns() - t0
            self.calls += 1
            self.pairs += len(pairs)


def measure(enqueue, pair_lists, burst: int, pause_s: float, out: list) -> None:
    clock = time.perf_counter_ns
    sleep = time.sleep
    append = out.append
    for start in range(0, len(pair_lists), burst):
        for pairs in pair_lists[start:start + burst]:
            t0 = clock()
            enqueue(pairs)
            append(clock() - t0)
        sleep(pause_s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000, help="enqueue calls per queue (default 20000)")
    ap.add_argument("--burst", type=int, default=64, help="calls per burst (default 64)")
    ap.add_argument("--pause-ms", type=float, default=1.0, help="pause between bursts (default 1 ms)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved segments per queue (default 4)")
    ap.add_argument("--records", type=int, default=1000, help="records in each store (default 1000)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="iai-bench-enqueue-"))
    try:
        stores, ids = {}, None
        for name in ("queue", "reference"):
            stores[name] = MemoryStore(work / name, dim=args.dim, maintenance="never")
            ids = seed_store(stores[name], args.records, seed=args.seed, progress=False)
        meters = {n: BusyMeter(s) for n, s in stores.items()}
        q = stores["queue"].enable_provenance_queue(spill_dir=work / "spill")
        ref = ReferenceWriteBehind(stores["reference"]).start()
        enq = {"queue": q.enqueue, "reference": ref.enqueue}
        flush = {"queue": lambda: q.flush(timeout=120), "reference": lambda: ref.flush(120)}

        def make(n, tag):
            return [[(ids[i % len(ids)], {"ts": "2025-01-01T00:00:00+00:00", "cue": f"{tag}{i}", "session_id": "b"})]
                    for i in range(n)]

        lat = {"queue": [], "reference": []}
        busy = {"queue": 0, "reference": 0}
        wall = {"queue": 0, "reference": 0}
        # Warm-up (untimed): one burst each, then drained.
        for name in lat:
            measure(enq[name], make(args.burst * 4, "w"), args.burst, args.pause_ms / 1000, [])
            flush[name]()
        per = max(1, args.calls // args.rounds)
        for r in range(args.rounds):
            order = ("queue", "reference") if r % 2 == 0 else ("reference", "queue")
            for name in order:
                lists = make(per, f"r{r}")
                b0, t0 = meters[name].busy_ns, time.perf_counter_ns()
                measure(enq[name], lists, args.burst, args.pause_ms / 1000, lat[name])
                wall[name] += time.perf_counter_ns() - t0
                busy[name] += meters[name].busy_ns - b0  # includes a write that straddles the end
                flush[name]()
            print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        q.flush(timeout=120)
        stores["queue"].disable_provenance_queue(timeout=120)
        ref.stop()
        st = q.stats()
        result = {"benchmark": "enqueue", "config": vars(args) | {"json": None}}
        for name in lat:
            result[name] = percentiles(lat[name])
            result[name]["worker_busy_pct"] = round(100.0 * busy[name] / max(1, wall[name]), 1)
            result[name]["writes"] = meters[name].calls
        rq, rr = result["queue"], result["reference"]
        result["ratio"] = {k: round(rq[k] / rr[k], 3) for k in ("p50", "p99", "p99.9", "max") if rr.get(k)}
        result["queue_accepted"] = st.accepted
        result["queue_written"] = st.written
        result["reference_written"] = ref.written
        result["targets"] = {"p50_le_0.5x_reference": result["ratio"]["p50"] <= 0.5,
                             "p99_le_5us": rq["p99"] <= 5.0}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"enqueue of a 1-pair batch: {len(lat['queue'])} calls each, bursts of {args.burst} every "
          f"{args.pause_ms} ms, worker writing to LanceDB ({args.records} records x {args.dim}-d)")
    print_table(["queue", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "worker busy %", "writes"],
                [[n, result[n]["p50"], result[n]["p99"], result[n]["p99.9"], result[n]["max"],
                  result[n]["worker_busy_pct"], result[n]["writes"]] for n in ("queue", "reference")]
                + [["queue / reference", result["ratio"]["p50"], result["ratio"]["p99"], result["ratio"]["p99.9"],
                    result["ratio"]["max"], None, None]])
    ok = result["queue_written"] == result["queue_accepted"]
    print(f"written: queue {result['queue_written']}/{result['queue_accepted']}, reference {result['reference_written']}"
          f" -> {'OK' if ok else 'MISMATCH'}")
    report_targets(result, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
