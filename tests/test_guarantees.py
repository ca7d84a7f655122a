"""The ten guarantees of ProvenanceWriteQueue, each broken on purpose against real LanceDB and real files.

Fault injection goes through the sanctioned seam: a wrapper installed on the
store instance's ``append_provenance_batch`` (and, for disk trouble, on the
queue's ``spill_directory.write``).
"""

from __future__ import annotations

import atexit
import errno
import gc
import json
import logging
import fcntl
import os
import sys
import threading
import time
import weakref
from collections import defaultdict
from uuid import UUID

import pytest

from _proc_helpers import (Reader, assert_exactly_once, failed_files, orphan_name, pending_spill_files, spawn,
                           spill_line, wait_for, write_orphans)
from iai_queue import ProvenanceWriteQueue, dispatch
from iai_queue.store import ProvenanceBatch

FAST = dict(coalesce_ms=5, retry_initial_s=0.01, retry_max_s=0.05, idle_replay_s=0.2)


class Entries:
    """Numbered entries, round-robin over records, remembering the order each record must show."""

    def __init__(self, records, tag="e"):
        self.ids = [r.id for r in records]
        self.tag = tag
        self.k = 0
        self.expected: dict[str, list[int]] = defaultdict(list)

    def pairs(self, n, rids=None, **extra):
        out = []
        for _ in range(n):
            rid = rids[self.k % len(rids)] if rids else self.ids[self.k % len(self.ids)]
            out.append((rid, {"t": self.tag, "n": self.k, **extra}))
            self.k += 1
        return out

    def accept(self, pairs):
        for rid, e in pairs:
            self.expected[str(rid)].append(e["n"])


class FailWhile:
    """Store wrapper: raises while ``failing`` is set (a store outage)."""

    def __init__(self, store, exc=RuntimeError("store is down")):
        self.real = store.append_provenance_batch
        self.failing = threading.Event()
        self.failing.set()
        self.calls = self.failed = 0
        self.exc = exc
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        self.calls += 1
        if self.failing.is_set():
            self.failed += 1
            raise self.exc
        return self.real(pairs, records_cache=records_cache)


def _stop(q):
    try:
        q.stop(timeout=2)
    except Exception:
        pass


# -- 1. store outage --------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_outage_accepts_spills_retries_and_lands_everything_once(store, records, spill_dir):
    fail = FailWhile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=40, max_batch_pairs=16, **FAST).start()
    try:
        e = Entries(records)
        for _ in range(75):  # 300 pairs: memory fills, the rest goes to the spill dir
            p = e.pairs(4)
            q.enqueue(p)
            e.accept(p)
        wait_for(lambda: q.stats().retries >= 5 and q.stats().spilled_pairs > 0, 10, what="retries and a spill")
        s = q.stats()
        assert s.accepted == 300 and s.dropped == 0
        assert s.store_errors > 0
        # max_queue_size counts enqueue calls: 40 calls wait in memory (or in the batch being tried), the rest spilled
        assert s.spilled_pairs + s.spill_buffered + s.pending == 300
        assert s.pending <= 40 * 4 + 16
        time.sleep(0.3)  # let the outage go on: still nothing may be quarantined
        s = q.stats()
        assert s.quarantined_files == 0 and s.quarantined_lines == 0 and not failed_files(spill_dir)
        assert fail.calls > fail.failed - 1 >= 5

        fail.failing.clear()  # the store is back
        assert q.flush(timeout=20)
        assert q.stats().written >= 300
        assert_exactly_once(store, e.expected)
        assert not pending_spill_files(spill_dir)
        s = q.stats()
        assert s.quarantined_lines == 0 and s.dropped == 0
    finally:
        fail.failing.clear()
        _stop(q)


