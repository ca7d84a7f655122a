"""Issue 9: a worker that ``stop()`` gave up on must never touch the next run's state.

The soak lost one accepted entry in 98 016 (session 4), uncounted, with no
duplicate and no reorder. The mechanism: ``stop()`` abandons a worker that is
still busy, ``start()`` begins a new run on the same queue, and the old worker
comes back and changes what the runs share — it takes the new run's memory, or
marks the new run's batch in flight as safe on disk, or clears it. The next
``stop()`` then finds nothing to spill while the new worker gives up on that
batch: gone, counted nowhere.

Each test forces one interleaving with the real store: the store seam (a
wrapper on ``append_provenance_batch``) holds writes and refuses one, and the
old run's thread is parked at one point by wrapping one method on the queue's
own parts. On the code before the fixes (e1c4d01, cfb8f72) the three in-flight
tests lost entry 3, the replay test reordered, the spill-thread test found the
old thread still running and the refill test left entries on disk.
"""

from __future__ import annotations

import threading

import pytest

from _loss_helpers import FAST, drain
from _proc_helpers import wait_for
from iai_queue import ProvenanceWriteQueue
from iai_queue.writebehind import replay as replay_module
from iai_queue.writebehind.admission import Route
from iai_queue.writebehind.lifecycle import Lifecycle


class Turnstile:
    """The store seam: while ``held``, writes wait (at most 30 s) until ``release()``; ``refuse_next``
    makes the next released write fail before it writes anything."""

    def __init__(self, store):
        self.real = store.append_provenance_batch
        self.lock = threading.Lock()
        self.held = False
        self.go = threading.Event()
        self.waiting = threading.Event()
        self.refuse_next = False
        store.append_provenance_batch = self

    def hold(self) -> None:
        with self.lock:
            self.held, self.go, self.waiting = True, threading.Event(), threading.Event()

    def release(self, refuse: bool = False) -> None:
        with self.lock:
            self.refuse_next = refuse
            self.held = False
            self.go.set()

    def __call__(self, pairs, records_cache=None):
        with self.lock:
            held, go, waiting = self.held, self.go, self.waiting
        if held:
            waiting.set()
            go.wait(30)
            with self.lock:
                refuse, self.refuse_next = self.refuse_next, False
            if refuse:
                raise ConnectionError("test: the store refused the write")
        return self.real(pairs, records_cache=records_cache)


def _park(monkeypatch, obj, name: str, thread: threading.Thread, when=lambda *a: True, after: bool = False,
          returned=lambda out: True):
    """Wrap ``obj.name`` (an instance's method or a module's function): on ``thread``, the first time
    ``when(*args)``, wait for ``release`` — before the call, or ``after`` it when ``returned(result)``.
    Returns (parked, release) events."""
    real = getattr(obj, name)
    parked, release = threading.Event(), threading.Event()

    def wrapper(*args, **kw):
        park = threading.current_thread() is thread and not parked.is_set() and when(*args)
        if park and not after:
            parked.set()
            assert release.wait(30)
        out = real(*args, **kw)
        if park and after and returned(out):
            parked.set()
            assert release.wait(30)
        return out

    monkeypatch.setattr(obj, name, wrapper)
    return parked, release


def _order(store, rid) -> list:
    return [e["n"] for e in store.get(rid).provenance]


def _second_run_loses_nothing(q, store, spill_dir, rid, turnstile, old_worker, release_old) -> None:
    """The new run holds n=3 in the store; the old worker comes back; stop() gives up on the new worker and
    the held write is refused. n=3 must be spilled by that stop(), not lost."""
    turnstile.hold()
    q.enqueue([(rid, {"n": 3})])
    assert turnstile.waiting.wait(10), "the new run's worker never reached the store"
    release_old.set()
    old_worker.join(10)
    assert not old_worker.is_alive(), "the abandoned worker did not exit"
    assert q.stop(timeout=0.3) is False  # the new worker is still in the store: abandoned, its batch spilled
    turnstile.release(refuse=True)
    assert q.stats().dropped == 0
    drain(store, spill_dir)
    assert _order(store, rid) == [0, 1, 2, 3]
    assert store.provenance_rows() == 4


