"""Write-ahead journal benchmarks, side by side in one run (issue 11).

    python scripts/bench_journal.py [--calls 20000] [--recovery 200000] [--repeat 3] [--json out.json]

Figures: enqueue p50/p99/p99.9 (1 pair per call, the worker writing to a real LanceDB
store) in memory / process / fsync-interval / fsync-always modes, and in process mode
with segments written by ``pwrite`` instead of the shared mapping (``process-pwrite``,
what the mapping saves); persist-queue's
file ``Queue.put`` and ``SQLiteAckQueue.put`` on the same entries (``pip install
-e .[bench]``); orjson vs msgspec for the journal record encode; drain time of a
backlog in journal vs memory mode; replay of a journal this process wrote and
stopped (entries/s, peak RSS) — every batch is verified against the store, as for
a stopped queue of the same process; a dead writer's journal (the recovery after a
crash, one range lookup per segment) is ``scripts/bench_journal_recovery.py``.
Each figure is measured ``--repeat`` times; the table shows the median and the
min–max spread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iai_queue import MemoryRecord, MemoryStore, ProvenanceWriteQueue  # noqa: E402
from iai_queue.bench import percentiles  # noqa: E402

DIM = 8


def new_store(d: Path, n_records: int = 16):
    store = MemoryStore(d / "db", dim=DIM, maintenance="never")  # the queue is measured, not the store's upkeep
    ids = [uuid.uuid4() for _ in range(n_records)]
    store.insert_many([MemoryRecord(id=i, text="r", embedding=[0.1] * DIM) for i in ids])
    return store, ids


def entry(k: int) -> dict:
    return {"tool": "memory_recall", "query": "what did we decide", "k": 10, "n": k}


def enqueue_latency(mode: str, calls: int) -> dict:
    from iai_queue.journal import writer as journal_writer

    mapped = journal_writer.MAPPED
    if mode == "process-pwrite":
        mode, journal_writer.MAPPED = "process", False
    try:
        return _enqueue_latency(mode, calls)
    finally:
        journal_writer.MAPPED = mapped


def _enqueue_latency(mode: str, calls: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        store, ids = new_store(Path(d))
        q = ProvenanceWriteQueue(store, spill_dir=Path(d) / "spill", durability=mode).start()
        samples = []
        clock = time.perf_counter_ns
        for k in range(calls):
            pairs = [(ids[k % len(ids)], entry(k))]
            t0 = clock()
            q.enqueue(pairs)
            samples.append(clock() - t0)
            if k % 200 == 199:
                time.sleep(0.002)  # the worker keeps up: a recall server's pace, not a flood
        q.flush(60)
        q.stop(10)
        return percentiles(samples)


def persist_queue_put(kind: str, calls: int) -> dict:
    import persistqueue

    with tempfile.TemporaryDirectory() as d:
        rid = str(uuid.uuid4())
        if kind == "file":
            pq = persistqueue.Queue(os.path.join(d, "q"), autosave=True)
        else:
            pq = persistqueue.SQLiteAckQueue(os.path.join(d, "q"), multithreading=True)
        samples = []
        clock = time.perf_counter_ns
        for k in range(calls):
            item = (rid, entry(k))
            t0 = clock()
            pq.put(item)
            samples.append(clock() - t0)
        return percentiles(samples)


def encoders(n: int = 50000) -> dict:
    import msgspec
    import orjson

    from iai_queue.jsoncodec import encode

    items = ((uuid.uuid4(), entry(1)),)
    out = {}
    enc = msgspec.json.Encoder()
    for name, fn in (("orjson (jsoncodec.encode)", lambda s: encode((s, items))),
                     ("orjson.dumps direct", lambda s: orjson.dumps((s, items))),
                     ("msgspec.json", lambda s: enc.encode((s, items)))):
        t0 = time.perf_counter_ns()
        for s in range(n):
            fn(s)
        out[name] = round((time.perf_counter_ns() - t0) / n / 1000, 3)
    return out


def drain(mode: str, calls: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        store, ids = new_store(Path(d))
        real = store.append_provenance_batch
        gate = threading.Event()

        def gated(pairs, records_cache=None):
            gate.wait(60)
            return real(pairs, records_cache=records_cache)

        store.append_provenance_batch = gated
        q = ProvenanceWriteQueue(store, spill_dir=Path(d) / "spill", durability=mode).start()
        for k in range(calls):
            q.enqueue([(ids[k % len(ids)], entry(k))])
        t0 = time.perf_counter()
        gate.set()
        ok = q.flush(300)
        took = time.perf_counter() - t0
        q.stop(10)
        assert ok and store.provenance_rows() == calls, (ok, store.provenance_rows())
        return took


def recovery(entries: int) -> dict:
    from iai_queue.journal import Durability, JournalWriter
    from iai_queue.spill import SpillDirectory
    from iai_queue.writebehind.journal_replay import JournalReplayer
    from iai_queue.writebehind.lifecycle import StopSignal

    with tempfile.TemporaryDirectory() as d:
        store, ids = new_store(Path(d))
        spill = Path(d) / "spill"
        sd = SpillDirectory(spill, store_path=store.path)
        w = JournalWriter(sd, "qbench-", Durability.PROCESS)
        w.open()
        with w.lock:
            for k in range(entries):
                w.append_locked(k + 1, ((ids[k % len(ids)], entry(k)),))
        for s in w.segments:
            os.close(s.fd)
        sd.release()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        JournalReplayer.for_store(store, spill).replay_all(StopSignal())
        took = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert store.provenance_rows() == entries
        return {"entries_per_s": round(entries / took), "seconds": round(took, 2),
                "peak_rss_mib": round(rss1 / 1024, 1), "rss_growth_mib": round((rss1 - rss0) / 1024, 1)}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--pq-calls", type=int, default=2000)
    ap.add_argument("--drain-calls", type=int, default=20000)
    ap.add_argument("--recovery", type=int, default=200000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    runs: dict[str, list] = {}
    for _ in range(args.repeat):
        for mode in ("memory", "process", "process-pwrite", "fsync-interval", "fsync-always"):
            calls = args.calls if mode != "fsync-always" else max(200, args.calls // 50)
            runs.setdefault(f"enqueue {mode}", []).append(enqueue_latency(mode, calls))
        for kind in ("file", "sqlite-ack"):
            runs.setdefault(f"persist-queue {kind} put", []).append(persist_queue_put(kind, args.pq_calls))
        runs.setdefault("encode", []).append(encoders())
        for mode in ("memory", "process"):
            runs.setdefault(f"drain {mode}", []).append(drain(mode, args.drain_calls))
        runs.setdefault("recovery", []).append(recovery(args.recovery))
    print(f"write-ahead journal benchmarks, {args.repeat} runs, median (min–max); shared 2-core machine\n")
    for name, rs in runs.items():
        if name.startswith(("enqueue", "persist")):
            print(f"{name:34s} p50 µs {spread([r['p50'] for r in rs]):24s} p99 µs {spread([r['p99'] for r in rs]):24s}"
                  f" p99.9 µs {spread([r['p99.9'] for r in rs])}")
    mem = statistics.median(r["p50"] for r in runs["enqueue memory"])
    proc = statistics.median(r["p50"] for r in runs["enqueue process"])
    print(f"{'journal/memory p50 ratio':34s} {proc / mem:.2f}x")
    for kind in ("file", "sqlite-ack"):
        pq = statistics.median(r["p50"] for r in runs[f"persist-queue {kind} put"])
        print(f"{'persist-queue ' + kind + ' / journal p50':34s} {pq / proc:.0f}x")
    for name in runs["encode"][0]:
        print(f"{'encode ' + name:34s} µs {spread([r[name] for r in runs['encode']])}")
    dm, dp = runs["drain memory"], runs["drain process"]
    print(f"{'drain ' + str(args.drain_calls) + ' memory s':34s} {spread(dm)}")
    print(f"{'drain ' + str(args.drain_calls) + ' process s':34s} {spread(dp)}  "
          f"(journal speed = {statistics.median(dm) / statistics.median(dp):.2f}x memory)")
    rec = runs["recovery"]
    print(f"{'own-process replay ' + str(args.recovery) + '/s':34s} {spread([r['entries_per_s'] for r in rec])}  "
          f"peak RSS MiB {spread([r['peak_rss_mib'] for r in rec])}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