# -- 2. poison pairs ----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_poison_pair_is_quarantined_with_reason_rest_lands_in_order(store, records, spill_dir):
    real = store.append_provenance_batch

    def picky(pairs, records_cache=None):
        if any(entry.get("poison") for _, entry in pairs):
            raise ValueError("poison pill rejected by the store")
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = picky
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_batch_pairs=32, **FAST).start()
    try:
        e = Entries(records)
        for i in range(20):
            p = e.pairs(5)
            if i == 7:
                poison_rid = p[2][0]
                p[2] = (poison_rid, {"t": "bad", "poison": True, "n": -1})
            q.enqueue(p)
            e.accept([x for x in p if not x[1].get("poison")])
        assert q.flush(timeout=15)
        assert_exactly_once(store, e.expected)
        s = q.stats()
        assert s.quarantined_lines == 1 and s.dropped == 0
        bad = failed_files(spill_dir)
        assert len(bad) == 1, os.listdir(spill_dir) if spill_dir.exists() else "no spill dir"
        lines = bad[0].read_bytes().splitlines()
        assert len(lines) == 1
        obj = json.loads(lines[0])
        assert obj["id"] == str(poison_rid) and obj["entry"]["poison"] is True
        reason = bad[0].with_suffix(".reason").read_text()
        assert "poison pill rejected by the store" in reason
        assert not pending_spill_files(spill_dir)
    finally:
        _stop(q)


# -- 3. exactly-once effect ----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_ambiguous_failure_after_real_write_applies_once(store, records, spill_dir):
    real = store.append_provenance_batch
    landed_then_failed = []

    def ambiguous(pairs, records_cache=None):
        real(pairs, records_cache=records_cache)
        if len(landed_then_failed) < 3:  # the first few writes land, then report a failure
            landed_then_failed.append(len(pairs))
            raise TimeoutError("connection reset after commit")

    store.append_provenance_batch = ambiguous
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_batch_pairs=8, **FAST).start()
    try:
        e = Entries(records)
        for _ in range(30):
            p = e.pairs(3)
            q.enqueue(p)
            e.accept(p)
        assert q.flush(timeout=15)
        assert len(landed_then_failed) == 3
        assert_exactly_once(store, e.expected)  # get() shows each once AND no duplicate rows
        assert q.stats().quarantined_lines == 0
    finally:
        _stop(q)


@pytest.mark.timeout(30)
def test_claimed_file_cut_short_by_crash_is_replayed_with_verify(store, records, spill_dir):
    ids = [r.id for r in records]
    spill_dir.mkdir(parents=True)
    lines, expected = [], defaultdict(list)
    landed = []
    for k in range(100):
        rid = ids[k % len(ids)]
        lines.append(spill_line(rid, {"t": "c", "n": k}, eid=f"crash-{k}"))
        expected[str(rid)].append(k)
        if k < 60:  # the crashed replayer wrote these, then died before unlinking
            landed.append(((rid, {"t": "c", "n": k}), f"crash-{k}"))
    store.append_provenance_batch(ProvenanceBatch([p for p, _ in landed], [e for _, e in landed]))
    name = orphan_name(store.path, 1, writer="wcrashed", suffix=".claimed")
    (spill_dir / name).write_bytes(b"".join(lines))

    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the claimed file to replay")
        assert q.flush(5)
        assert_exactly_once(store, dict(expected))
        assert q.stats().replayed == 100
    finally:
        _stop(q)


@pytest.mark.timeout(30)
def test_older_writer_file_without_eid_replayed_twice_applies_once(store, records, spill_dir):
    ids = [r.id for r in records]
    spill_dir.mkdir(parents=True)
    expected = defaultdict(list)
    data = b""
    for k in range(50):
        data += spill_line(ids[k % len(ids)], {"t": "old", "n": k})  # no "eid", no "seen"
        expected[str(ids[k % len(ids)])].append(k)
    name = "legacy-writer-export.jsonl"  # not our naming: an older writer's file
    (spill_dir / name).write_bytes(data)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="first replay")
        assert_exactly_once(store, dict(expected), check_rows=False)
        (spill_dir / name).write_bytes(data)  # the same file shows up again (restored from a backup, say)
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="second replay")
        assert q.stats().replayed == 100
        # get() shows each entry once: the line identity "<stem>:<line>" is stable across replays
        assert_exactly_once(store, dict(expected), check_rows=False)
        assert store.provenance_rows() == 50, "the second replay applied entries again"
    finally:
        _stop(q)


# -- 4. order -----------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_order_per_record_kept_across_memory_and_spill(store, records, spill_dir, gate):
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=10, max_batch_pairs=4,
                             spill_file_pairs=7, **FAST).start()
    try:
        e = Entries(records[:5])
        for i in range(200):
            p = e.pairs(1 + i % 3)
            q.enqueue(p)
            e.accept(p)
        wait_for(lambda: q.stats().spilled_files >= 3, 5, what="spill files")
        gate.open()
        assert q.flush(timeout=20)
        for i in range(30):  # and after the spill has drained, in memory again
            p = e.pairs(2)
            q.enqueue(p)
            e.accept(p)
        assert q.flush(timeout=10)
        assert_exactly_once(store, e.expected)
        assert not pending_spill_files(spill_dir)
    finally:
        gate.open()
        _stop(q)


