"""A memory-server host for the object-store tests, run as ``python tests/_s3_host.py <json args>``.

Opens its own MemoryStore on the S3 URI (never ``fork``), its own queue on its
own spill directory, and appends ``{"h": host, "n": k}`` round-robin over the
record ids until ``n`` entries or ``duration_s`` have gone by. Reports JSON lines
on stdout: ``started``, ``commit`` (a store write begins, with its ``n`` values),
``spilled`` (``n`` values now durable in a spill file), ``enqueued``, ``done``.
With ``maintain_every_s`` it also runs ``store.maintain()`` on a thread of its own.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIM = 8


def say(**ev) -> None:
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def main(a: dict) -> None:
    from iai_queue import MemoryStore, ProvenanceWriteQueue

    store = MemoryStore(a["uri"], dim=DIM, storage_options=a["options"], maintenance="never")
    real = store.append_provenance_batch
    report_commits = a.get("report_commits", False)

    def observed(pairs, records_cache=None):  # the sanctioned seam: observe, then write
        if report_commits:
            say(ev="commit", ns=[e["n"] for _, e in pairs])
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = observed
    q = ProvenanceWriteQueue(store, spill_dir=a["spill_dir"], **a.get("opts", {})).start()
    real_spill = q._spill.write

    def observed_spill(lines, **kw):
        path = real_spill(lines, **kw)
        say(ev="spilled", ns=[json.loads(x)["entry"]["n"] for x in lines])
        return path

    q._spill.write = observed_spill
    stop = threading.Event()
    maint_runs = [0]
    maint_errors: list[str] = []
    maint_conflicts: list[str] = []

    def maintainer():
        # Runs while the others write, and at least once to the end (bounded): a run that
        # overlaps another maintainer may still fail on a commit conflict and is tried again.
        deadline = time.monotonic() + 60
        while not stop.wait(a["maintain_every_s"]) or (not maint_runs[0] and time.monotonic() < deadline):
            try:
                store.maintain()
                maint_runs[0] += 1
            except Exception as exc:
                (maint_conflicts if "commit conflict" in str(exc).lower() else maint_errors).append(repr(exc)[:300])

    m = None
    if a.get("maintain_every_s"):
        m = threading.Thread(target=maintainer, daemon=True)
        m.start()
    ids = [UUID(x) for x in a["ids"]]
    say(ev="started", pid=os.getpid())
    k = 0
    end = time.monotonic() + a.get("duration_s", 3600)
    n = a.get("n", 10**12)
    per_call = a.get("per_call", 4)
    pause = a.get("pause_s", 0.0)
    while k < n and time.monotonic() < end:
        pairs = []
        for _ in range(min(per_call, n - k)):
            pairs.append((ids[k % len(ids)], {"h": a["host"], "n": k}))
            k += 1
        q.enqueue(pairs)
        if k % 200 < per_call:
            say(ev="enqueued", upto=k - 1)
        if pause:
            time.sleep(pause)
    if a.get("drain_spill"):  # a restarted host: wait until the dead writer's files are replayed
        spill_dir = Path(a["spill_dir"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                n.endswith((".jsonl", ".claimed", ".tmp")) and ".failed-" not in n
                for n in (os.listdir(spill_dir) if spill_dir.is_dir() else ())):
            time.sleep(0.05)
    stop.set()
    if m is not None:
        m.join(60)
    flushed = q.flush(a.get("flush_s", 60))
    q.stop(timeout=10)
    s = q.stats()
    say(ev="done", n=k, flushed=flushed, written=s.written, accepted=s.accepted, dropped=s.dropped,
        spilled=s.spilled_pairs, store_errors=s.store_errors, retries=s.retries,
        maint_runs=maint_runs[0], maint_errors=maint_errors, maint_conflicts=len(maint_conflicts))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main(json.loads(sys.argv[1]))
