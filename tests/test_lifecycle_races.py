"""Issue 9, items 1-4, 6 and 22: the queue's lifecycle under concurrent callers, crashes and new processes.

Every test counts rows in the provenance table as well as what ``get()`` shows,
and checks order per record and per enqueuing thread. Faults go through the
sanctioned seams: a wrapper on the store instance's ``append_provenance_batch``
and ``os.fsync`` monkeypatched to fail once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest

from _loss_helpers import (FAST, FLUSH_S, Flaky, Ledger, ThreadGate, TimedEnqueuer, assert_verdict, drain, judge,
                           spawned_writer, stat_field, stop_quietly)
from _proc_helpers import ROOT, wait_for
from conftest import Gate, slow_store
from iai_queue import ProvenanceWriteQueue


def _own_records(records, t: int, n_threads: int) -> list:
    return [r.id for r in records[t::n_threads]]


# -- item 1: stop() / disable while threads keep enqueueing -------------------------------------------

@pytest.mark.timeout(60)
def test_item01_stop_racing_enqueuers_loses_nothing(store, records, spill_dir):
    """8 threads enqueue before, during and after stop(); tight bounds; 3 rounds on one store."""
    slow_store(store, 0.01)
    ledger = Ledger()
    n_threads, dropped = 8, 0
    for rnd in range(3):
        q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=8, max_memory_pairs=8,
                                 max_batch_pairs=4, spill_file_pairs=8, **FAST).start()
        go, stopped = threading.Barrier(n_threads + 1), threading.Event()
        counts = [0] * n_threads
        errors: list = []

        def worker(t: int) -> None:
            mine = _own_records(records, t, n_threads)
            tag, i, after = f"r{rnd}t{t}", 0, 0
            go.wait()
            try:
                while after < 15:  # keep going through the stop, and a little past it
                    pairs = [(mine[i % len(mine)], {"t": tag, "n": i})]
                    q.enqueue(pairs)
                    ledger.accept(pairs)
                    i += 1
                    counts[t] = i
                    if stopped.is_set():
                        after += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        go.wait()
        wait_for(lambda: min(counts) >= 30, 15, interval=0.005, what="every thread to enqueue 30")
        q.stop(timeout=0.5)
        stopped.set()
        for th in threads:
            th.join(30)
        assert not any(th.is_alive() for th in threads), "an enqueuer never returned"
        assert not errors, errors
        dropped += q.stats().dropped
    drain(store, spill_dir)
    assert_verdict(judge(store, [r.id for r in records], ledger))
    assert dropped == 0, f"{dropped} dropped on a healthy disk"


@pytest.mark.timeout(60)
def test_item01_disable_racing_enqueuers_loses_nothing(store, records, spill_dir):
    """8 threads call store.queue_provenance_batch while the queue is enabled and disabled 30 times."""
    slow_store(store, 0.005)
    ledger = Ledger()
    n_threads = 8
    halt = threading.Event()
    errors: list = []
    counts = [0] * n_threads

    def worker(t: int) -> None:
        mine = _own_records(records, t, n_threads)
        i = 0
        try:
            while not halt.is_set():
                pairs = [(mine[i % len(mine)], {"t": f"t{t}", "n": i})]
                store.queue_provenance_batch(pairs)
                ledger.accept(pairs)
                i += 1
                counts[t] = i
        except BaseException as exc:
            errors.append(exc)

    opts = dict(spill_dir=spill_dir, max_queue_size=8, max_memory_pairs=8, max_batch_pairs=4, spill_file_pairs=8,
                exit_timeout=0.5, retry_initial_s=0.01, retry_max_s=0.05, idle_replay_s=0.2)
    queues = [store.enable_provenance_queue(coalesce_ms=2, **opts)]
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    try:
        for _ in range(30):
            before = sum(counts)
            wait_for(lambda: sum(counts) >= before + 3 * n_threads, 15, interval=0.002,
                     what="the threads to make progress")
            store.disable_provenance_queue()
            queues.append(store.enable_provenance_queue(coalesce_ms=2, **opts))
    finally:
        halt.set()
        for th in threads:
            th.join(30)
        store.disable_provenance_queue()
    assert not errors, errors
    drain(store, spill_dir)
    assert_verdict(judge(store, [r.id for r in records], ledger))
    assert sum(q.stats().dropped for q in queues) == 0


# -- item 2: enqueuers, a toggler, a flusher and a flaky store ---------------------------------------

@pytest.mark.timeout(60)
def test_item02_toggler_flusher_flaky_store_lose_double_reorder_nothing(store, records, spill_dir):
    flaky = Flaky(store, rate=0.10, seed=2)
    ledger = Ledger()
    n_threads = 8
    halt = threading.Event()
    errors: list = []
    live: list = [None]  # the queue the toggler last enabled, for the flusher
    queues: list = []
    opts = dict(spill_dir=spill_dir, max_queue_size=16, max_memory_pairs=16, max_batch_pairs=8, spill_file_pairs=16,
                exit_timeout=0.5, retry_initial_s=0.005, retry_max_s=0.05, idle_replay_s=0.2)

    def enqueuer(t: int) -> None:
        mine = _own_records(records, t, n_threads)
        i = 0
        while not halt.is_set():
            pairs = [(mine[(i + j) % len(mine)], {"t": f"t{t}", "n": i + j}) for j in range(1 + i % 3)]
            try:
                store.queue_provenance_batch(pairs)  # the queue, or a synchronous write while it is off
            except (ConnectionError, TimeoutError):
                ledger.doubt(pairs)  # the synchronous write failed: the caller knows; maybe half landed
            except BaseException as exc:
                errors.append(exc)
                return
            else:
                ledger.accept(pairs)
            i += len(pairs)

    def toggler() -> None:
        try:
            while not halt.is_set():
                q = store.enable_provenance_queue(coalesce_ms=2, **opts)
                queues.append(q)
                live[0] = q
                halt.wait(0.02)
                store.disable_provenance_queue()
                halt.wait(0.005)
        except BaseException as exc:
            errors.append(exc)

    def flusher() -> None:
        while not halt.is_set():
            q = live[0]
            if q is not None:
                q.flush(0.05)
            halt.wait(0.01)

    threads = [threading.Thread(target=enqueuer, args=(t,)) for t in range(n_threads)]
    threads += [threading.Thread(target=toggler), threading.Thread(target=flusher)]
    for th in threads:
        th.start()
    halt.wait(3.0)
    halt.set()
    for th in threads:
        th.join(30)
    store.disable_provenance_queue()
    assert not errors, errors
    store.append_provenance_batch = flaky.real
    drain(store, spill_dir)
    assert_verdict(judge(store, [r.id for r in records], ledger))
    assert sum(q.stats().dropped for q in queues) == 0
    assert flaky.failed and flaky.ambiguous and len(queues) >= 5, "the chaos did not happen"


@pytest.mark.timeout(30)
def test_item02_transient_failures_of_one_pair_keep_its_place(store, records, spill_dir):
    """The flaky store's effect on one pair, made deterministic: the calls holding n=1 fail 5 times, then work."""
    rid = records[0].id
    real = store.append_provenance_batch
    failures = [0]

    def transient(pairs, records_cache=None):
        if any(e["n"] == 1 for _, e in pairs) and failures[0] < 5:
            failures[0] += 1
            raise ConnectionError("transient: connection refused")
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = transient
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, coalesce_ms=100, retry_initial_s=0.01, retry_max_s=0.05,
                             idle_replay_s=0.2).start()
    try:
        for n in range(4):  # one coalesced batch
            q.enqueue([(rid, {"t": "x", "n": n})])
        assert q.flush(FLUSH_S)
        assert [e["n"] for e in store.get(rid).provenance] == [0, 1, 2, 3]
        assert store.provenance_rows() == 4 and q.stats().quarantined_lines == 0
    finally:
        stop_quietly(q)