@pytest.mark.timeout(30)
def test_new_queue_spills_behind_waiting_files_of_its_store(store, records, spill_dir):
    """Files of a dead writer wait; a new queue's entries must land after them."""
    ids = [r.id for r in records[:4]]
    expected = write_orphans(spill_dir, store.path, ids, files=3, per_file=20)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST)
    e = Entries(records[:4])
    e.k = 1000
    q.start()
    try:
        for _ in range(10):
            p = e.pairs(2)
            q.enqueue(p)
            e.accept(p)
        assert q.flush(10)
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="drain")
        for rid, ns in e.expected.items():
            expected[rid] = expected.get(rid, []) + ns
        assert_exactly_once(store, expected)
    finally:
        _stop(q)


@pytest.mark.timeout(30)
def test_order_per_thread_kept_when_concurrent_enqueues_overflow(store, records, spill_dir, gate):
    """Threads race the memory/spill switch (and the lock-free fast path): each thread's order holds."""
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=8, max_batch_pairs=8,
                             spill_file_pairs=16, **FAST).start()
    n_threads, calls = 4, 250
    barrier = threading.Barrier(n_threads)

    def worker(t):
        mine = [r.id for r in records[t::n_threads]]
        barrier.wait()
        for i in range(calls):
            q.enqueue([(mine[i % len(mine)], {"t": f"th{t}", "n": i})])
            if i == calls // 2:
                gate.open()  # the store comes back mid-stream: memory, spill and replay interleave

    try:
        ths = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(20)
        assert q.flush(timeout=20)
        assert q.stats().spilled_pairs > 0 and q.stats().dropped == 0
        for t in range(n_threads):
            mine = [r.id for r in records[t::n_threads]]
            for j, rid in enumerate(mine):
                got = [e["n"] for e in store.get(rid).provenance if e["t"] == f"th{t}"]
                assert got == list(range(j, calls, len(mine))), f"thread {t} record {rid}"
        assert store.provenance_rows() == n_threads * calls
    finally:
        gate.open()
        _stop(q)


# -- 5. spill files ---------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_leftover_tmp_of_dead_writer_is_recovered(store, records, spill_dir):
    ids = [r.id for r in records]
    spill_dir.mkdir(parents=True)
    expected = defaultdict(list)
    data = b""
    for k in range(30):
        data += spill_line(ids[k % len(ids)], {"t": "tmp", "n": k}, eid=f"tmp-{k}")
        expected[str(ids[k % len(ids)])].append(k)
    tmp = spill_dir / ("." + orphan_name(store.path, 1, writer="wgone") + ".tmp")
    tmp.write_bytes(data)
    old = time.time() - 10
    os.utime(tmp, (old, old))
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the tmp file to be recovered and replayed")
        assert_exactly_once(store, dict(expected))
    finally:
        _stop(q)


