"""Crash tests: child processes SIGKILLed at random moments, then the survivors' view of the store.

Every child opens its own MemoryStore on the test's database (subprocess, never
fork: LanceDB hangs in a forked child). Fault injection stays on the sanctioned
seam, a wrapper on the store instance's ``append_provenance_batch``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from uuid import UUID

import pytest

from _proc_helpers import Reader, assert_exactly_once, pending_spill_files, spawn, wait_for, write_orphans
from iai_queue import ProvenanceWriteQueue

FAST = dict(coalesce_ms=5, retry_initial_s=0.01, retry_max_s=0.05, idle_replay_s=0.2)


def _kill(kid: Reader) -> None:
    try:
        os.kill(kid.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    kid.finish(10)


def _drain_here(store, spill_dir, timeout=15):
    """A fresh queue in this process replays whatever is left."""
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        # a killed writer's .tmp is recovered once it is 2 s old: allow for that
        wait_for(lambda: not pending_spill_files(spill_dir), timeout, what="the final drain")
        assert q.flush(5)
        return q.stats()
    finally:
        q.stop(timeout=2)


@pytest.mark.timeout(45)
def test_sigkill_while_spilling_keeps_every_spilled_pair(store, records, spill_dir):
    ids = [str(r.id) for r in records]
    opts = dict(max_queue_size=20, max_memory_pairs=60, max_batch_pairs=8, spill_file_pairs=25, coalesce_ms=5)
    kid = Reader(spawn("spill_forever", db=str(store.path), spill_dir=str(spill_dir), ids=ids, opts=opts))
    try:
        kid.wait_event("started", 20)
        wait_for(lambda: len(kid.of("spilled")) >= 3, 10, what="the child to spill")
        time.sleep(random.uniform(0.05, 0.6))  # a random moment in a continuous spill
    finally:
        _kill(kid)
    spilled = {n for ev in kid.of("spilled") for n in ev["ns"]}
    upto = max(ev["upto"] for ev in kid.of("enqueued"))
    assert spilled and upto > 100

    _drain_here(store, spill_dir)
    landed: dict[str, list[int]] = {}
    for rid in ids:
        ns = [e["n"] for e in store.get(UUID(rid)).provenance]
        assert len(ns) == len(set(ns)), f"record {rid}: duplicates"
        assert ns == sorted(ns), f"record {rid}: order broken"
        landed[rid] = ns
    all_landed = {n for ns in landed.values() for n in ns}
    assert spilled <= all_landed, f"spilled before the kill but lost: {sorted(spilled - all_landed)[:20]}"
    missing = set(range(upto + 1)) - all_landed
    # what was in memory at the kill: pending + spill buffer (<= max_memory_pairs) and the batch in the store
    print(f"spilled {len(spilled)} of {upto + 1} enqueued; {len(missing)} lost with the process")
    # documented bound: max_queue_size batches (1 pair each here) + max_memory_pairs, plus the batch in the store
    assert len(missing) <= opts["max_queue_size"] + opts["max_memory_pairs"] + opts["max_batch_pairs"], len(missing)
    assert store.provenance_rows() == len(all_landed)


@pytest.mark.timeout(60)
def test_sigkill_repeatedly_during_replay_then_drain_applies_each_once(store, records, spill_dir):
    ids = [r.id for r in records]
    expected = write_orphans(spill_dir, store.path, ids, files=20, per_file=200)
    # One file per store write (the queue gathers small files into one by default),
    # so a replay takes long enough for the kills to land in the middle of it.
    args = dict(db=str(store.path), spill_dir=str(spill_dir), deadline_s=20, linger_ms=150,
                opts={"replay_batch_pairs": 200, "max_batch_pairs": 200})
    kills = cut_short = 0
    for _ in range(5):
        if not pending_spill_files(spill_dir):
            break
        kid = Reader(spawn("drain", **args))
        try:
            kid.wait_event("started", 20)
            time.sleep(random.uniform(0.2, 1.5))
        finally:
            _kill(kid)
        kills += 1
        cut_short += any(n.endswith(".claimed") for n in pending_spill_files(spill_dir))
    assert kills >= 2, "the replay finished before the kills could interrupt it"
    assert cut_short >= 1, "no kill landed in the middle of a file's replay"
    _drain_here(store, spill_dir)
    assert_exactly_once(store, expected)


@pytest.mark.timeout(60)
def test_two_processes_draining_one_killed_each_entry_once(store, records, spill_dir):
    ids = [r.id for r in records]
    expected = write_orphans(spill_dir, store.path, ids, files=20, per_file=150)
    args = dict(db=str(store.path), spill_dir=str(spill_dir), deadline_s=25, linger_ms=30,
                opts={"replay_batch_pairs": 150, "max_batch_pairs": 150})
    a, b = Reader(spawn("drain", **args)), Reader(spawn("drain", **args))
    try:
        a.wait_event("started", 20)
        b.wait_event("started", 20)
        wait_for(lambda: any(ev["replayed"] > 0 for k in (a, b) for ev in k.of("progress")), 10,
                 what="a replay to begin")
        time.sleep(random.uniform(0.1, 0.5))
        _kill(a)
        assert b.finish(35) == 0, b.stderr()
    finally:
        for k in (a, b):
            if k.proc.poll() is None:
                _kill(k)
    assert not pending_spill_files(spill_dir), pending_spill_files(spill_dir)
    assert_exactly_once(store, expected)