# -- item 3: a synchronous write after disable began --------------------------------------------------

@pytest.mark.timeout(30)
def test_item03_sync_write_after_disable_began_lands_after_draining_entries(store, records, spill_dir):
    rid = records[0].id
    q = store.enable_provenance_queue(spill_dir=spill_dir, coalesce_ms=1, exit_timeout=10)
    gate = ThreadGate(store)  # the queue's writes wait; writes on allowed threads go through
    try:
        for n in range(5):
            store.queue_provenance_batch([(rid, {"t": "queued", "n": n})])
        assert gate.entered.wait(5), "the worker never reached the store"
        disabler = threading.Thread(target=store.disable_provenance_queue)
        disabler.start()
        wait_for(lambda: not q.running, 5, interval=0.001, what="disable to begin")

        def sync_write():
            gate.allow.add(threading.get_ident())
            store.queue_provenance_batch([(rid, {"t": "sync", "n": 5})])

        writer = threading.Thread(target=sync_write)
        writer.start()
        writer.join(0.5)  # returns at once today (written ahead); a fixed queue may hold it until the drain
        gate.open()
        disabler.join(15)
        writer.join(15)
        assert not disabler.is_alive() and not writer.is_alive()
        got = [(e["t"], e["n"]) for e in store.get(rid).provenance]
        assert got == [("queued", n) for n in range(5)] + [("sync", 5)], got
        assert store.provenance_rows() == 6
    finally:
        gate.open()
        store.disable_provenance_queue()