@pytest.mark.timeout(30)
def test_tmp_of_a_live_writer_is_left_alone(store, records, spill_dir):
    """Alive is told by the writer's lock, never by age: a tmp whose writer holds its lock is not touched."""
    spill_dir.mkdir(parents=True)
    tmp = spill_dir / ("." + orphan_name(store.path, 1, writer="wlive") + ".tmp")
    tmp.write_bytes(spill_line(records[0].id, {"t": "live", "n": 0}, eid="live-0"))
    old = time.time() - 3600
    os.utime(tmp, (old, old))  # an hour old, and still alive
    lock_fd = os.open(spill_dir / ".writer-wlive.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    write_orphans(spill_dir, store.path, [records[1].id], files=1, per_file=3)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: pending_spill_files(spill_dir) == [tmp.name], 10, what="the orphan to replay")
        assert tmp.exists() and store.get(records[0].id).provenance == []
        os.close(lock_fd)  # the writer dies: its tmp is recovered now, young or old
        lock_fd = None
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the dead writer's tmp to be recovered")
        assert store.get(records[0].id).provenance == [{"t": "live", "n": 0}]
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        _stop(q)


@pytest.mark.timeout(30)
def test_torn_and_garbage_files_are_quarantined_and_the_worker_keeps_going(store, records, spill_dir):
    ids = [r.id for r in records]
    spill_dir.mkdir(parents=True)
    expected = defaultdict(list)

    def good(k):
        expected[str(ids[k % len(ids)])].append(k)
        return spill_line(ids[k % len(ids)], {"t": "g", "n": k}, eid=f"g-{k}")

    n = iter(range(1, 100))
    torn_last = spill_line(ids[0], {"t": "g", "n": 999}, eid="g-999")[:25]  # cut mid-JSON, no newline
    huge_line = b'{"id": "' + b"x" * (2 << 20) + b'"}\n'
    files = {
        "torn": good(0) + good(1) + good(2) + torn_last,
        "empty": b"",
        "binary": bytes(range(256)) * 8,
        "huge": huge_line,  # no size limit: judged (and kept) whole
        "list": b"[1,2]\n",
        "intid": b'{"id": 5}\n',
        "notuuid": b'{"id": "not-a-uuid", "entry": {"t": "g", "n": -5}}\n',
        "after": good(3) + good(4),  # a good file behind all the bad ones still replays
    }
    names = {}
    for key, data in files.items():
        names[key] = orphan_name(store.path, next(n))
        (spill_dir / names[key]).write_bytes(data)

    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 15, what="all files handled")
        assert_exactly_once(store, dict(expected))
        bad = failed_files(spill_dir)
        stems = {p.name.split(".failed-")[0]: p for p in bad}
        for key in ("torn", "empty", "binary", "huge", "list", "intid", "notuuid"):
            stem = names[key][: -len(".jsonl")]
            assert stem in stems, f"{key} not quarantined; have {sorted(stems)}"
            assert stems[stem].with_suffix(".reason").read_text().strip(), key
        # the torn file: only the cut line is set aside, with a reason
        torn = stems[names["torn"][: -len(".jsonl")]]
        assert torn.read_bytes().rstrip(b"\n") == torn_last
        assert "not JSON" in torn.with_suffix(".reason").read_text()
        assert stems[names["huge"][:-6]].read_bytes() == huge_line  # kept whole, byte for byte
        assert "UUID" in stems[names["huge"][:-6]].with_suffix(".reason").read_text()
        assert "UUID" in stems[names["notuuid"][:-6]].with_suffix(".reason").read_text()
        assert "empty" in stems[names["empty"][:-6]].with_suffix(".reason").read_text()
        assert names["after"][:-6] not in stems
        assert q.stats().dropped == 0
        assert q.running and q._worker.is_alive()
    finally:
        _stop(q)


# -- 6. several processes, one directory ----------------------------------------------------------

@pytest.mark.timeout(45)
def test_two_processes_drain_one_directory_each_entry_once(store, records, spill_dir):
    ids = [r.id for r in records]
    expected = write_orphans(spill_dir, store.path, ids, files=30, per_file=100)
    args = dict(db=str(store.path), spill_dir=str(spill_dir), deadline_s=25, opts=dict(idle_replay_s=0.2))
    kids = [Reader(spawn("drain", **args)) for _ in range(2)]
    for k in kids:
        assert k.finish(35) == 0, k.stderr()
    done = [k.of("done")[0] for k in kids]
    assert sum(d["replayed"] for d in done) == 3000, done
    assert all(d["quarantined"] == 0 and d["dropped"] == 0 for d in done)
    assert not pending_spill_files(spill_dir)
    assert_exactly_once(store, expected)


@pytest.mark.timeout(45)
def test_two_processes_writing_one_store_lose_nothing(store, records, spill_dir):
    ids = [str(r.id) for r in records]
    kids = [Reader(spawn("write", db=str(store.path), spill_dir=str(spill_dir), ids=ids, tag=tag, n=400))
            for tag in ("a", "b")]
    for k in kids:
        assert k.finish(35) == 0, k.stderr()
        assert k.of("done")[0]["flushed"]
    total = 0
    for r in records:
        prov = store.get(r.id).provenance
        total += len(prov)
        for tag in ("a", "b"):
            ns = [e["n"] for e in prov if e["t"] == tag]
            want = [k for k in range(400) if ids[k % len(ids)] == str(r.id)]
            assert ns == want, f"record {r.id} tag {tag}"
    assert total == 800 and store.provenance_rows() == 800


