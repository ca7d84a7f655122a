"""get() as the provenance table grows, maintain() cost, and get() while writes and maintenance run.

    python scripts/bench_scale.py --rows 1000000 [--index btree|bitmap] [--steady-s 20] [--json out.json]

Builds a local store of ``--records`` 8-d records and ``--rows`` provenance rows
(appended in 8 192-row batches, like a long-lived server's table before any
maintenance), then reports:

* get() p50/p99 before maintain(), maintain() seconds, get() p50/p99 after;
* steady writes (``--steady-rate`` rows/s in 256-row commits, the queue's batch
  size) with the store's background scheduler maintaining by rows
  (``--threshold``): get() p50/p99 meanwhile, maintenance runs, and the longest
  gap between two commits with and without maintenance running (the pause
  maintenance causes the writer).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iai_queue import MemoryRecord, MemoryStore  # noqa: E402
from iai_queue.maintenance import MaintenancePolicy  # noqa: E402


def build(store: MemoryStore, records: int, rows: int, seed: int) -> list[str]:
    import uuid

    rng = np.random.default_rng(seed)

    rnd = random.Random(seed)
    ids = [uuid.UUID(int=rnd.getrandbits(128), version=4) for _ in range(records)]
    emb = rng.standard_normal((records, store.dim), dtype=np.float32).tolist()
    for start in range(0, records, 5000):
        store.insert_many([MemoryRecord(id=ids[i], text=f"r{i}", embedding=emb[i])
                           for i in range(start, min(records, start + 5000))])
    sids = [str(i) for i in ids]
    schema = store._provenance_schema()
    seq = time.time_ns()
    t0 = time.perf_counter()
    for start in range(0, rows, 8192):
        m = min(8192, rows - start)
        pick = rng.integers(0, records, m)
        store._provenance.add(pa.Table.from_arrays([
            pa.array([sids[i] for i in pick], pa.string()),
            pa.array([f"b{start + j}" for j in range(m)], pa.string()),
            pa.array(np.arange(seq + start, seq + start + m, dtype=np.int64)),
            pa.array([f'{{"ts":"2026-01-01T00:00:00","cue":"cue {start + j}","session_id":"s{j % 97}"}}'
                      for j in range(m)], pa.string()),
        ], schema=schema))
        print(f"\rbuilding {start + m}/{rows} rows ({time.perf_counter() - t0:.0f}s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    return sids


def get_p(store: MemoryStore, ids: list[str], n: int, seed: int) -> dict:
    rnd = random.Random(seed)
    samples = []
    for _ in range(n):
        rid = rnd.choice(ids)
        t0 = time.perf_counter()
        store.get(rid)
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 2), "p99_ms": round(samples[int(0.99 * (len(samples) - 1))], 2),
            "n": n}


def steady(store: MemoryStore, ids: list[str], seconds: float, rate: float, seed: int) -> dict:
    """Writes at ``rate`` rows/s in 256-row commits while get() is sampled; gaps between commits recorded."""
    from uuid import UUID

    uids = [UUID(i) for i in ids]
    stop = threading.Event()
    gaps: list[tuple[float, bool]] = []  # (seconds since the previous commit ended, maintenance running)
    written = [0]
    errors: list[str] = []
    running = {"flag": False}
    real_maintain = MemoryStore.maintain

    def writer():
        rnd = random.Random(seed)
        last = time.perf_counter()
        period = 256 / rate
        nxt = last
        k = 0
        while not stop.is_set():
            nxt += period
            pause = nxt - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            was_running = running["flag"]
            try:
                store.append_provenance_batch([(rnd.choice(uids), {"k": k + j}) for j in range(256)])
            except Exception as exc:
                errors.append(repr(exc)[:200])
            k += 256
            now = time.perf_counter()
            gaps.append((now - last, was_running or running["flag"]))
            last = now
            written[0] = k

    def flagged_maintain(self):
        running["flag"] = True
        try:
            real_maintain(self)
        finally:
            running["flag"] = False

    store._scheduler._maintain = flagged_maintain
    w = threading.Thread(target=writer, daemon=True)
    w.start()
    samples = []
    rnd = random.Random(seed + 1)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        store.get(rnd.choice(ids))
        samples.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.01)
    stop.set()
    w.join(60)
    samples.sort()
    period = 256 / rate
    with_m = [g for g, m in gaps if m]
    without = [g for g, m in gaps if not m]
    st = store.maintenance_stats()
    return {"seconds": seconds, "rows_written": written[0], "write_errors": len(errors),
            "get_p50_ms": round(statistics.median(samples), 2), "get_p99_ms": round(samples[int(0.99 * (len(samples) - 1))], 2),
            "gets": len(samples), "maintenance_runs": st.runs, "maintenance_longest_s": st.longest_run_s,
            "commit_period_ms": round(period * 1000, 1),
            "longest_gap_ms_during_maintenance": round(max(with_m) * 1000, 1) if with_m else None,
            "longest_gap_ms_otherwise": round(max(without) * 1000, 1) if without else None,
            "p99_gap_ms_during_maintenance": round(sorted(with_m)[int(0.99 * (len(with_m) - 1))] * 1000, 1) if with_m else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--index", choices=("btree", "bitmap"), default="btree")
    ap.add_argument("--gets", type=int, default=200)
    ap.add_argument("--gets-before", type=int, default=30)
    ap.add_argument("--steady-s", type=float, default=20.0)
    ap.add_argument("--steady-rate", type=float, default=5000.0, help="rows/s written during the steady phase")
    ap.add_argument("--threshold", type=int, default=50_000, help="rows between background maintenance runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.rows < 1 or a.records < 1:
        ap.error("--rows and --records must be >= 1")
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="iai-scale-"))
    policy = MaintenancePolicy(rows_threshold=a.threshold, idle_s=5.0, poll_s=0.2)
    store = MemoryStore(work / "db", dim=8, maintenance=policy)
    ids = build(store, a.records, a.rows, a.seed)
    if a.index == "bitmap":
        from lancedb.index import Bitmap

        store._provenance.create_index("record_id", config=Bitmap(), replace=False)
    out: dict = {"rows": a.rows, "records": a.records, "index": a.index}
    out["before"] = get_p(store, ids, a.gets_before, a.seed)
    t0 = time.perf_counter()
    store.maintain()
    out["maintain_s"] = round(time.perf_counter() - t0, 2)
    out["after"] = get_p(store, ids, a.gets, a.seed + 7)
    if a.steady_s > 0:
        out["steady"] = steady(store, ids, a.steady_s, a.steady_rate, a.seed)
    store.close()
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
