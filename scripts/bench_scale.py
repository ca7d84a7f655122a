"""get() as the provenance table grows, maintain() cost, and get() while writes and maintenance run.

    python scripts/bench_scale.py --rows 1000000 [--index btree|bitmap] [--steady-s 20] [--json out.json]

Builds a local store of ``--records`` 8-d records and ``--rows`` provenance rows
(appended in 8 192-row batches, like a long-lived server's table before any
maintenance), then reports:

* get() p50/p99 before maintain(), maintain() seconds, get() p50/p99 after
  (after a second run ``VERSION_GRACE_S`` later, which prunes the versions the
  first one saw superseded, as every run of a server that has been up does);
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
from iai_queue.store_maintenance import VERSION_GRACE_S  # noqa: E402


def build(store: MemoryStore, records: int, rows: int, seed: int, batch: int = 8192) -> list[str]:
    """``records`` records, then ``rows`` provenance rows in ``batch``-row appends (columns built in Arrow, no
    Python per row: the build is bound by LanceDB's commits, not by string formatting)."""
    import uuid

    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)

    rnd = random.Random(seed)
    ids = [uuid.UUID(int=rnd.getrandbits(128), version=4) for _ in range(records)]
    emb = rng.standard_normal((records, store.dim), dtype=np.float32).tolist()
    for start in range(0, records, 5000):
        store.insert_many([MemoryRecord(id=ids[i], text=f"r{i}", embedding=emb[i])
                           for i in range(start, min(records, start + 5000))])
    sids = [str(i) for i in ids]
    sid_array = pa.array(sids, pa.string())
    schema = store._provenance_schema()
    seq = time.time_ns()
    t0 = time.perf_counter()
    for start in range(0, rows, batch):
        m = min(batch, rows - start)
        n = np.arange(start, start + m, dtype=np.int64)
        text_n = pa.array(n).cast(pa.string())
        session = pa.array(n % 97).cast(pa.string())
        store._provenance.add(pa.Table.from_arrays([
            sid_array.take(pa.array(rng.integers(0, records, m))),
            pc.binary_join_element_wise("b", text_n, ""),
            pa.array(seq + n),
            pc.binary_join_element_wise('{"ts":"2026-01-01T00:00:00","cue":"cue ', text_n, '","session_id":"s',
                                        session, '"}', ""),
        ], schema=schema))
        print(f"\rbuilding {start + m}/{rows} rows ({time.perf_counter() - t0:.0f}s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    return sids


def fragments(store: MemoryStore) -> int:
    return store._provenance.stats()["fragment_stats"]["num_fragments"]


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
    commit_s: list[tuple[float, bool]] = []  # (seconds inside append_provenance_batch, maintenance running)
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
            pairs = [(rnd.choice(uids), {"k": k + j}) for j in range(256)]
            c0 = time.perf_counter()
            try:
                store.append_provenance_batch(pairs)
            except Exception as exc:
                errors.append(repr(exc)[:200])
            k += 256
            now = time.perf_counter()
            gaps.append((now - last, was_running or running["flag"]))
            commit_s.append((now - c0, was_running or running["flag"]))
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
    during: list[float] = []  # the get()s that overlapped a maintenance run
    while time.perf_counter() < end:
        was_running = running["flag"]
        t0 = time.perf_counter()
        store.get(rnd.choice(ids))
        took = (time.perf_counter() - t0) * 1000
        samples.append(took)
        if was_running or running["flag"]:
            during.append(took)
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
            "gets": len(samples),
            "get_p50_ms_during_maintenance": round(statistics.median(during), 2) if during else None,
            "gets_during_maintenance": len(during),
            "maintenance_runs": st.runs, "maintenance_longest_s": st.longest_run_s,
            "commit_period_ms": round(period * 1000, 1),
            "longest_gap_ms_during_maintenance": round(max(with_m) * 1000, 1) if with_m else None,
            "longest_gap_ms_otherwise": round(max(without) * 1000, 1) if without else None,
            "longest_commit_ms_during_maintenance": round(max((c for c, m in commit_s if m), default=0) * 1000, 1),
            "longest_commit_ms_otherwise": round(max((c for c, m in commit_s if not m), default=0) * 1000, 1),
            "median_commit_ms_during_maintenance / otherwise": [
                round(statistics.median([c for c, m in commit_s if m] or [0]) * 1000, 1),
                round(statistics.median([c for c, m in commit_s if not m] or [0]) * 1000, 1)],
            "p99_gap_ms_during_maintenance": round(sorted(with_m)[int(0.99 * (len(with_m) - 1))] * 1000, 1) if with_m else None}