# -- 7. lifecycle races -------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_stop_with_full_queue_and_blocked_store_spills_everything(store, records, spill_dir, gate):
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=20, max_batch_pairs=8, **FAST).start()
    e = Entries(records)
    for _ in range(100):
        p = e.pairs(1)
        q.enqueue(p)
        e.accept(p)
    assert gate.entered.wait(5)
    t0 = time.monotonic()
    assert q.stop(timeout=0.3) is False
    assert time.monotonic() - t0 < 3
    s = q.stats()
    assert s.dropped == 0 and s.accepted == 100
    on_disk = sum(len((spill_dir / n).read_bytes().splitlines()) for n in pending_spill_files(spill_dir))
    assert on_disk == 100  # the batch stuck in the store included
    gate.open()  # the abandoned worker's write now lands; the spilled copy is flagged for verification
    q._worker.join(10)
    assert not q._worker.is_alive()
    q2 = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="replay by the new queue")
        assert_exactly_once(store, e.expected)
    finally:
        _stop(q2)


@pytest.mark.timeout(30)
def test_enqueue_racing_disable_from_threads_lands_all_once(store, records, spill_dir):
    store.enable_provenance_queue(spill_dir=spill_dir, coalesce_ms=5)
    n_threads, per_thread = 4, 120
    started = threading.Barrier(n_threads + 1)
    progress = [0] * n_threads
    errors = []

    def worker(t):
        rng_ids = [r.id for r in records[t::n_threads]]
        started.wait()
        try:
            for i in range(per_thread):
                store.queue_provenance_batch([(rng_ids[i % len(rng_ids)], {"t": f"th{t}", "n": i})])
                progress[t] = i
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    started.wait()
    wait_for(lambda: min(progress) >= 20, 10, interval=0.001, what="threads to get going")
    store.disable_provenance_queue()
    for t in threads:
        t.join(20)
    assert not errors, errors
    for t in range(n_threads):
        rng_ids = [r.id for r in records[t::n_threads]]
        for j, rid in enumerate(rng_ids):
            got = [e["n"] for e in store.get(rid).provenance if e["t"] == f"th{t}"]
            want = list(range(j, per_thread, len(rng_ids)))
            assert sorted(got) == want, f"thread {t} record {rid}: lost or doubled"
            assert got == want, f"thread {t} record {rid}: order broken across the toggle: {got}"
    assert store.provenance_rows() == n_threads * per_thread


@pytest.mark.timeout(20)
def test_enqueue_after_stop_is_written_synchronously(store, records, spill_dir):
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    q.enqueue([(records[0].id, {"t": "s", "n": 0})])
    assert q.stop() is True
    q.enqueue([(records[0].id, {"t": "s", "n": 1}), (records[1].id, {"t": "s", "n": 2})])
    # no flush, no worker: already in the store
    assert [e["n"] for e in store.get(records[0].id).provenance] == [0, 1]
    assert [e["n"] for e in store.get(records[1].id).provenance] == [2]
    assert q.stats().written == 3 and q.stats().pending == 0
    assert not pending_spill_files(spill_dir)


@pytest.mark.timeout(30)
def test_enqueue_after_stop_with_failing_store_is_spilled_not_lost(store, records, spill_dir):
    fail = FailWhile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    fail.failing.clear()
    q.enqueue([(records[0].id, {"t": "s", "n": 0})])
    assert q.flush(5)
    q.stop()
    fail.failing.set()
    q.enqueue([(records[0].id, {"t": "s", "n": 1})])
    fail.failing.clear()
    # the store is back: the spilled one is replayed first, on this caller's thread, then this one is written
    q.enqueue([(records[0].id, {"t": "s", "n": 2})])
    assert [e["n"] for e in store.get(records[0].id).provenance] == [0, 1, 2]
    assert q.stats().dropped == 0
    q2 = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="replay")
        assert_exactly_once(store, {str(records[0].id): [0, 1, 2]})
    finally:
        _stop(q2)


