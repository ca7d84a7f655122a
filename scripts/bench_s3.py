"""The store on a loopback S3 server (moto, in its own process): recall, drain, many hosts.

    python scripts/bench_s3.py [--json out.json] [--entries 50000] [--hosts 1,2,4]
    python scripts/bench_s3.py --breakdown      # only the recall breakdown (~2 min)
    python scripts/bench_s3.py --drain-only     # only drain vs raw

* recall p50 with provenance queued / written synchronously / not at all
  (``iai-queue bench`` against the S3 store);
* the recall breakdown: no-op, queued, no-op while *another process* commits to
  the same server at the queue's rate, and queued with a 500 ms coalesce; with the
  CPU the moto server, this process and the writer used per recall. The loopback
  server shares the machine's cores, and moto lists a prefix by scanning every key
  of its bucket, so every commit anyone makes costs every later read: the
  no-op+writer mode says how much of the queued slowdown is that, not this process;
* drain entries/s through the queue (10-pair calls, enqueued at once, until
  flush) vs raw LanceDB appends of the same rows, in 256-row adds (the queue's
  light-traffic batch) and in 8192-row adds (what it commits under a backlog),
  each side in a fresh bucket, repeated in alternating order;
* aggregate drain with 1, 2 and 4 host processes (each its own store
  connection, queue and spill directory; a fresh bucket per count), rows
  counted after each;
* store errors and retries the queues saw per 10 000 entries with 4 hosts
  (LanceDB retries commit conflicts between appends itself; what it gives up on
  reaches the queue as a store error and is retried there).

The last block printed, ``figures``, holds the issue's figures and ratios.
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


def new_bucket(endpoint: str) -> str:
    """A fresh bucket: moto lists a prefix by scanning every key of its bucket, so keys left by an
    earlier phase would slow every later commit (version listing) and bias whichever side runs second."""
    import boto3
    from _s3 import ACCESS_KEY, REGION, SECRET_KEY

    name = f"b{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=name)
    return f"s3://{name}/t"


def raw_appends(endpoint: str, entries: int, batch: int) -> dict:
    """LanceDB ``add`` of prebuilt Arrow tables, ``batch`` rows each: the floor for the same rows."""
    import pyarrow as pa

    from iai_queue import MemoryStore

    opts = options(endpoint)
    uri = new_bucket(endpoint)
    ids = seed(uri, opts)
    store = MemoryStore(uri, dim=DIM, storage_options=opts, maintenance="never")
    schema = store._provenance_schema()
    tables = []
    seq = time.time_ns()
    for start in range(0, entries, batch):
        m = min(batch, entries - start)
        tables.append(pa.table({"record_id": [str(ids[(start + j) % len(ids)]) for j in range(m)],
                                "entry_id": [f"raw{start + j}" for j in range(m)],
                                "seq": list(range(seq + start, seq + start + m)),
                                "entry": [json.dumps({"n": start + j}) for j in range(m)]}, schema=schema))
    t0 = time.perf_counter()
    for t in tables:
        store._provenance.add(t)
    took = time.perf_counter() - t0
    return {"s": took, "commits": len(tables), "rows_ok": store.provenance_rows() == entries}


def queue_drain(endpoint: str, entries: int) -> dict:
    """The queue, 10-pair enqueue calls as fast as they come, until flush() returns; its commits recorded."""
    from iai_queue import MemoryStore, ProvenanceWriteQueue

    opts = options(endpoint)
    uri = new_bucket(endpoint)
    ids = seed(uri, opts)
    store = MemoryStore(uri, dim=DIM, storage_options=opts, maintenance="never")
    real_append = store.append_provenance_batch
    commits: list[tuple[int, float]] = []  # (pairs, seconds) per store write

    def timed_append(pairs, records_cache=None):  # wrapping the instance's method: the sanctioned seam
        t = time.perf_counter()
        out = real_append(pairs, records_cache)
        commits.append((len(pairs), time.perf_counter() - t))
        return out

    store.append_provenance_batch = timed_append
    calls = [[(ids[(start + j) % len(ids)], {"n": start + j}) for j in range(min(10, entries - start))]
             for start in range(0, entries, 10)]
    with tempfile.TemporaryDirectory() as spill:
        # room for every call in memory: this measures the store drain, not the spill path
        q = ProvenanceWriteQueue(store, spill_dir=spill, max_queue_size=len(calls) + 1).start()
        t0 = time.perf_counter()
        for c in calls:
            q.enqueue(c)
        enqueued = time.perf_counter() - t0
        ok = q.flush(600)
        took = time.perf_counter() - t0
        q.stop()
    sizes = sorted(n for n, _ in commits)
    return {"s": took, "enqueue_s": enqueued, "flushed": ok, "commits": len(commits),
            "batch_pairs_min_median_max": [sizes[0], sizes[len(sizes) // 2], sizes[-1]] if sizes else None,
            "in_store_s": sum(t for _, t in commits), "commit_s": [round(t, 3) for _, t in commits],
            "rows_ok": store.provenance_rows() == entries}


def drain_vs_raw(endpoint: str, entries: int, repeats: int = 2) -> dict:
    """Queue drain vs raw appends of the same rows, each in a fresh bucket, alternating which goes first.

    Raw is measured at the queue's light-traffic batch size (256, the issue's baseline) and at
    the size the queue commits under backlog (``backlog_batch_pairs``, 8192).
    """
    import statistics

    runs: dict = {"raw256": [], "raw8192": [], "queue": []}
    for r in range(repeats):
        order = ["raw256", "queue", "raw8192"] if r % 2 == 0 else ["raw8192", "queue", "raw256"]
        for side in order:
            runs[side].append(queue_drain(endpoint, entries) if side == "queue"
                              else raw_appends(endpoint, entries, int(side[3:])))
    med = {k: statistics.median(x["s"] for x in v) for k, v in runs.items()}
    q = runs["queue"][-1]
    return {"entries": entries, "repeats": repeats,
            "raw_256_entries_per_s": round(entries / med["raw256"]),
            "raw_8192_entries_per_s": round(entries / med["raw8192"]),
            "drain_entries_per_s": round(entries / med["queue"]),
            "ratio": round(med["raw256"] / med["queue"], 3),
            "ratio_vs_raw_8192": round(med["raw8192"] / med["queue"], 3),
            "spread_drain_s": [round(x["s"], 2) for x in runs["queue"]],
            "queue_commits": q["commits"], "queue_batch_pairs_min_median_max": q["batch_pairs_min_median_max"],
            "queue_enqueue_s": round(q["enqueue_s"], 3), "queue_in_store_s": round(q["in_store_s"], 2),
            "queue_commit_s_first_5": q["commit_s"][:5],
            "raw_8192_commit_s_mean": round(statistics.median(x["s"] / x["commits"] for x in runs["raw8192"]), 3),
            "flushed": all(x["flushed"] for x in runs["queue"]),
            "rows_ok": all(x["rows_ok"] for v in runs.values() for x in v)}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def writer_main(a: dict) -> None:
    """An unrelated host: appends ``rows`` provenance rows every ``period_s`` to its own store until stdin closes."""
    import threading

    import pyarrow as pa

    from iai_queue import MemoryStore

    store = MemoryStore(a["uri"], dim=DIM, storage_options=a["options"], maintenance="never")
    ids = [str(i) for i in seed(a["uri"], a["options"], 10)]
    schema = store._provenance_schema()
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print("ready", flush=True)
    n = commits = 0
    while not done.wait(a["period_s"]):
        m = a["rows"]
        store._provenance.add(pa.table({"record_id": [ids[j % len(ids)] for j in range(m)],
                                        "entry_id": [f"w{n + j}" for j in range(m)],
                                        "seq": list(range(n, n + m)),
                                        "entry": ['{"ts":"2026-01-01T00:00:00","cue":"c","session_id":"w"}'] * m},
                                       schema=schema))
        n += m
        commits += 1
    print(json.dumps({"commits": commits}), flush=True)


def recall_breakdown(endpoint: str, moto_pid: int, records: int, recalls: int, rounds: int = 8,
                     writer_period_s: float = 0.5) -> dict:
    """Where the queued recall's extra time on the loopback S3 server comes from.

    Modes, interleaved round by round (rotating who goes first), on one store:
    ``noop`` (provenance dropped), ``queued`` (the write-behind queue), and
    ``noop+writer``: provenance dropped while *another process* commits to the same
    server at about the queue's rate (``k`` rows every ``writer_period_s``, the
    queue's coalesce on an object store); ``queued_coalesce_50ms``: the queue with
    the local default coalesce (the object-store default is 500 ms).
    If ``noop+writer`` slows like ``queued`` does, the cost is the server and the
    shared cores serving commits, not this process (GIL, the queue's Python).
    Per mode: recall p50, commits, and CPU seconds per recall of the moto server,
    of this process and of the writer process.
    """
    import statistics

    from iai_queue import MemoryStore
    from iai_queue.bench import DIM as BENCH_DIM, random_cues, seed_store
    from iai_queue.core import dispatch

    opts = options(endpoint)
    store = MemoryStore(new_uri(), dim=BENCH_DIM, storage_options=opts, maintenance="never")
    seed_store(store, records, progress=False)
    cues = random_cues(recalls * 4 + 3, BENCH_DIM, 1)
    modes = ("noop", "queued", "noop+writer", "queued_coalesce_50ms")
    lat: dict = {m: [] for m in modes}
    cpu: dict = {m: {"moto": 0.0, "self": 0.0, "writer": 0.0} for m in modes}
    commits = dict.fromkeys(modes, 0)
    wall = dict.fromkeys(modes, 0.0)
    real_append = store.append_provenance_batch
    count = [0]

    def counted_append(pairs, records_cache=None):
        count[0] += 1
        return real_append(pairs, records_cache)

    store.append_provenance_batch = counted_append
    for c in cues[:3]:  # warm every path once
        dispatch(store, "memory_recall", {"cue": "warm", "session_id": "b", "cue_embedding": c, "k": 10})
    ci = 3
    per_round = recalls // rounds
    with tempfile.TemporaryDirectory() as spill:
        for r in range(rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in order:
                writer = q = None
                if mode.startswith("queued"):
                    q = store.enable_provenance_queue(spill_dir=spill,
                                                      coalesce_ms=50 if mode.endswith("50ms") else None)
                else:
                    store.append_provenance_batch = lambda pairs, records_cache=None: 0
                if mode == "noop+writer":
                    writer = subprocess.Popen(
                        [sys.executable, __file__, "--writer-json", json.dumps(
                            {"uri": new_uri(), "options": opts, "rows": 10, "period_s": writer_period_s})],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    assert writer.stdout.readline().strip() == "ready"
                c0 = count[0]
                m0, s0 = cpu_s(moto_pid), time.process_time()
                w0 = cpu_s(writer.pid) if writer else 0.0
                t0 = time.perf_counter()
                for _ in range(per_round):
                    args = {"cue": f"cue {ci}", "session_id": "b", "cue_embedding": cues[ci], "k": 10}
                    ci += 1
                    t = time.perf_counter_ns()
                    dispatch(store, "memory_recall", args)
                    lat[mode].append((time.perf_counter_ns() - t) / 1e6)
                wall[mode] += time.perf_counter() - t0
                cpu[mode]["moto"] += cpu_s(moto_pid) - m0
                cpu[mode]["self"] += time.process_time() - s0
                if writer:
                    cpu[mode]["writer"] += cpu_s(writer.pid) - w0
                    writer.stdin.close()
                    commits[mode] += json.loads(writer.stdout.read().strip().splitlines()[-1])["commits"]
                    writer.wait(60)
                if q is not None:
                    commits[mode] += count[0] - c0  # the queue's commits while recalls ran (flush after)
                    q.flush(60)
                    store.disable_provenance_queue(timeout=60)
                else:
                    store.append_provenance_batch = counted_append
    n = per_round * rounds
    noop = statistics.median(lat["noop"])
    out = {m: {"recall_p50_ms": round(statistics.median(lat[m]), 2),
                "vs_noop": round(statistics.median(lat[m]) / noop, 3),
                "commits_per_s": round(commits[m] / wall[m], 1),
                "cpu_ms_per_recall": {k: round(v * 1000 / n, 2) for k, v in cpu[m].items()}} for m in modes}
    out["queued_vs_noop_with_the_same_commits_from_another_process"] = round(
        statistics.median(lat["queued"]) / statistics.median(lat["noop+writer"]), 3)
    return out


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
    uri = new_bucket(endpoint)
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


def figures(out: dict) -> dict:
    """The issue's figures and ratios, against their targets, from whatever parts ran."""
    f: dict = {}
    if "recall_queued_vs_noop" in out:
        f["recall p50 queued vs no-op (target <= 1.05)"] = out["recall_queued_vs_noop"]
    b = out.get("recall_breakdown")
    if b:
        f["recall p50 queued vs no-op, breakdown run"] = b["queued"]["vs_noop"]
        f["recall p50 no-op while another process commits vs no-op"] = b["noop+writer"]["vs_noop"]
        f["recall p50 queued vs no-op under the same commits from another process"] = \
            b["queued_vs_noop_with_the_same_commits_from_another_process"]
        f["recall p50 queued with a 50 ms coalesce (the local default) vs no-op"] = b["queued_coalesce_50ms"]["vs_noop"]
        f["commits/s: queued / no-op+writer / queued 50 ms"] = [
            b[m]["commits_per_s"] for m in ("queued", "noop+writer", "queued_coalesce_50ms")]
        f["moto CPU ms per recall: no-op / queued / no-op+writer / queued 50 ms"] = [
            b[m]["cpu_ms_per_recall"]["moto"] for m in ("noop", "queued", "noop+writer", "queued_coalesce_50ms")]
    d = out.get("drain_vs_raw")
    if d:
        f["drain vs raw 256-row appends (target >= 0.5)"] = d["ratio"]
        f["drain vs raw appends in the queue's backlog batch (8192)"] = d["ratio_vs_raw_8192"]
    for h in out.get("hosts", []):
        f[f"aggregate drain, {h['hosts']} host(s), entries/s (no loss: {h['no_loss_no_dup']})"] = h["entries_per_s"]
        if h["hosts"] == 4:
            f["4 hosts: store errors / retries per 10 000 entries"] = [h["store_errors_per_10k"], h["retries_per_10k"]]
    return f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host-json", help=argparse.SUPPRESS)
    ap.add_argument("--writer-json", help=argparse.SUPPRESS)
    ap.add_argument("--drain-only", action="store_true", help="only the drain vs raw figure")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the recall breakdown: noop / queued / noop while another process commits")
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--per-host", type=int, default=10_000)
    ap.add_argument("--hosts", default="1,2,4")
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--recalls", type=int, default=300)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.host_json:
        host_main(json.loads(a.host_json))
        return 0
    if a.writer_json:
        writer_main(json.loads(a.writer_json))
        return 0
    try:
        host_counts = [int(x) for x in a.hosts.split(",")]
    except ValueError:
        ap.error(f"--hosts must be a comma-separated list of ints, got {a.hosts!r}")
    for name in ("entries", "per_host", "records", "recalls"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if any(h < 1 for h in host_counts):
        ap.error(f"--hosts must list counts >= 1, got {a.hosts!r}")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto, endpoint = start_moto()
    out: dict = {}
    try:
        if a.drain_only:
            out["drain_vs_raw"] = drain_vs_raw(endpoint, a.entries)
        elif a.breakdown:
            out["recall_breakdown"] = recall_breakdown(endpoint, moto.pid, a.records, a.recalls)
        else:
            from iai_queue.bench import recall_benchmark

            with tempfile.TemporaryDirectory() as work:
                r = recall_benchmark(Path(work), records=a.records, recalls=a.recalls, rounds=3,
                                     store_uri=new_bucket(endpoint), storage_options=options(endpoint), progress=False)
            out["recall_ms_p50"] = {m: r["modes"][m]["recall_ms"]["p50"] for m in r["modes"]}
            out["recall_queued_vs_noop"] = r["ratios"]["queued"]["recall_p50_vs_noop"]
            out["recall_drain_ok"] = r["drain"]["ok"]
            print(json.dumps({"recall": out}), file=sys.stderr)
            out["recall_breakdown"] = recall_breakdown(endpoint, moto.pid, a.records, a.recalls)
            print(json.dumps(out["recall_breakdown"]), file=sys.stderr)
            out["drain_vs_raw"] = drain_vs_raw(endpoint, a.entries)
            print(json.dumps(out["drain_vs_raw"]), file=sys.stderr)
            out["hosts"] = []
            for h in host_counts:
                out["hosts"].append(hosts_drain(endpoint, h, a.per_host))
                print(json.dumps(out["hosts"][-1]), file=sys.stderr)
    finally:
        moto.terminate()
        moto.wait(10)
    out["figures"] = figures(out)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
