"""The store on a loopback S3 server (moto, in its own process): recall, drain, many hosts.

    python scripts/bench_s3.py [--json out.json] [--entries 20000] [--hosts 1,2,4]

* recall p50 with provenance queued / written synchronously / not at all
  (``iai-queue bench`` against the S3 store);
* drain entries/s through the queue vs raw LanceDB appends of the same rows in
  the queue's batch size (256);
* aggregate drain with 1, 2 and 4 host processes (each its own store
  connection, queue and spill directory), rows counted after each;
* store errors and retries the queues saw per 10 000 entries with 4 hosts
  (LanceDB retries commit conflicts between appends itself; what it gives up on
  reaches the queue as a store error and is retried there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DIM = 8


def start_moto() -> tuple[subprocess.Popen, str]:
    from _s3 import S3Server, free_port  # noqa: F401  (free_port)

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3
    from _s3 import ACCESS_KEY, REGION, SECRET_KEY

    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket="bench")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return proc, endpoint


def options(endpoint: str) -> dict:
    from _s3 import storage_options

    return storage_options(endpoint)


def new_uri() -> str:
    return f"s3://bench/{uuid.uuid4().hex[:10]}"


def seed(uri: str, opts: dict, n: int = 1000) -> list:
    from conftest import make_records
    from iai_queue import MemoryStore

    recs = make_records(n)
    MemoryStore(uri, dim=DIM, storage_options=opts, maintenance="never").insert_many(recs)
    return [r.id for r in recs]


def drain_vs_raw(endpoint: str, entries: int) -> dict:
    import pyarrow as pa

    from iai_queue import MemoryStore, ProvenanceWriteQueue

    opts = options(endpoint)
    uri = new_uri()
    ids = seed(uri, opts)
    store = MemoryStore(uri, dim=DIM, storage_options=opts, maintenance="never")
    # raw: the same rows, 256 per LanceDB add, prebuilt
    schema = store._provenance_schema()
    tables = []
    seq = time.time_ns()
    for start in range(0, entries, 256):
        m = min(256, entries - start)
        tables.append(pa.table({"record_id": [str(ids[(start + j) % len(ids)]) for j in range(m)],
                                "entry_id": [f"raw{start + j}" for j in range(m)],
                                "seq": list(range(seq + start, seq + start + m)),
                                "entry": [json.dumps({"n": start + j}) for j in range(m)]}, schema=schema))
    t0 = time.perf_counter()
    for t in tables:
        store._provenance.add(t)
    raw_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as spill:
        q = ProvenanceWriteQueue(store, spill_dir=spill).start()
        t0 = time.perf_counter()
        for start in range(0, entries, 10):
            q.enqueue([(ids[(start + j) % len(ids)], {"n": start + j}) for j in range(min(10, entries - start))])
        ok = q.flush(600)
        drain_s = time.perf_counter() - t0
        q.stop()
    rows = store.provenance_rows()
    return {"entries": entries, "raw_entries_per_s": round(entries / raw_s), "drain_entries_per_s": round(entries / drain_s),
            "ratio": round(raw_s / drain_s, 3), "flushed": ok, "rows": rows, "rows_ok": rows == 2 * entries}


def host_main(a: dict) -> None:
    from iai_queue import MemoryStore, ProvenanceWriteQueue

    store = MemoryStore(a["uri"], dim=DIM, storage_options=a["options"], maintenance="never")
    ids = [uuid.UUID(x) for x in a["ids"]]
    q = ProvenanceWriteQueue(store, spill_dir=a["spill"]).start()
    while time.time() < a["start_at"]:
        time.sleep(0.001)
    t0 = time.time()
    for start in range(0, a["n"], 10):
        q.enqueue([(ids[(start + j) % len(ids)], {"h": a["host"], "n": start + j})
                   for j in range(min(10, a["n"] - start))])
    ok = q.flush(600)
    t1 = time.time()
    q.stop()
    s = q.stats()
    print(json.dumps({"t0": t0, "t1": t1, "ok": ok, "written": s.written, "store_errors": s.store_errors,
                      "retries": s.retries, "spilled": s.spilled_pairs, "dropped": s.dropped}))


def hosts_drain(endpoint: str, hosts: int, per_host: int) -> dict:
    from iai_queue import MemoryStore

    opts = options(endpoint)
    uri = new_uri()
    ids = [str(i) for i in seed(uri, opts)]
    start_at = time.time() + 6.0  # after every host has imported and connected
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, __file__, "--host-json", json.dumps(
            {"uri": uri, "options": opts, "ids": ids, "spill": f"{tmp}/spill{h}", "host": h, "n": per_host,
             "start_at": start_at})], stdout=subprocess.PIPE, text=True) for h in range(hosts)]
        outs = [json.loads(p.communicate(timeout=900)[0].strip().splitlines()[-1]) for p in procs]
    store = MemoryStore(uri, dim=DIM, storage_options=opts, maintenance="never")
    rows = store.provenance_rows()
    total = hosts * per_host
    wall = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    errors = sum(o["store_errors"] for o in outs)
    retries = sum(o["retries"] for o in outs)
    return {"hosts": hosts, "entries": total, "entries_per_s": round(total / wall), "rows": rows,
            "no_loss_no_dup": rows == total and all(o["ok"] and o["dropped"] == 0 for o in outs),
            "store_errors_per_10k": round(errors * 10_000 / total, 2), "retries_per_10k": round(retries * 10_000 / total, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host-json", help=argparse.SUPPRESS)
    ap.add_argument("--entries", type=int, default=20_000)
    ap.add_argument("--per-host", type=int, default=10_000)
    ap.add_argument("--hosts", default="1,2,4")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--recalls", type=int, default=300)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.host_json:
        host_main(json.loads(a.host_json))
        return 0
    try:
        host_counts = [int(x) for x in a.hosts.split(",")]
    except ValueError:
        ap.error(f"--hosts must be a comma-separated list of ints, got {a.hosts!r}")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto, endpoint = start_moto()
    out: dict = {}
    try:
        from iai_queue.bench import recall_benchmark

        with tempfile.TemporaryDirectory() as work:
            r = recall_benchmark(Path(work), records=a.records, recalls=a.recalls, rounds=3, store_uri="s3://bench/recall",
                                 storage_options=options(endpoint), progress=False)
        out["recall_ms_p50"] = {m: r["modes"][m]["recall_ms"]["p50"] for m in r["modes"]}
        out["recall_queued_vs_noop"] = r["ratios"]["queued"]["recall_p50_vs_noop"] if "ratios" in r else None
        out["recall_drain_ok"] = r["drain"]["ok"]
        print(json.dumps({"recall": out}), file=sys.stderr)
        out["drain_vs_raw"] = drain_vs_raw(endpoint, a.entries)
        print(json.dumps(out["drain_vs_raw"]), file=sys.stderr)
        out["hosts"] = []
        for h in host_counts:
            out["hosts"].append(hosts_drain(endpoint, h, a.per_host))
            print(json.dumps(out["hosts"][-1]), file=sys.stderr)
    finally:
        moto.terminate()
        moto.wait(10)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