@pytest.mark.timeout(40)
def test_toggle_200_times_under_concurrent_recalls(store, records, spill_dir):
    import random

    rnd = random.Random(1)

    def recall(tid, i):
        emb = [rnd.random() for _ in range(store.dim)]
        return dispatch(store, "memory_recall", {"cue": f"{tid}:{i}", "session_id": f"s{tid}",
                                                 "cue_embedding": emb, "k": 3})

    # warm up LanceDB and the queue once, then take the baselines
    store.enable_provenance_queue(spill_dir=spill_dir, coalesce_ms=1)
    recall("warm", 0)
    store.disable_provenance_queue()
    threads0 = threading.active_count()
    atexit0 = atexit._ncallbacks()
    made = []
    fds0 = len(os.listdir("/proc/self/fd"))

    stop = threading.Event()
    per_thread: dict[int, list] = defaultdict(list)
    errors = []

    def worker(tid):
        i = 0
        try:
            while not stop.is_set():
                for h in recall(tid, i):
                    per_thread[tid].append((str(h["id"]), f"{tid}:{i}"))
                i += 1
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for t in ths:
        t.start()
    for _ in range(200):
        made.append(weakref.ref(store.enable_provenance_queue(spill_dir=spill_dir, coalesce_ms=1)))
        store.disable_provenance_queue()
    stop.set()
    for t in ths:
        t.join(10)
    assert not errors, errors
    store.disable_provenance_queue()

    want: dict[str, list[str]] = defaultdict(list)
    for tid, items in per_thread.items():
        for rid, cue in items:
            want[rid].append(cue)
    total = sum(len(v) for v in want.values())
    assert total > 0
    got_total = 0
    for rid, cues in want.items():
        got = [e["cue"] for e in store.get(UUID(rid)).provenance if e["cue"] != "warm:0"]
        got_total += len(got)
        assert len(got) == len(set(got)), f"record {rid}: duplicates"
        assert sorted(got) == sorted(cues), f"record {rid}: lost {set(cues) - set(got)} extra {set(got) - set(cues)}"
        for tid in range(3):
            mine = [c for c in got if c.startswith(f"{tid}:")]
            assert mine == [c for c in cues if c.startswith(f"{tid}:")], f"record {rid}: thread {tid} order"
    assert got_total == total
    assert not pending_spill_files(spill_dir)
    wait_for(lambda: threading.active_count() <= threads0, 5,
             what=f"threads back to {threads0}: {[t.name for t in threading.enumerate()]}")
    # No exit handler left behind: atexit holds its callbacks strongly, so a queue
    # whose handler was not unregistered would still be alive.
    gc.collect()
    alive = [r() for r in made if r() is not None]
    assert not alive, f"{len(alive)} stopped queues kept alive (by atexit?)"
    if sys.version_info >= (3, 12):
        assert atexit._ncallbacks() == atexit0
    else:  # CPython 3.11's unregister leaves an empty slot per handler (documented in the queue's docstring)
        assert atexit._ncallbacks() <= atexit0 + 200
    assert len(os.listdir("/proc/self/fd")) <= fds0


# -- 8. fork ----------------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:lance is not fork-safe")  # this test forks on purpose; the child opens nothing of lance's
def test_fork_child_starts_empty_and_writes_only_its_own(store, records, spill_dir, gate):
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        e = Entries(records)
        p = e.pairs(10)
        q.enqueue(p)
        e.accept(p)
        assert gate.entered.wait(5)  # one batch stuck in the store
        p = e.pairs(5)
        q.enqueue(p)  # and more waiting in memory
        e.accept(p)
        assert q.stats().pending == 15
        child_rid = records[3].id
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no LanceDB calls here
            code = 1
            try:
                os.close(r)
                out = {"pending": q.stats().pending}
                got = []

                def to_pipe(pairs, records_cache=None):
                    got.append({"pairs": [[str(a), b] for a, b in pairs],
                                "eids": list(getattr(pairs, "entry_ids", []))})

                store.append_provenance_batch = to_pipe
                q.enqueue([(child_rid, {"t": "child", "n": -1})])
                out["flushed"] = q.flush(5)
                out["batches"] = got
                out["pending_after"] = q.stats().pending
                os.write(w, json.dumps(out).encode())
                code = 0
            except BaseException as exc:
                os.write(w, json.dumps({"error": repr(exc)}).encode())
            finally:
                os._exit(code)
        os.close(w)
        data = b""
        deadline = time.monotonic() + 15
        import select
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.1)
            if ready:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                data += chunk
        os.close(r)
        status = None
        while time.monotonic() < deadline + 2:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung")
        out = json.loads(data)
        assert "error" not in out, out
        assert os.waitstatus_to_exitcode(status) == 0
        assert out["pending"] == 0
        assert out["flushed"] is True, out
        assert out["batches"] == [out["batches"][0]] and out["batches"][0]["pairs"] == [
            [str(child_rid), {"t": "child", "n": -1}]], out["batches"]
        assert not any(eid.startswith(q._prefix) for eid in out["batches"][0]["eids"])

        # the parent still owns its entries, and writes them
        gate.open()
        assert q.flush(10)
        assert_exactly_once(store, e.expected)
    finally:
        gate.open()
        _stop(q)