def figures(out: dict) -> dict:
    """The issue's figures and ratios against their targets."""
    after = out["after"]["p50_ms"]
    f = {f"get() p50 ms at {out['rows']} rows, maintained (target <= 15 at 10 M)": after,
         "get() p50 ms before maintain()": out.get("before", {}).get("p50_ms"),
         "maintain() s": out["maintain_s"]}
    st = out.get("steady")
    if st:
        f["get() p50 under steady writes vs maintained (target <= 2)"] = round(st["get_p50_ms"] / after, 2)
        gap = st["longest_gap_ms_during_maintenance"]
        f["longest commit gap while maintenance ran, in commit periods (target <= 1 beyond the period)"] = (
            round(gap / st["commit_period_ms"] - 1, 2) if gap is not None else None)
        f["longest commit gap otherwise, in commit periods beyond the period"] = (
            round(st["longest_gap_ms_otherwise"] / st["commit_period_ms"] - 1, 2)
            if st["longest_gap_ms_otherwise"] is not None else None)
        f["maintenance runs completed during the steady phase"] = st["maintenance_runs"]
    return f


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
    ap.add_argument("--build-batch", type=int, default=8192, help="rows per append while building")
    ap.add_argument("--dir", help="where the store goes (default: a new temporary directory)")
    ap.add_argument("--reuse", action="store_true",
                    help="measure the store already in --dir (built by an earlier run) instead of building one")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.rows < 1 or a.records < 1 or a.build_batch < 1:
        ap.error("--rows, --records and --build-batch must be >= 1")
    if a.reuse and not (a.dir and (Path(a.dir) / "db").is_dir()):
        ap.error(f"--reuse needs --dir holding a store built earlier, got {a.dir!r}")
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="iai-scale-"))
    policy = MaintenancePolicy(rows_threshold=a.threshold, idle_s=5.0, poll_s=0.2)
    store = MemoryStore(work / "db", dim=8, maintenance=policy)
    t_build = time.perf_counter()
    if a.reuse:
        ids = store._records.to_arrow().column("id").to_pylist()
    else:
        ids = build(store, a.records, a.rows, a.seed, a.build_batch)
    build_s = round(time.perf_counter() - t_build, 1)
    if a.index == "bitmap":
        from lancedb.index import Bitmap

        store._provenance.create_index("record_id", config=Bitmap(), replace=False)
    out: dict = {"rows": store.provenance_rows(), "records": len(ids), "index": a.index, "build_s": build_s,
                 "fragments_before": fragments(store)}
    print(json.dumps(out), file=sys.stderr)
    if a.gets_before > 0:
        out["before"] = get_p(store, ids, a.gets_before, a.seed)
        print(json.dumps(out["before"]), file=sys.stderr)
    t0 = time.perf_counter()
    store.maintain()
    out["maintain_s"] = round(time.perf_counter() - t0, 2)
    # A process prunes versions it has seen superseded for VERSION_GRACE_S (its own clock): a server
    # that has been up prunes on every run; this fresh process gets there with its second run.
    time.sleep(VERSION_GRACE_S)
    t0 = time.perf_counter()
    store.maintain()
    out["second_maintain_s"] = round(time.perf_counter() - t0, 2)
    out["fragments_after"] = fragments(store)
    out["after"] = get_p(store, ids, a.gets, a.seed + 7)
    if a.steady_s > 0:
        out["steady"] = steady(store, ids, a.steady_s, a.steady_rate, a.seed)
    store.close()
    out["figures"] = figures(out)
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
