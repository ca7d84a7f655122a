"""Where enqueue's tail comes from: the first call after a pause, and what overlaps the slowest calls.

Each mode (``--modes``, default memory and process) gets its own queue on a real
LanceDB store, paced as ``bench_peers.py`` paces it (bursts of ``--burst`` calls,
then a ``--pause-ms`` pause), the worker writing. Every call is timed, and a
``gc.callbacks`` hook records every collection while the calls are timed: when, which
generation, on which thread (the calls' inputs are built before it is installed,
and each call is recorded in lists of ints, so the harness allocates next to
nothing the GC counts). With ``--rusage`` the calling thread's page faults and
involuntary context switches are read around each call too (``getrusage(RUSAGE_THREAD)``, Linux,
outside the timed span). Each reading allocates objects the GC counts, so then
most collections start in the reading instead of in ``enqueue``: use it to see
faults and switches, and the run without it to see collections.

``--pause`` says what the calling thread does in the pause, to tell apart what
makes the next call slow:

- ``sleep`` (default; what ``bench_peers.py`` and a real caller do): the thread
  blocks, its core may go idle or run other threads;
- ``spin``: it busy-waits on the clock, holding the GIL: the core stays busy and
  its caches hold little else, and the worker runs no Python meanwhile;
- ``hash``: it busy-waits hashing 64 KiB at a time (``hashlib.sha256``, which
  releases the GIL): the core stays busy, the hashed data passes through its
  caches, and the worker may run Python meanwhile.

Reported per mode:
- p50/p99/p99.9 of all calls; p50 of each burst's first call (after the pause)
  and p50/p99 of the others: what the pause costs the next call;
- collections: how many ran on the calling thread and on others, by generation,
  and how long the caller's took (median, max);
- the slowest 0.1 % of calls, each put down to what overlapped it: a collection
  on the calling thread or on another, a page fault or an involuntary
  context switch (with ``--rusage``), or none of these.

    python scripts/bench_tail.py [--calls 20000] [--modes memory,process] [--pause sleep|spin|hash]
                                 [--rusage] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
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
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iai_queue import MemoryStore, ProvenanceWriteQueue  # noqa: E402
from iai_queue.bench import percentiles, seed_store  # noqa: E402
from iai_queue.cli import positive_int  # noqa: E402

MODES = ("memory", "process", "fsync-interval")
_HASHED = bytes(64 << 10)


def _spin(seconds: float) -> None:
    end = time.perf_counter_ns() + int(seconds * 1e9)
    while time.perf_counter_ns() < end:
        pass


def _hash(seconds: float) -> None:
    end = time.perf_counter_ns() + int(seconds * 1e9)
    while time.perf_counter_ns() < end:
        hashlib.sha256(_HASHED)  # the GIL is released while it hashes


PAUSES = {"sleep": time.sleep, "spin": _spin, "hash": _hash}


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

    def overlapping(self, start: int, end: int, thread: int) -> Optional[str]:
        """Whether a collection ran during ``[start, end)``: "this thread", "another thread", or None."""
        where = [t == thread for s, e, _, t in self.done if s < end and e > start]
        return None if not where else "this thread" if any(where) else "another thread"


def measure_mode(mode: str, work: Path, args: argparse.Namespace) -> dict:
    store = MemoryStore(work / mode / "db", dim=args.dim, maintenance="never")
    ids = seed_store(store, args.records, seed=args.seed, progress=False)
    q = ProvenanceWriteQueue(store, spill_dir=work / mode / "spill", coalesce_ms=50, max_batch_pairs=256,
                             max_queue_size=4096, durability=mode).start()
    clock, usage = time.perf_counter_ns, resource.getrusage
    thread_usage = getattr(resource, "RUSAGE_THREAD", None)
    pause, pause_for = args.pause_ms / 1000, PAUSES[args.pause]
    # Per call, in lists of ints: a tuple per call would be the harness allocating what the GC counts.
    starts: list[int] = []
    ends: list[int] = []
    faults: list[int] = []
    switches: list[int] = []

    def make(n: int, tag: str) -> list:
        return [[(ids[i % len(ids)], {"ts": "2025-01-01T00:00:00+00:00", "cue": f"{tag}{i}", "session_id": "b"})]
                for i in range(n)]

    def segment(lists: list, timed: bool) -> None:
        for start in range(0, len(lists), args.burst):
            for pairs in lists[start:start + args.burst]:
                if args.rusage and timed:
                    u0 = usage(thread_usage)
                    t0 = clock()
                    q.enqueue(pairs)
                    t1 = clock()
                    u1 = usage(thread_usage)
                    faults.append(u1.ru_minflt - u0.ru_minflt + u1.ru_majflt - u0.ru_majflt)
                    switches.append(u1.ru_nivcsw - u0.ru_nivcsw)
                else:
                    t0 = clock()
                    q.enqueue(pairs)
                    t1 = clock()
                if timed:
                    starts.append(t0)
                    ends.append(t1)
            pause_for(pause)
        if not q.flush(120):
            raise RuntimeError(f"{mode}: flush timed out: {q.stats()}")

    warm_up = args.burst * 4
    segment(make(warm_up, "w"), timed=False)
    per = max(1, args.calls // args.rounds)
    inputs = [make(per, f"r{r}") for r in range(args.rounds)]  # built before the hook: not the harness's GC
    first_of_burst = [k % per % args.burst == 0 for k in range(per * args.rounds)]
    hook = Collections()
    caller = threading.get_ident()
    gc.callbacks.append(hook)
    try:
        for lists in inputs:
            segment(lists, timed=True)
    finally:
        gc.callbacks.remove(hook)
        q.stop(30)
    rows = store.provenance_rows()

    lat = [e - s for s, e in zip(starts, ends)]
    first = [x for x, f in zip(lat, first_of_burst) if f]
    rest = [x for x, f in zip(lat, first_of_burst) if not f]
    in_caller = [(e - s) / 1000 for s, e, _, t in hook.done if t == caller]
    slowest = sorted(range(len(lat)), key=lat.__getitem__)[-max(1, len(lat) // 1000):]
    causes: Counter = Counter()
    for k in slowest:
        where = hook.overlapping(starts[k], ends[k], caller)
        found = ([f"collection on {where}"] if where else []) + \
            (["page fault"] if args.rusage and faults[k] else []) + \
            (["involuntary switch"] if args.rusage and switches[k] else [])
        causes[" + ".join(found) or "none of these"] += 1
    return {
        "mode": mode, "pause": args.pause, "calls": len(lat), "rows": rows, "expected_rows": warm_up + len(lat),
        "all": percentiles(lat),
        "first_after_pause_p50": percentiles(first).get("p50"),
        "others": percentiles(rest),
        "collections": {
            "on_caller": len(in_caller), "on_other_threads": len(hook.done) - len(in_caller),
            "by_generation": dict(Counter(g for _, _, g, _ in hook.done)),
            "caller_median_us": round(statistics.median(in_caller), 1) if in_caller else None,
            "caller_max_us": round(max(in_caller), 1) if in_caller else None,
        },
        "calls_with_faults": sum(1 for f in faults if f) if args.rusage else None,
        "calls_with_switches": sum(1 for w in switches if w) if args.rusage else None,
        "slowest_0.1pct": {"n": len(slowest), "slowest_us": round(lat[slowest[0]] / 1000, 1),
                           "causes": dict(causes)},
    }


def print_mode(m: dict) -> None:
    a, o, c, s = m["all"], m["others"], m["collections"], m["slowest_0.1pct"]
    print(f"{m['mode']}: {m['calls']} calls ({m['rows']} rows written), pause: {m['pause']}")
    print(f"  all calls              p50 {a['p50']} µs, p99 {a['p99']} µs, p99.9 {a['p99.9']} µs, "
          f"max {a['max']} µs")
    print(f"  first call of a burst  p50 {m['first_after_pause_p50']} µs (after the pause)")
    print(f"  the other calls        p50 {o['p50']} µs, p99 {o['p99']} µs")
    print(f"  collections            {c['on_caller']} on the calling thread (median {c['caller_median_us']} µs, "
          f"max {c['caller_max_us']} µs), {c['on_other_threads']} on others; by generation {c['by_generation']}")
    print(f"  slowest 0.1 % ({s['n']} calls, from {s['slowest_us']} µs): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(s["causes"].items(), key=lambda kv: -kv[1])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=positive_int, default=20_000, help="enqueue calls per mode (default 20000)")
    ap.add_argument("--burst", type=positive_int, default=64, help="calls per burst (default 64)")
    ap.add_argument("--pause-ms", type=float, default=1.0, help="pause between bursts (default 1 ms)")
    ap.add_argument("--pause", choices=sorted(PAUSES), default="sleep",
                    help="what the caller does in the pause (default sleep; see the module doc)")
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
    return 0 if all(m["rows"] == m["expected_rows"] for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