# -- 9. exit ----------------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_exit_with_slow_store_returns_in_time_and_spills(store, records, spill_dir):
    ids = [str(r.id) for r in records]
    kid = Reader(spawn("exit_slow", db=str(store.path), spill_dir=str(spill_dir), ids=ids, n=60,
                       exit_timeout=1.0))
    kid.wait_event("exiting", 20)
    t0 = time.monotonic()
    assert kid.finish(15) == 0, kid.stderr()
    took = time.monotonic() - t0
    assert took < 4.0, f"exit took {took:.1f}s with exit_timeout=1.0 (the store sleeps 10 s)"
    files = pending_spill_files(spill_dir)
    assert files
    assert sum(len((spill_dir / n).read_bytes().splitlines()) for n in files) == 60
    expected = defaultdict(list)
    for k in range(60):
        expected[ids[k % len(ids)]].append(k)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="replay of the exit spill")
        assert_exactly_once(store, dict(expected))
    finally:
        _stop(q)


# -- 10. disk trouble -------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["enospc", "path_under_a_file"])
def test_disk_trouble_keeps_entries_in_memory_then_drops_counted(store, records, tmp_path, gate, caplog, how):
    if how == "enospc":
        spill_dir = tmp_path / "spill"
    else:
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the spill dir's parent should be")
        spill_dir = blocker / "spill"
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=10, max_memory_pairs=30,
                             max_batch_pairs=4, **FAST)
    disk_ok = threading.Event()
    if how == "enospc":
        real_write = q.spill_directory.write

        def full_disk(lines, **kw):
            if not disk_ok.is_set():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(lines, **kw)

        q.spill_directory.write = full_disk
    q.start()
    caplog.set_level(logging.ERROR, logger="iai_queue")
    try:
        e = Entries(records)
        p = e.pairs(1)
        q.enqueue(p)
        e.accept(p)
        assert gate.entered.wait(5)  # that one is in the store's hands now
        kept = 0
        for i in range(40):  # 10 calls for the store, then up to max_memory_pairs: kept in memory, nothing dropped
            p = e.pairs(1)
            q.enqueue(p)
            e.accept(p)
            kept += 1
            if i == 15:
                wait_for(lambda: q.stats().spill_errors >= 1, 5, what="a failed spill")
        s = q.stats()
        assert s.dropped == 0, s
        assert s.pending + s.spill_buffered == 41 and s.spill_buffered == 30
        assert s.spill_errors >= 1 and s.spilled_pairs == 0
        wait_for(lambda: q.stats().spill_errors >= 3, 5, what="spilling to be retried")
        assert not caplog.records or all("drop" not in r.getMessage() for r in caplog.records)

        dropped_calls = 0
        for i in range(10):  # past the hard bound: dropped, counted, logged at ERROR with the count
            p = e.pairs(2)
            before = q.stats().dropped
            q.enqueue(p)
            if q.stats().dropped > before:
                assert q.stats().dropped == before + 2
                dropped_calls += 1
            else:
                e.accept(p)
        assert dropped_calls == 10
        assert q.stats().dropped == 20
        drops = [r for r in caplog.records if r.levelno == logging.ERROR and r.getMessage().startswith("drop")]
        assert drops and all(getattr(r, "count", None) == 2 for r in drops)

        # the disk recovers, then the store: everything not dropped lands, once, in order
        if how == "enospc":
            disk_ok.set()
        else:
            blocker.unlink()
        wait_for(lambda: q.stats().spill_buffered == 0 and q.stats().spilled_pairs > 0, 10,
                 what="the spill to succeed")
        p = e.pairs(3)
        q.enqueue(p)  # and new entries still work
        e.accept(p)
        gate.open()
        assert q.flush(timeout=15)
        assert_exactly_once(store, e.expected)
        assert q.stats().dropped == 20
    finally:
        gate.open()
        disk_ok.set()
        _stop(q)