@pytest.mark.timeout(60)
def test_an_abandoned_replay_never_marks_the_next_runs_batch_as_on_disk(store, records, spill_dir, monkeypatch):
    """The old worker is parked after parsing its spill file, before it delivers it; it comes back while
    the new run's worker has a memory batch in the store."""
    rid = records[0].id
    turnstile = Turnstile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_batch_pairs=1, max_queue_size=1,
                             max_memory_pairs=64, spill_file_pairs=16, **FAST).start()
    old_worker = q._threads.worker
    # after parsing its spill file, before delivering it
    parsed, release_old = _park(monkeypatch, replay_module, "parse_file", old_worker, after=True)
    try:
        turnstile.hold()
        q.enqueue([(rid, {"n": 0})])
        assert turnstile.waiting.wait(10)  # the worker holds n=0 in the store
        q.enqueue([(rid, {"n": 1})])  # memory
        q.enqueue([(rid, {"n": 2})])  # memory is full: spilled
        wait_for(lambda: q.stats().spilled_files >= 1, 10, what="n=2's spill file")
        turnstile.release()  # n=0, n=1 land; the worker replays n=2's file and parks after parsing it
        assert parsed.wait(10), "the worker never replayed the spill file"
        assert q.stop(timeout=0.3) is False  # it is parked: abandoned, n=2 stays in its claimed file
        q.start()
        wait_for(lambda: _order(store, rid) == [0, 1, 2] and q._admission.route is Route.MEMORY, 10,
                 what="the new run's replay of the claimed file")
        _second_run_loses_nothing(q, store, spill_dir, rid, turnstile, old_worker, release_old)
    finally:
        release_old.set()
        turnstile.release()
        q.stop(2)


@pytest.mark.timeout(60)
def test_an_abandoned_worker_never_takes_the_next_runs_memory(store, records, spill_dir, monkeypatch):
    """The old worker is parked on its way into take(), after its last abandoned check, while stop()
    closes the queue; it comes back in the new run."""
    rid = records[0].id
    turnstile = Turnstile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_batch_pairs=1, max_queue_size=100, **FAST).start()
    adm = q._admission
    old_worker = q._threads.worker
    # take() asks whether two batches wait; only there, and only once the queue is closing
    parked, release_old = _park(monkeypatch, adm, "full_batch_waiting", old_worker,
                                when=lambda n: n == 2 and adm.state is not Lifecycle.RUNNING)
    try:
        turnstile.hold()
        q.enqueue([(rid, {"n": 0})])
        assert turnstile.waiting.wait(10)
        q.enqueue([(rid, {"n": 1})])  # memory
        stopper = threading.Thread(target=q.stop, kwargs={"timeout": 1.0})  # n=0 lands well within it
        stopper.start()
        wait_for(lambda: adm.state is not Lifecycle.RUNNING, 10, what="stop() to close the queue")
        turnstile.release()  # n=0 lands; the worker sees n=1 and parks on its way into take()
        assert parked.wait(10), "the worker never went for n=1"
        stopper.join(10)
        assert not stopper.is_alive() and adm.state is Lifecycle.STOPPED  # n=1 spilled by stop()
        q.start()
        wait_for(lambda: _order(store, rid) == [0, 1] and adm.route is Route.MEMORY, 10,
                 what="the new run's replay of n=1")
        q.enqueue([(rid, {"n": 2})])
        assert q.flush(5)
        _second_run_loses_nothing(q, store, spill_dir, rid, turnstile, old_worker, release_old)
    finally:
        release_old.set()
        turnstile.release()
        q.stop(2)


@pytest.mark.timeout(60)
def test_an_abandoned_worker_never_clears_the_next_runs_batch(store, records, spill_dir, monkeypatch):
    """The old worker's last write landed; it is parked between that and marking its batch finished,
    while stop() gives up on it and a new run starts."""
    rid = records[0].id
    turnstile = Turnstile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_batch_pairs=1, **FAST).start()
    old_worker = q._threads.worker
    # deliver() returned (the write landed); the worker is on its way to finish_locked()
    parked, release_old = _park(monkeypatch, q._delivery, "deliver", old_worker, after=True)
    try:
        q.enqueue([(rid, {"n": 0})])
        assert parked.wait(10), "the worker never delivered n=0"
        assert q.stop(timeout=0.3) is False  # it is parked: abandoned (n=0 is in the store)
        q.start()
        q.enqueue([(rid, {"n": 1})])
        q.enqueue([(rid, {"n": 2})])
        # (not flush(): that waits for n=0's call too, which the parked worker has not marked done)
        wait_for(lambda: _order(store, rid) == [0, 1, 2], 10, what="the new run's writes")
        _second_run_loses_nothing(q, store, spill_dir, rid, turnstile, old_worker, release_old)
    finally:
        release_old.set()
        turnstile.release()
        q.stop(2)


