"""Where enqueue's tail comes from: the first call after a pause, and the GC collections the caller runs.

Each mode (``--modes``, default memory and process) gets its own queue on a real
LanceDB store, paced as ``bench_peers.py`` paces it (bursts of ``--burst`` calls,
then a ``--pause-ms`` sleep), the worker writing. Every call is timed, and a
``gc.callbacks`` hook records every collection: when, which generation, on which
thread. With ``--rusage`` the calling thread's page faults and involuntary context
switches are read around each call too (``getrusage(RUSAGE_THREAD)``, Linux,
outside the timed span). Each reading allocates objects the GC counts, so then
most collections start in the reading instead of in ``enqueue``: use it to see
faults and switches, and the run without it to see collections.

Reported per mode:
- p50/p99/p99.9 of all calls; p50 of each burst's first call (after the pause)
  and p50/p99 of the others: what the pause costs the next call;
- collections: how many ran on the calling thread and on others, by generation,
  and how long the caller's took (median, max);
- the slowest 0.1 % of calls, each put down to what overlapped it: a collection,
  a page fault, an involuntary context switch (with ``--rusage``), or none of these.

    python scripts/bench_tail.py [--calls 20000] [--modes memory,process] [--rusage] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iai_queue import MemoryStore, ProvenanceWriteQueue  # noqa: E402
from iai_queue.bench import percentiles, seed_store  # noqa: E402

MODES = ("memory", "process", "fsync-interval")


class Collections:
    """A ``gc.callbacks`` hook: ``(start_ns, end_ns, generation, thread ident)`` of every collection."""

    def __init__(self):
        self.done: list[tuple[int, int, int, int]] = []
        self._started: dict[int, int] = {}

    def __call__(self, phase: str, info: dict) -> None:
        me = threading.get_ident()
        if phase == "start":
            self._started[me] = time.perf_counter_ns()
        else:
            self.done.append((self._started.pop(me, 0), time.perf_counter_ns(), info["generation"], me))

    def overlapping(self, start: int, end: int) -> bool:
        return any(s < end and e > start for s, e, _, _ in self.done)


def measure_mode(mode: str, work: Path, args: argparse.Namespace) -> dict:
    store = MemoryStore(work / mode / "db", dim=args.dim, maintenance="never")
    ids = seed_store(store, args.records, seed=args.seed, progress=False)
    q = ProvenanceWriteQueue(store, spill_dir=work / mode / "spill", coalesce_ms=50, max_batch_pairs=256,
                             max_queue_size=4096, durability=mode).start()
    clock, usage = time.perf_counter_ns, resource.getrusage
    thread_usage = getattr(resource, "RUSAGE_THREAD", None)
    pause = args.pause_ms / 1000

    def segment(n: int, tag: str) -> list[tuple]:
        lists = [[(ids[i % len(ids)], {"ts": "2025-01-01T00:00:00+00:00", "cue": f"{tag}{i}", "session_id": "b"})]
                 for i in range(n)]
        calls = []
        for start in range(0, n, args.burst):
            for j, pairs in enumerate(lists[start:start + args.burst]):
                if args.rusage:
                    u0 = usage(thread_usage)
                    t0 = clock()
                    q.enqueue(pairs)
                    t1 = clock()
                    u1 = usage(thread_usage)
                    calls.append((t0, t1, j == 0, u1.ru_minflt - u0.ru_minflt + u1.ru_majflt - u0.ru_majflt,
                                  u1.ru_nivcsw - u0.ru_nivcsw))
                else:
                    t0 = clock()
                    q.enqueue(pairs)
                    t1 = clock()
                    calls.append((t0, t1, j == 0, 0, 0))
            time.sleep(pause)
        if not q.flush(120):
            raise RuntimeError(f"{mode}: flush timed out: {q.stats()}")
        return calls

    segment(args.burst * 4, "w")  # warm-up, untimed
    hook = Collections()
    caller = threading.get_ident()
    gc.callbacks.append(hook)
    try:
        calls: list[tuple] = []
        per = max(1, args.calls // args.rounds)
        for r in range(args.rounds):
            calls += segment(per, f"r{r}")
    finally:
        gc.callbacks.remove(hook)
        q.stop(30)
    rows = store.provenance_rows()

    lat = [t1 - t0 for t0, t1, *_ in calls]
    first = [t1 - t0 for t0, t1, is_first, *_ in calls if is_first]
    rest = [t1 - t0 for t0, t1, is_first, *_ in calls if not is_first]
    in_caller = [(e - s) / 1000 for s, e, _, t in hook.done if t == caller]
    slowest = sorted(calls, key=lambda c: c[1] - c[0])[-max(1, len(calls) // 1000):]
    causes: Counter = Counter()
    for t0, t1, _, faults, switches in slowest:
        found = [name for name, hit in (("collection", hook.overlapping(t0, t1)), ("page fault", faults > 0),
                                        ("involuntary switch", switches > 0)) if hit]
        causes[" + ".join(found) or "none of these"] += 1
    return {
        "mode": mode, "calls": len(calls), "rows": rows,
        "all": percentiles(lat),
        "first_after_pause_p50": percentiles(first).get("p50"),
        "others": percentiles(rest),
        "collections": {
            "on_caller": len(in_caller), "on_other_threads": len(hook.done) - len(in_caller),
            "by_generation": dict(Counter(g for _, _, g, _ in hook.done)),
            "caller_median_us": round(statistics.median(in_caller), 1) if in_caller else None,
            "caller_max_us": round(max(in_caller), 1) if in_caller else None,
        },
        "slowest_0.1pct": {"n": len(slowest), "slowest_us": round((slowest[0][1] - slowest[0][0]) / 1000, 1),
                           "causes": dict(causes)},
    }


def print_mode(m: dict) -> None:
    a, o, c, s = m["all"], m["others"], m["collections"], m["slowest_0.1pct"]
    print(f"{m['mode']}: {m['calls']} calls ({m['rows']} rows written)")
    print(f"  all calls              p50 {a['p50']} µs, p99 {a['p99']} µs, p99.9 {a['p99.9']} µs, max {a['max']} µs")
    print(f"  first call of a burst  p50 {m['first_after_pause_p50']} µs (after the pause)")
    print(f"  the other calls        p50 {o['p50']} µs, p99 {o['p99']} µs")
    print(f"  collections            {c['on_caller']} on the calling thread (median {c['caller_median_us']} µs, "
          f"max {c['caller_max_us']} µs), {c['on_other_threads']} on others; by generation {c['by_generation']}")
    print(f"  slowest 0.1 % ({s['n']} calls, from {s['slowest_us']} µs): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(s["causes"].items(), key=lambda kv: -kv[1])))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=positive_int, default=20_000, help="enqueue calls per mode (default 20000)")
    ap.add_argument("--burst", type=positive_int, default=64, help="calls per burst (default 64)")
    ap.add_argument("--pause-ms", type=float, default=1.0, help="pause between bursts (default 1 ms)")
    ap.add_argument("--rounds", type=positive_int, default=4, help="segments per mode, each flushed (default 4)")
    ap.add_argument("--records", type=positive_int, default=1000)
    ap.add_argument("--dim", type=positive_int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="memory,process", help=f"comma-separated, of {','.join(MODES)}")
    ap.add_argument("--rusage", action="store_true",
                    help="also read page faults and context switches around each call (moves collections)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes {args.modes!r}: choose from {','.join(MODES)}")
    if args.rusage and not hasattr(resource, "RUSAGE_THREAD"):
        ap.error("--rusage needs getrusage(RUSAGE_THREAD) (Linux)")
    work = Path(tempfile.mkdtemp(prefix="iai-bench-tail-"))
    try:
        results = [measure_mode(m, work, args) for m in modes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for m in results:
        print_mode(m)
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "tail", "config": vars(args), "modes": results}, indent=2))
    return 0 if all(m["rows"] >= m["calls"] for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