# -- item 4: enqueue without start() -----------------------------------------------------------------

@pytest.mark.timeout(20)
def test_item04_enqueue_without_start_starts_the_worker(store, records, spill_dir):
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST)  # no start()
    try:
        q.enqueue([(records[0].id, {"t": "a", "n": 0}), (records[1].id, {"t": "a", "n": 1})])
        assert q.flush(FLUSH_S) is True
        assert [e["n"] for e in store.get(records[0].id).provenance] == [0]
        assert [e["n"] for e in store.get(records[1].id).provenance] == [1]
        assert store.provenance_rows() == 2
        assert q.stats().written == 2 and q.running
    finally:
        stop_quietly(q)


_EXIT_WITHOUT_START = """
import sys, uuid
from iai_queue import MemoryStore, ProvenanceWriteQueue
store = MemoryStore(sys.argv[1], dim=8)
q = ProvenanceWriteQueue(store, spill_dir=sys.argv[2], coalesce_ms=5)
q.enqueue([(uuid.UUID(sys.argv[3]), {"t": "exit", "n": k}) for k in range(3)])
"""  # and falls off the end: no start(), no flush(), no stop()


@pytest.mark.timeout(30)
def test_item04_entries_of_an_unstarted_queue_survive_a_normal_exit(store, records, spill_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _EXIT_WITHOUT_START, str(store.path), str(spill_dir),
                        str(records[0].id)], capture_output=True, text=True, timeout=25, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    drain(store, spill_dir)
    assert [e["n"] for e in store.get(records[0].id).provenance] == [0, 1, 2]
    assert store.provenance_rows() == 3


# -- item 6: supervised threads ----------------------------------------------------------------------

class WorkerKiller(BaseException):
    """Not an Exception: what a careless `except Exception` in a worker lets through."""


@pytest.mark.timeout(30)
def test_item06_worker_crash_is_logged_counted_restarted_and_loses_nothing(store, records, spill_dir, caplog):
    caplog.set_level(logging.ERROR, logger="iai_queue")
    real = store.append_provenance_batch
    fired = threading.Event()

    def crash_once(pairs, records_cache=None):
        if not fired.is_set():
            fired.set()
            raise WorkerKiller("injected crash in the worker")
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = crash_once
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=16, max_batch_pairs=8, **FAST).start()
    ledger = Ledger()
    try:
        calls = [[(records[(i + j) % 20].id, {"t": "w", "n": i + j}) for j in range(2)] for i in range(0, 200, 2)]
        first = calls[:5]
        for pairs in first:  # the first write hits the crash
            q.enqueue(pairs)
            ledger.accept(pairs)
        assert fired.wait(5)
        rest = TimedEnqueuer(q.enqueue, calls[5:]).start()
        rest.wait(20)
        for pairs in calls[5:]:
            ledger.accept(pairs)
        assert q.flush(FLUSH_S) is True, "the worker is dead: nothing is written any more"
        assert_verdict(judge(store, [r.id for r in records], ledger))
        s = q.stats()
        assert s.dropped == 0
        assert stat_field(s, "thread_restarts") >= 1
        assert any(r.levelno >= logging.ERROR for r in caplog.records), "the crash was not logged at ERROR"
    finally:
        stop_quietly(q)


@pytest.mark.timeout(30)
def test_item06_spill_thread_crash_is_logged_counted_restarted_and_loses_nothing(store, records, spill_dir, caplog,
                                                                                   monkeypatch):
    caplog.set_level(logging.ERROR, logger="iai_queue")
    gate = Gate(store)  # the store holds the first batch: the rest overflows to the spill thread
    real_fsync = os.fsync
    fired = threading.Event()

    def fsync_fails_once_on_a_spill_file(fd):
        if not fired.is_set():
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.endswith(".jsonl.tmp"):
                fired.set()
                raise MemoryError("injected: out of memory in the spill thread")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_once_on_a_spill_file)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=2, max_memory_pairs=6, max_batch_pairs=4,
                             spill_file_pairs=4, **FAST).start()
    ledger = Ledger()
    calls = [[(records[i % 20].id, {"t": "s", "n": i})] for i in range(80)]
    try:
        enq = TimedEnqueuer(q.enqueue, calls).start()
        enq.wait(20)
        for pairs in calls:
            ledger.accept(pairs)
        assert fired.is_set(), "the injected fault never fired (no spill happened)"
        gate.open()
        assert q.flush(15) is True
        assert_verdict(judge(store, [r.id for r in records], ledger))
        s = q.stats()
        assert s.dropped == 0
        assert stat_field(s, "thread_restarts") >= 1
        assert any(r.levelno >= logging.ERROR for r in caplog.records), "the crash was not logged at ERROR"
    finally:
        gate.open()
        monkeypatch.setattr(os, "fsync", real_fsync)
        stop_quietly(q)