@pytest.mark.timeout(60)
def test_a_file_claimed_since_the_listing_is_waited_for_not_overtaken(store, records, spill_dir):
    """A worker stop() gave up on may still claim a file a new run has just listed. The new run must not
    skip it and replay the younger files first: it looks again, and replays the claimed file first."""
    from _loss_helpers import FailWhile

    rid = records[0].id
    down = FailWhile(store)
    q1 = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=1, max_memory_pairs=2,
                              spill_file_pairs=2, **FAST).start()
    for n in range(8):
        q1.enqueue([(rid, {"n": n})])
    q1.stop(timeout=0.2)  # the store is down: everything in spill files, oldest first
    down.failing.clear()
    files = sorted(p.name for p in spill_dir.glob("*.jsonl"))
    assert len(files) >= 2, files

    q2 = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST)
    real_claim = q2._spill.claim
    taken = []

    def claim(name):
        if not taken and not name.endswith(".claimed"):
            taken.append(name)  # claimed by someone else between the listing and this claim
            real_claim(name)
        return real_claim(name)

    q2._spill.claim = claim
    q2.start()
    try:
        wait_for(lambda: len(_order(store, rid)) == 8, 15, what="the replay of every file")
    finally:
        q2.stop(2)
    assert taken, "the replay never claimed a file"
    assert _order(store, rid) == list(range(8))
    assert store.provenance_rows() == 8


@pytest.mark.timeout(60)
def test_a_spill_thread_stop_gave_up_on_exits_instead_of_spilling_beside_the_next_runs(store, records, spill_dir,
                                                                                       monkeypatch):
    """The old run's spill thread is stuck in a file write past stop()'s bound; a new run starts. When the
    write returns, that thread must exit, not go on taking the new run's buffer beside its spill thread
    (two threads naming files side by side can name a younger file first)."""
    from iai_queue.writebehind import stopping

    monkeypatch.setattr(stopping, "SPILL_IN_FLIGHT_WAIT_S", 0.2)
    rid = records[0].id
    turnstile = Turnstile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=1, spill_file_pairs=1, **FAST).start()
    old_spill = q._threads.spill
    parked, release_old = _park(monkeypatch, q._spill, "write", old_spill)
    try:
        turnstile.hold()
        q.enqueue([(rid, {"n": 0})])
        assert turnstile.waiting.wait(10)  # the worker holds n=0 in the store
        q.enqueue([(rid, {"n": 1})])  # memory
        q.enqueue([(rid, {"n": 2})])  # spill buffer: the spill thread's write of it parks
        assert parked.wait(10), "the spill thread never wrote"
        q.stop(timeout=0.3)
        turnstile.release()
        q.start()
        assert q._threads.spill is not old_spill
        release_old.set()
        old_spill.join(10)
        assert not old_spill.is_alive(), "the old run's spill thread is still running beside the new one's"
        q.enqueue([(rid, {"n": 3})])
    finally:
        release_old.set()
        turnstile.release()
        q.stop(2)
    drain(store, spill_dir)
    assert _order(store, rid) == [0, 1, 2, 3]
    assert store.provenance_rows() == 4


@pytest.mark.timeout(60)
def test_an_abandoned_journal_refill_puts_nothing_into_memory(store, records, spill_dir, monkeypatch):
    """Write-ahead mode: the old worker is parked mid-refill (the backlog read, not yet moved to memory)
    while stop() closes the journal and a new run starts. What it read stays in the journal, replayed
    once and in order by the new run; nothing of it goes into memory ahead of, or beside, that replay."""
    from iai_queue.writebehind import journaling

    rid = records[0].id
    turnstile = Turnstile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", max_queue_size=2,
                             max_batch_pairs=1, **FAST).start()
    old_worker = q._threads.worker
    # the backlog read (records taken), not yet moved into memory
    parked, release_old = _park(monkeypatch, journaling, "read_backlog", old_worker, after=True,
                                returned=lambda out: bool(out[0]))
    try:
        turnstile.hold()
        q.enqueue([(rid, {"n": 0})])
        assert turnstile.waiting.wait(10)  # the worker holds n=0 in the store
        for n in range(1, 6):  # n=1, 2 in memory; n=3..5 on disk only (the backlog)
            q.enqueue([(rid, {"n": n})])
        turnstile.release()  # 0, 1, 2 land; memory is empty: the worker refills and parks
        assert parked.wait(10), "the worker never refilled from the backlog"
        q.stop(timeout=0.3)
        q.start()
        q.enqueue([(rid, {"n": 6})])
        release_old.set()
        old_worker.join(10)
        assert not old_worker.is_alive()
        wait_for(lambda: len(_order(store, rid)) >= 7, 15, what="every entry in the store")
        assert q.flush(5)
    finally:
        release_old.set()
        turnstile.release()
        q.stop(2)
    assert _order(store, rid) == list(range(7))
    assert store.provenance_rows() == 7
