"""Issue 4, benchmark 3: drain throughput of the queue vs raw LanceDB appends vs merge_insert.

* queue:  ``--entries`` provenance entries over ``--records`` records, enqueued in
  ``--pairs``-pair calls as fast as the caller can; timed from the first enqueue
  until ``flush()`` returns (max_queue_size is set above ``--entries``: nothing spills).
* raw:    ``lancedb`` ``table.add`` of the same rows (record_id, entry_id, seq,
  entry JSON) in 256-row batches, sliced from one prebuilt Arrow table: LanceDB alone.
* merge_insert: the old design, a JSON ``provenance`` column on the records table,
  read-modify-write per ``--merge-batch`` entries (default 10, one recall's worth, as the old design wrote) (select the rows, append, ``merge_insert``
  on id). It slows as the column grows; it runs for ``--merge-seconds`` and the
  rate so far is reported.

queue and raw run in ``--rounds`` alternating rounds on fresh stores; figures are
total entries / total seconds.

    python scripts/bench_drain.py [--entries 100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lancedb
import pyarrow as pa

from iai_queue import MemoryStore
from iai_queue.bench import print_table, report_targets, seed_store

ENTRY = {"ts": "2025-01-01T00:00:00+00:00", "cue": "what did we decide about the cache", "session_id": "bench"}


def entries(n: int):
    return [dict(ENTRY, n=i) for i in range(n)]


def run_queue(work: Path, args, ids) -> dict:
    store = MemoryStore(work / "db", dim=args.dim, maintenance="never")
    seed_store(store, args.records, seed=args.seed, progress=False, chunk=args.records)
    ents = entries(args.entries)
    calls = [[(ids[(i + j) % len(ids)], ents[i + j]) for j in range(min(args.pairs, args.entries - i))]
             for i in range(0, args.entries, args.pairs)]
    q = store.enable_provenance_queue(spill_dir=work / "spill", max_queue_size=args.entries + 1)
    before = store.provenance_rows()
    t0 = time.perf_counter()
    for c in calls:
        q.enqueue(c)
    t_enq = time.perf_counter() - t0
    ok = q.flush(timeout=600)
    dt = time.perf_counter() - t0
    st = q.stats()
    store.disable_provenance_queue()
    landed = store.provenance_rows() - before
    return {"seconds": dt, "enqueue_seconds": t_enq, "entries": args.entries, "written": st.written,
            "landed": landed, "ok": ok and landed == args.entries == st.written, "writes": None}


def run_raw(work: Path, args, ids) -> dict:
    db = lancedb.connect(work / "raw")
    schema = MemoryStore._provenance_schema()
    tbl = db.create_table("provenance", schema=schema)
    n = args.entries
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    rid = [str(ids[i % len(ids)]) for i in range(n)]
    data = pa.table({"record_id": rid, "entry_id": [f"raw-{i}" for i in range(n)],
                     "seq": pa.array(range(n), pa.int64()), "entry": [dumps(e) for e in entries(n)]},
                    schema=schema)
    t0 = time.perf_counter()
    for start in range(0, n, 256):
        tbl.add(data.slice(start, 256))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "entries": n, "landed": tbl.count_rows(), "ok": tbl.count_rows() == n}


def run_merge_insert(work: Path, args, ids) -> dict:
    import numpy as np

    db = lancedb.connect(work / "merge")
    schema = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("text", pa.string()),
                        pa.field("embedding", pa.list_(pa.float32(), args.dim)), pa.field("provenance", pa.string())])
    rng = np.random.default_rng(args.seed)
    emb = rng.standard_normal((len(ids), args.dim), dtype=np.float32)
    tbl = db.create_table("records", data=pa.table({
        "id": [str(i) for i in ids], "text": [f"record {i}" for i in range(len(ids))],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), args.dim),
        "provenance": ["[]"] * len(ids)}, schema=schema), schema=schema)
    ents = entries(args.entries)
    done = 0
    t0 = time.perf_counter()
    while done < args.entries and time.perf_counter() - t0 < args.merge_seconds:
        batch = [(str(ids[(done + j) % len(ids)]), ents[done + j]) for j in range(min(args.merge_batch, args.entries - done))]
        by_id: dict[str, list] = {}
        for rid, e in batch:
            by_id.setdefault(rid, []).append(e)
        quoted = ", ".join(f"'{r}'" for r in by_id)
        rows = tbl.search().where(f"id IN ({quoted})").limit(None).to_arrow()
        prov = [json.dumps(json.loads(p) + by_id[r]) for r, p in
                zip(rows.column("id").to_pylist(), rows.column("provenance").to_pylist())]
        rows = rows.set_column(rows.schema.get_field_index("provenance"), "provenance", pa.array(prov, pa.string()))
        (tbl.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(rows))
        done += len(batch)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "entries": done, "ok": True}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--pairs", type=int, default=10, help="pairs per enqueue call (default 10)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--merge-seconds", type=float, default=10.0)
    ap.add_argument("--merge-batch", type=int, default=10,
                    help="entries per read-modify-write (default 10: the old design wrote once per recall)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    from iai_queue.bench import random_ids

    ids = random_ids(args.records, args.seed)
    work = Path(tempfile.mkdtemp(prefix="iai-bench-drain-"))
    res = {"queue": [], "raw": []}
    try:
        for r in range(args.rounds):
            for name in (("raw", "queue") if r % 2 == 0 else ("queue", "raw")):
                d = work / f"{name}{r}"
                d.mkdir()
                res[name].append((run_queue if name == "queue" else run_raw)(d, args, ids))
                print(f"{name} round {r + 1}: {res[name][-1]['entries'] / res[name][-1]['seconds']:,.0f} entries/s",
                      file=sys.stderr)
        (work / "merge").mkdir()
        merge = run_merge_insert(work / "merge", args, ids)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(runs):
        return sum(x["entries"] for x in runs) / sum(x["seconds"] for x in runs)

    out = {"benchmark": "drain", "config": vars(args) | {"json": None},
           "queue": {"entries_per_s": round(rate(res["queue"])), "runs": res["queue"]},
           "raw": {"entries_per_s": round(rate(res["raw"])), "runs": res["raw"]},
           "merge_insert": {"entries_per_s": round(rate([merge])), "runs": [merge]}}
    q, raw, mi = (out[k]["entries_per_s"] for k in ("queue", "raw", "merge_insert"))
    out["ratio"] = {"queue_vs_raw": round(q / raw, 3), "queue_vs_merge_insert": round(q / mi, 1)}
    out["ok"] = all(x["ok"] for x in res["queue"] + res["raw"])
    out["targets"] = {"drain_ge_0.5x_raw": out["ratio"]["queue_vs_raw"] >= 0.5,
                      "drain_ge_10x_merge_insert": out["ratio"]["queue_vs_merge_insert"] >= 10}
    print(f"drain: {args.entries} entries over {args.records} records, enqueued in {args.pairs}-pair calls; "
          f"{args.rounds} alternating rounds")
    print_table(["writer", "entries/s", "seconds (per run)", "queue / this"],
                [["queue (enqueue -> flush)", q, " ".join(f"{x['seconds']:.2f}" for x in res["queue"]), 1.0],
                 ["raw lancedb add, 256 rows", raw, " ".join(f"{x['seconds']:.2f}" for x in res["raw"]),
                  out["ratio"]["queue_vs_raw"]],
                 [f"merge_insert RMW, {args.merge_batch}/write ({merge['entries']} entries)", mi, f"{merge['seconds']:.2f}",
                  out["ratio"]["queue_vs_merge_insert"]]])
    print("all entries landed: " + ("OK" if out["ok"] else "MISMATCH"))
    report_targets(out, args.json)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