# -- item 22: processes that use the store start with spawn --------------------------------------------

@pytest.mark.timeout(60)
def test_item22_spawned_child_opens_its_own_store_and_writes(store, records, spill_dir):
    q = store.enable_provenance_queue(spill_dir=spill_dir, coalesce_ms=5)  # the parent has a live queue
    try:
        q.enqueue([(records[0].id, {"t": "parent", "n": 0})])
        ctx = multiprocessing.get_context("spawn")
        result = ctx.Queue()
        ids = [str(r.id) for r in records]
        child = ctx.Process(target=spawned_writer, args=(str(store.path), str(spill_dir), ids, 60, result))
        child.start()
        out = result.get(timeout=45)
        child.join(15)
        assert child.exitcode == 0, out
        assert out.get("flushed") is True and out["written"] == 60, out
        assert q.flush(FLUSH_S)
    finally:
        store.disable_provenance_queue()
    spawned = [e["n"] for r in records for e in store.get(r.id).provenance if e["t"] == "spawned"]
    assert sorted(spawned) == list(range(60))
    for i, r in enumerate(records):
        assert [e["n"] for e in store.get(r.id).provenance if e["t"] == "spawned"] == list(range(i, 60, 20))
    assert store.provenance_rows() == 61


@pytest.mark.timeout(10)
def test_item22_readme_says_to_use_spawn_or_forkserver():
    readme = (ROOT / "README.md").read_text()
    assert "spawn" in readme and "forkserver" in readme
    assert "get_context(" in readme or "set_start_method(" in readme, "README does not show how"


# -- the soak script, briefly ---------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_soak_script_runs_two_seconds_clean(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "2", "--dir", str(tmp_path),
                        "--json"], capture_output=True, text=True, timeout=50, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


# -- a control: the same harness on a path that works, so a failure above is the bug, not the harness --------

@pytest.mark.timeout(60)
def test_control_threads_overflowing_a_slow_store_lose_nothing(store, records, spill_dir):
    slow_store(store, 0.005)
    ledger = Ledger()
    n_threads = 8
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=8, max_memory_pairs=16, max_batch_pairs=8,
                             spill_file_pairs=16, **FAST).start()

    def enqueuer(t: int) -> None:
        mine = _own_records(records, t, n_threads)
        for i in range(0, 120, 2):
            pairs = [(mine[(i + j) % len(mine)], {"t": f"t{t}", "n": i + j}) for j in range(2)]
            q.enqueue(pairs)
            ledger.accept(pairs)

    threads = [threading.Thread(target=enqueuer, args=(t,)) for t in range(n_threads)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert q.flush(30)
    finally:
        stop_quietly(q, 5)
    assert q.stats().spilled_pairs > 0 and q.stats().dropped == 0
    assert_verdict(judge(store, [r.id for r in records], ledger))


@pytest.mark.timeout(60)
def test_stop_answers_for_the_calls_made_before_it(store, records, spill_dir):
    """A review's find: a call made during the drain (written behind it by its caller, after stop()
    returned) made stop() return False, as if something had been left behind."""
    from iai_queue.writebehind.lifecycle import Lifecycle

    rid = records[0].id
    gate = Gate(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    for n in range(3):
        q.enqueue([(rid, {"n": n})])
    assert gate.entered.wait(10)
    answer = []
    stopper = threading.Thread(target=lambda: answer.append(q.stop(timeout=20)))
    stopper.start()
    wait_for(lambda: q._admission.state is Lifecycle.CLOSING, 10, what="stop() to begin")
    late = threading.Thread(target=q.enqueue, args=([(rid, {"n": 99})],))  # waits for the drain
    late.start()
    gate.open()
    stopper.join(30)
    late.join(30)
    assert answer == [True]
    assert [e["n"] for e in store.get(rid).provenance] == [0, 1, 2, 99] and store.provenance_rows() == 4
    assert q.stop(1) is True  # a second stop(): everything so far is written
