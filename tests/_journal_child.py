"""A child process for the journal tests: ``python tests/_journal_child.py <json args>``.

Opens its own MemoryStore and a write-ahead queue on ``spill_dir`` and enqueues
``{"c": tag, "n": k}`` round-robin over ``ids``, reporting ``{"ev": "acked", "upto": k}``
on stdout after enqueue(k) has returned (every ``ack_every`` calls). Options:
``outages`` (the store fails for random stretches), ``block_store`` (the store
never takes anything), ``n`` (stop after n calls, then idle or ``exit``),
``sigterm_helper`` (install_graceful_shutdown), ``store_delay_s``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def say(**ev) -> None:
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def main(a: dict) -> None:
    from iai_queue import MemoryStore, ProvenanceWriteQueue

    store = MemoryStore(a["db"], dim=8)
    real = store.append_provenance_batch
    down = threading.Event()

    def flaky(pairs, records_cache=None):
        if a.get("block_store") or down.is_set():
            raise OSError("store outage (test)")
        if a.get("store_delay_s"):
            time.sleep(a["store_delay_s"])
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = flaky
    if a.get("outages"):
        def toggle():
            rnd = random.Random(os.getpid())
            while True:
                time.sleep(rnd.uniform(0.02, 0.15))
                down.set() if rnd.random() < 0.4 else down.clear()

        threading.Thread(target=toggle, daemon=True).start()
    q = ProvenanceWriteQueue(store, spill_dir=a["spill_dir"], retry_initial_s=0.01, retry_max_s=0.05,
                             **a.get("opts", {"durability": "process", "max_queue_size": 16})).start()
    if a.get("sigterm_helper"):
        from iai_queue import install_graceful_shutdown

        install_graceful_shutdown(q)
    ids = [UUID(x) for x in a["ids"]]
    say(ev="started", pid=os.getpid())
    n = a.get("n")
    every = a.get("ack_every", 10)
    k = 0
    while n is None or k < n:
        q.enqueue([(ids[k % len(ids)], {"c": a["tag"], "n": k})])
        if k % every == 0:
            say(ev="acked", upto=k)
        k += 1
        if k % 50 == 0:
            time.sleep(0.001)
    say(ev="acked", upto=k - 1)
    say(ev="enqueued", n=k, stats=q.stats().as_dict())
    if a.get("exit"):
        say(ev="exiting", t=time.time())
        return
    while True:
        time.sleep(0.2)
        s = q.stats()
        say(ev="stats", replayed=s.replayed, written=s.written)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main(json.loads(sys.argv[1]))
