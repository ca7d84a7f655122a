"""What allocating per enqueue costs while a worker writes (OTel's ``emit`` allocates nothing, iai_queue two tuples).

Not a queue of ours: three minimal producers of the same shape, each appending
to a deque that one worker thread drains into a real LanceDB store in batches of
up to 256 pairs (``store.append_provenance_batch``), paced as ``bench_peers.py``
paces its calls (bursts of ``--burst``, then ``--pause-ms``). They differ only
in what they allocate per call:

``0 tuples``  append the caller's list itself (OTel's ``BatchProcessor.emit`` keeps the caller's object)
``1 tuple``   append a copy of it (``tuple(pairs)``)
``2 tuples``  append ``(next(number), tuple(pairs))`` (iai_queue's memory-mode chunk: the copy, and
              the chunk with its sequence number)

Each producer is measured with the worker idle (it writes nothing until the
segment is over) and with the worker writing, in ``--rounds`` rounds, the
producers' order rotated each round; p50 per producer and setting. The rows of
the store are counted at the end.

    python scripts/bench_alloc.py [--calls 20000] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iai_queue import MemoryStore  # noqa: E402
from iai_queue.bench import percentiles, seed_store  # noqa: E402
from iai_queue.cli import positive_int  # noqa: E402

BATCH = 256


class Drain:
    """One worker thread: waits for ``wake`` (or 50 ms), then, while ``draining`` is set, writes what the
    deque holds, 256 pairs a write. Cleared, the worker writes nothing (the idle setting)."""

    def __init__(self, store: MemoryStore):
        self.store = store
        self.pending: deque = deque()
        self.wake = threading.Event()
        self.draining = threading.Event()
        self.written = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="bench-alloc-drain", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pending = self.pending
        while not self._stop.is_set():
            self.wake.wait(0.05)
            self.wake.clear()
            while pending and self.draining.is_set():
                pairs: list = []
                while pending and len(pairs) < BATCH:
                    item = pending.popleft()
                    pairs += item[1] if type(item) is tuple and len(item) == 2 and type(item[0]) is int else item
                try:
                    self.store.append_provenance_batch(pairs)
                except Exception as exc:  # recorded and reported: the harness must not hide a failed write
                    self.errors.append(repr(exc)[:300])
                with self._idle:
                    self.written += len(pairs)
                    self._idle.notify_all()

    def wait_written(self, n: int, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self.written >= n, timeout)

    def close(self) -> None:
        self._stop.set()
        self.wake.set()
        self.thread.join(10)


def producers(drain: Drain, writing: bool) -> dict:
    pending, wake, number = drain.pending, drain.wake, itertools.count(1)
    append = pending.append
    # The worker is woken once per batch, as the real queues wake theirs; without it, it waits to be measured.
    threshold = BATCH if writing else 1 << 62

    def none(pairs):
        append(pairs)
        if len(pending) >= threshold and not wake.is_set():
            wake.set()

    def one(pairs):
        append(tuple(pairs))
        if len(pending) >= threshold and not wake.is_set():
            wake.set()

    def two(pairs):
        append((next(number), tuple(pairs)))
        if len(pending) >= threshold and not wake.is_set():
            wake.set()

    return {"0 tuples": none, "1 tuple": one, "2 tuples": two}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=positive_int, default=20_000,
                    help="calls per producer, setting and round (default 20000)")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--burst", type=positive_int, default=64)
    ap.add_argument("--pause-ms", type=float, default=1.0)
    ap.add_argument("--records", type=positive_int, default=1000)
    ap.add_argument("--dim", type=positive_int, default=384)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="iai-bench-alloc-"))
    clock, pause = time.perf_counter_ns, args.pause_ms / 1000
    lat: dict = {}
    enqueued = 0
    try:
        store = MemoryStore(work / "db", dim=args.dim, maintenance="never")
        ids = seed_store(store, args.records, progress=False)
        drain = Drain(store)
        for r in range(args.rounds):
            for writing in (False, True):
                made = list(producers(drain, writing).items())
                for name, produce in made[r % 3:] + made[:r % 3]:
                    if writing:
                        drain.draining.set()
                    else:
                        drain.draining.clear()
                    lists = [[(ids[i % len(ids)], {"ts": "2025-01-01T00:00:00+00:00", "cue": f"{r}{i}",
                                                   "session_id": "b"})] for i in range(args.calls)]
                    out = lat.setdefault((name, writing), [])
                    for start in range(0, args.calls, args.burst):
                        for pairs in lists[start:start + args.burst]:
                            t0 = clock()
                            produce(pairs)
                            out.append(clock() - t0)
                        time.sleep(pause)
                    enqueued += args.calls
                    drain.draining.set()
                    drain.wake.set()  # what is left (or, idle, all of it) is written before the next one
                    if not drain.wait_written(enqueued, 300):
                        raise RuntimeError(f"the worker wrote {drain.written} of {enqueued} pairs in 300 s")
        drain.close()
        rows = store.provenance_rows()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "alloc", "config": vars(args), "rows": rows, "enqueued": enqueued,
              "errors": drain.errors, "p50_us": {}}
    print(f"p50 of one enqueue-shaped call, µs ({args.rounds} rounds x {args.calls} calls; "
          f"the worker writes into LanceDB)")
    print(f"{'producer':10}  {'worker idle':>11}  {'worker writing':>14}")
    for name in ("0 tuples", "1 tuple", "2 tuples"):
        idle, busy = (percentiles(lat[(name, w)])["p50"] for w in (False, True))
        result["p50_us"][name] = {"worker_idle": idle, "worker_writing": busy}
        print(f"{name:10}  {idle:>11}  {busy:>14}")
    ok = rows == enqueued and not drain.errors
    print(f"rows {rows} of {enqueued} enqueued -> {'OK' if ok else 'MISMATCH ' + '; '.join(drain.errors[:3])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
