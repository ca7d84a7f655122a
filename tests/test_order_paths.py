"""Order per record across the toggle's paths: the reorders the chaos soak found under CPU load.

Each test forces one interleaving the soak's ``--trace`` showed, with the
sanctioned seams only (a wrapper on the store instance's
``append_provenance_batch``) and events, never sleeps; real LanceDB in
``tmp_path``, and checks order per record, ``get()`` and the row count.
"""

from __future__ import annotations

import threading

import pytest

from _loss_helpers import FAST, drain
from _proc_helpers import wait_for
from iai_queue import ProvenanceWriteQueue


class RefuseNext:
    """Wraps ``store.append_provenance_batch``: the next ``n`` writes fail before writing anything."""

    def __init__(self, store, n: int = 1):
        self.real = store.append_provenance_batch
        self.left = n
        self.refused = 0
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        if self.left > 0:
            self.left -= 1
            self.refused += 1
            raise ConnectionError("test: write refused")
        return self.real(pairs, records_cache=records_cache)


def _order(store, rid) -> list:
    return [e["n"] for e in store.get(rid).provenance]


@pytest.mark.timeout(60)
def test_sync_write_never_overtakes_what_a_replaced_queue_spilled_after_disable(store, records, spill_dir):
    """The soak's trace: a caller still holding a disabled queue writes through its closed route; the
    store refuses, so the entry is spilled (after the disable had found the queue drained clean). The
    same caller's next write takes the store's synchronous path — it must land behind that entry,
    not in front of it (it did: the synchronous path knew only its own files)."""
    rid = records[0].id
    q = store.enable_provenance_queue(spill_dir=spill_dir, **FAST)
    store.queue_provenance_batch([(rid, {"n": 0})])
    store.disable_provenance_queue()  # drained clean: nothing left to keep order behind, so far
    assert _order(store, rid) == [0]
    refuse = RefuseNext(store)
    held: ProvenanceWriteQueue = q  # a caller that read the live queue just before the disable

    def caller() -> None:
        held.enqueue([(rid, {"n": 1})])  # closed route: the write is refused, the entry spilled
        store.queue_provenance_batch([(rid, {"n": 2})])  # disabled: the synchronous path

    t = threading.Thread(target=caller)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert refuse.refused == 1
    drain(store, spill_dir)
    assert _order(store, rid) == [0, 1, 2]
    assert store.provenance_rows() == 3


@pytest.mark.timeout(60)
def test_a_stopped_queues_late_spill_is_not_taken_for_a_dead_writers_empty_tmp(store, records, spill_dir,
                                                                               monkeypatch):
    """A stopped queue has released its writer lock, yet its closed route still spills (the store
    refused the write). Another replayer of this process recovering tmp files at the instant between
    the spill's open() and its flock saw an empty tmp of a "dead" writer and removed it: the spill's
    rename failed and the accepted entry was dropped on a healthy disk (the soak's --trace: "spill
    closed-write -> FAILED FileNotFoundError")."""
    import iai_queue.spill.directory as directory_module

    rid = records[0].id
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    q.enqueue([(rid, {"n": 0})])
    assert q.flush(5)
    q.stop()  # released: its later files are orphans at once
    other = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST)  # another replayer (never started)
    real_lock_fd = directory_module.lock_fd
    recovered = []

    def recoverer_runs_between_open_and_flock(fd):
        if not recovered:
            with other.spill_directory.replay_lock() as held:
                assert held
                recovered.append(other.spill_directory.recover_tmp_files())
        return real_lock_fd(fd)

    monkeypatch.setattr(directory_module, "lock_fd", recoverer_runs_between_open_and_flock)
    RefuseNext(store)
    q.enqueue([(rid, {"n": 1})])  # closed route: refused, so spilled by the stopped queue
    monkeypatch.setattr(directory_module, "lock_fd", real_lock_fd)
    assert recovered, "the recoverer never ran"
    assert q.stats().dropped == 0
    drain(store, spill_dir)
    assert _order(store, rid) == [0, 1]
    assert store.provenance_rows() == 2


_RECOVER_IN_ANOTHER_PROCESS = """
import sys
from iai_queue.spill import SpillDirectory
sd = SpillDirectory(sys.argv[1], tag=sys.argv[2])
with sd.replay_lock() as held:
    assert held
    print(sd.recover_tmp_files())
"""


@pytest.mark.timeout(60)
def test_a_late_spill_whose_empty_tmp_another_process_removed_is_written_anew(store, records, spill_dir,
                                                                              monkeypatch):
    """The same window seen from another process, which cannot know our released writer is alive:
    it removes the empty tmp; the writer notices its tmp is gone once it holds the lock, and writes a new one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import iai_queue.spill.directory as directory_module

    rid = records[0].id
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    q.enqueue([(rid, {"n": 0})])
    assert q.flush(5)
    q.stop()
    real_lock_fd = directory_module.lock_fd
    removed = []
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def another_process_recovers_between_open_and_flock(fd):
        if not removed:
            r = subprocess.run([sys.executable, "-c", _RECOVER_IN_ANOTHER_PROCESS, str(spill_dir),
                                q.spill_directory.store], capture_output=True, text=True, timeout=30, env=env)
            assert r.returncode == 0, r.stderr
            removed.append(r.stdout.strip())
        return real_lock_fd(fd)

    monkeypatch.setattr(directory_module, "lock_fd", another_process_recovers_between_open_and_flock)
    RefuseNext(store)
    q.enqueue([(rid, {"n": 1})])  # closed route: refused, so spilled by the stopped queue
    monkeypatch.setattr(directory_module, "lock_fd", real_lock_fd)
    assert removed == ["0"], removed  # it removed the empty tmp (recovered none)
    assert q.stats().dropped == 0
    drain(store, spill_dir)
    assert _order(store, rid) == [0, 1]
    assert store.provenance_rows() == 2


class HoldThenRefuse:
    """Wraps ``store.append_provenance_batch``: the first write waits for ``release``, then fails unwritten."""

    def __init__(self, store):
        self.real = store.append_provenance_batch
        self.entered = threading.Event()
        self.release = threading.Event()
        self.first = True
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        if self.first:
            self.first = False
            self.entered.set()
            assert self.release.wait(30)
            raise ConnectionError("test: write refused")
        return self.real(pairs, records_cache=records_cache)


@pytest.mark.timeout(60)
def test_a_queue_enabled_during_a_replaced_queues_closed_write_starts_behind_its_spill(store, records, spill_dir):
    """The soak's trace: a caller holding a replaced queue writes through its closed route; while the
    store holds that write, the toggle enables a new queue, which found no file and started on the
    memory route. The write then failed and was spilled — and the caller's next entry, in the new
    queue's memory, landed before it. Enabling now waits for that write to end (its spill in place)."""
    rid = records[0].id
    old = store.enable_provenance_queue(spill_dir=spill_dir, **FAST)
    store.queue_provenance_batch([(rid, {"n": 0})])
    store.disable_provenance_queue()
    hold = HoldThenRefuse(store)
    caller = threading.Thread(target=old.enqueue, args=([(rid, {"n": 1})],))  # holds the replaced queue
    caller.start()
    assert hold.entered.wait(10), "the closed route never reached the store"
    forwarding = threading.Event()
    real_forward_to = old.forward_to

    def forward_to(enqueue):
        forwarding.set()
        real_forward_to(enqueue)

    old.forward_to = forward_to  # on the instance: the store's toggle calls it while enabling
    enabled: list = []
    enabler = threading.Thread(target=lambda: enabled.append(store.enable_provenance_queue(spill_dir=spill_dir,
                                                                                             **FAST)))
    enabler.start()
    assert forwarding.wait(10), "enable never linked the replaced queue"
    hold.release.set()  # the held write fails: the closed route spills the entry
    caller.join(30)
    enabler.join(30)
    assert not caller.is_alive() and not enabler.is_alive()
    new = enabled[0]
    store.queue_provenance_batch([(rid, {"n": 2})])  # the same caller's next entry, to the live queue
    try:
        assert new.flush(10)
    finally:
        store.disable_provenance_queue()
    drain(store, spill_dir)
    assert _order(store, rid) == [0, 1, 2]
    assert store.provenance_rows() == 3


class SignalingCondition(threading.Condition):
    """``threading.Condition`` that tells the test when someone starts waiting on it."""

    def __init__(self, lock):
        super().__init__(lock)
        self.waiting = threading.Event()

    def wait(self, timeout=None):
        self.waiting.set()
        return super().wait(timeout)


@pytest.mark.timeout(30)
def test_a_chunk_that_waited_for_spill_room_keeps_its_place_when_memory_was_refilled_meanwhile(tmp_path):
    """The plain overflow path (no stop, no toggle): a caller waits for room in the spill buffer
    (backpressure; the lock is released while it waits); meanwhile the worker refills memory from the
    spill buffer and turns the route back to memory. The caller's chunk then went into the spill buffer
    while its next call went to memory, past it (entry 56 landing after 58-72 in a run of
    test_control_threads_overflowing_a_slow_store_lose_nothing). Admission is driven directly with its
    own lock, as the worker and the spill thread drive it; the waiting caller is a real thread."""
    from iai_queue.events import RateLimiter
    from iai_queue.writebehind.admission import Admission, Route
    from iai_queue.writebehind.config import QueueConfig
    from iai_queue.writebehind.ledger import Ledger
    from iai_queue.writebehind.lifecycle import Lifecycle
    from iai_queue.pairs import EntryIds
    import uuid

    lock = threading.Lock()
    cfg = QueueConfig.from_options(spill_dir=tmp_path, max_queue_size=8, max_memory_pairs=2)
    ledger = Ledger(lock)
    adm = Admission(lock, cfg, ledger, RateLimiter(), on_closed=lambda chunk: pytest.fail("closed route"))
    adm.spill_room = room = SignalingCondition(lock)
    adm.set_locked(state=Lifecycle.RUNNING, route=Route.BEHIND_SPILL)
    rid = uuid.uuid4()
    adm.enqueue([(rid, {"who": "other", "n": 0}), (rid, {"who": "other", "n": 1})])  # the buffer is full
    caller = threading.Thread(target=adm.enqueue, args=([(rid, {"who": "me", "n": 0})],))
    caller.start()
    assert room.waiting.wait(10), "the caller never waited for room"
    with lock:  # the worker's idle work: no file waits, so memory is refilled from the buffer
        assert adm.refill_locked(ledger.n["spilled_files"])
        room.notify_all()
    caller.join(10)
    assert not caller.is_alive()
    adm.enqueue([(rid, {"who": "me", "n": 1})])  # the same caller's next call
    with lock:
        pairs, _, _ = adm.take_locked(100, EntryIds())
        served = [(e["who"], e["n"]) for _, e in pairs]  # memory first ...
        served += [(e["who"], e["n"]) for c in adm.spill_buffer for _, e in c[1]]  # ... then what is behind it
    mine = [n for who, n in served if who == "me"]
    assert mine == [0, 1], served


@pytest.mark.timeout(30)
def test_the_worker_does_not_replay_its_own_file_past_a_call_that_reached_memory_after_it_looked(
        store, records, spill_dir, monkeypatch):
    """The worker found memory empty and went to replay its spill files; before it listed them, a call
    reached memory and the caller's next call overflowed into a new spill file (the GIL can keep the
    worker waiting that long under load). Replaying that file then would put the later call first
    (entries 7598-7599 landing after 7610 in a soak under load). Forced here by running both calls from
    within the worker's listing of the directory."""
    from iai_queue.spill import SpillDirectory

    rid = records[0].id
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=1, spill_file_pairs=1, **FAST)
    real_replayable = SpillDirectory.replayable
    armed, fired = threading.Event(), threading.Event()

    def replayable(self):
        if armed.is_set() and threading.current_thread().name == "iai_queue-worker":
            armed.clear()
            before = set(real_replayable(self))
            q.enqueue([(rid, {"n": 1})])  # memory: the worker is here, so it stays there
            q.enqueue([(rid, {"n": 2})])  # memory is full: behind the spill, into a file
            deadline = threading.Event()
            for _ in range(500):
                if set(real_replayable(self)) - before:
                    break
                deadline.wait(0.01)
            fired.set()
        return real_replayable(self)

    monkeypatch.setattr(SpillDirectory, "replayable", replayable)
    q.start()
    try:
        armed.set()
        assert fired.wait(10), "the worker never listed the spill directory"
        assert q.flush(10)
        assert q.stats().spilled_files == 1 and q.stats().replayed == 1  # the later call went through a file
        assert _order(store, rid) == [1, 2]
        assert store.provenance_rows() == 2
    finally:
        q.stop(2)


def _queue_with_n2_behind_the_spill(store, rid, spill_dir, monkeypatch, fail_n2: bool = False):
    """A queue (one batch of memory) whose worker is held in the store on n=0 (``gate``), n=1 in memory
    and n=2 behind the spill. The spill write holding n=2 waits for ``release`` (then fails once if
    ``fail_n2``); any other spill write opens the gate: the abandoned write of n=0 may land then."""
    import errno

    from _loss_helpers import ThreadGate

    gate = ThreadGate(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=1, spill_file_pairs=1, **FAST).start()
    real_write = q._spill.write
    n2_held, release = threading.Event(), threading.Event()

    def write(lines, **kw):
        if b'"n":2' in b"".join(lines) and not n2_held.is_set():
            n2_held.set()
            assert release.wait(20)
            if fail_n2:
                raise OSError(errno.EIO, "test: the disk failed the write stop() gave up waiting for")
        else:
            gate.open()
        return real_write(lines, **kw)

    monkeypatch.setattr(q._spill, "write", write)
    q.enqueue([(rid, {"n": 0})])
    assert gate.entered.wait(10), "the worker never reached the store"
    q.enqueue([(rid, {"n": 1})])  # memory
    q.enqueue([(rid, {"n": 2})])  # memory is full: behind the spill
    return q, gate, n2_held, release


@pytest.mark.timeout(60)
def test_a_closed_route_write_waits_for_stops_last_spill(store, records, spill_dir, monkeypatch):
    """The item-2 flake's trace: a call waited in the spill buffer when the spill thread had already
    gone, so stop() took it and spilled it itself, after marking the queue stopped. A caller waiting on
    the closed route went on at that mark, found no file yet, and wrote its next call synchronously:
    entry 162 landed before 160. Forced here: the spill loop does nothing (it has gone), and stop()'s
    spill of that last call is held until the caller has had its chance to overtake it."""
    from iai_queue.writebehind.spilling import SpillThread

    monkeypatch.setattr(SpillThread, "run", lambda self, stop: None)  # n=2 stays in the spill buffer
    rid = records[0].id
    q, gate, n2_held, release = _queue_with_n2_behind_the_spill(store, rid, spill_dir, monkeypatch)
    try:
        stopper = threading.Thread(target=q.stop, kwargs={"timeout": 0.2})
        stopper.start()
        assert n2_held.wait(20), "stop() never spilled the last call"
        caller = threading.Thread(target=q.enqueue, args=([(rid, {"n": 3})],))  # the closed route
        caller.start()
        caller.join(1.0)  # the old code wrote n=3 here, ahead of n=2's file
        release.set()
        stopper.join(20)
        caller.join(20)
        assert not stopper.is_alive() and not caller.is_alive()
    finally:
        gate.open()
        release.set()
        q.stop(2)
    drain(store, spill_dir)
    assert _order(store, rid) == [0, 1, 2, 3]
    assert store.provenance_rows() == 4


@pytest.mark.timeout(60)
def test_a_spill_write_that_fails_after_stop_gave_up_on_it_is_spilled_again_not_lost(store, records, spill_dir,
                                                                                      monkeypatch, caplog):
    """stop() waits a bounded time for the spill thread's file in progress; when that write fails later,
    its pairs must not go back into the buffer of a stopped queue (nobody empties it): the spill
    thread spills them again itself."""
    import logging

    from iai_queue.writebehind import stopping

    monkeypatch.setattr(stopping, "SPILL_IN_FLIGHT_WAIT_S", 0.2)
    rid = records[0].id
    with caplog.at_level(logging.WARNING, logger="iai_queue"):
        q, gate, n2_held, release = _queue_with_n2_behind_the_spill(store, rid, spill_dir, monkeypatch,
                                                                    fail_n2=True)
        try:
            assert n2_held.wait(10), "the spill thread never wrote"
            q.stop(timeout=0.2)
            assert any(getattr(r, "event", "") == "stop.spill_stuck" for r in caplog.records)
            release.set()
            q._threads.spill.join(10)
            assert not q._threads.spill.is_alive()
            assert q.stats().dropped == 0
        finally:
            release.set()
            gate.open()
            q.stop(2)
    drain(store, spill_dir)
    assert _order(store, rid) == [0, 1, 2]
    assert store.provenance_rows() == 3


class RefuseAll:
    """Wraps ``store.append_provenance_batch``: every write fails, before writing anything, until ``heal()``."""

    def __init__(self, store):
        self.store = store
        self.real = store.append_provenance_batch
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        raise ConnectionError("test: store down")

    def heal(self) -> None:
        self.store.append_provenance_batch = self.real


def _disable_with_everything_in_the_journal(store, rid, spill_dir, n: int) -> RefuseAll:
    """A write-ahead queue takes ``n`` calls while the store refuses every write, then is disabled: its
    stop() (no exit drain in journal mode) leaves them all in its journal."""
    down = RefuseAll(store)
    store.enable_provenance_queue(spill_dir=spill_dir, durability="process", **FAST)
    for i in range(n):
        store.queue_provenance_batch([(rid, {"n": i})])
    store.disable_provenance_queue(timeout=0.2)
    assert any(p.name.endswith(".wal") for p in spill_dir.iterdir()), "nothing was left in the journal"
    assert store.provenance_rows() == 0
    return down


@pytest.mark.timeout(60)
def test_a_disabled_write_lands_behind_what_a_journaling_queue_left_in_its_journal(store, records, spill_dir):
    """A review's find: the synchronous path looked for spill files only, so a write made after disabling
    a write-ahead queue landed ahead of the calls that queue had left in its journal. It replays the
    journal first now, on the caller's thread."""
    rid = records[0].id
    _disable_with_everything_in_the_journal(store, rid, spill_dir, 200).heal()
    store.queue_provenance_batch([(rid, {"n": 200})])  # disabled: the synchronous path
    assert _order(store, rid) == list(range(201))  # in the store now, and behind the journal's calls
    assert store.provenance_rows() == 201
    assert not any(p.name.endswith(".wal") for p in spill_dir.iterdir())


@pytest.mark.timeout(60)
def test_a_disabled_write_that_cannot_replay_the_journal_is_spilled_behind_it(store, records, spill_dir):
    """The same, with the store still down at the disabled write: the entry is spilled behind the
    journal, and the next queue lands both, in order."""
    rid = records[0].id
    down = _disable_with_everything_in_the_journal(store, rid, spill_dir, 50)
    store.queue_provenance_batch([(rid, {"n": 50})])  # cannot replay, cannot write: spilled behind
    assert store.provenance_rows() == 0
    down.heal()
    q = store.enable_provenance_queue(spill_dir=spill_dir, **FAST)
    try:
        wait_for(lambda: store.provenance_rows() >= 51, 20, what="the replay of the journal and the spill")
        assert q.flush(5)
    finally:
        store.disable_provenance_queue()
    assert _order(store, rid) == list(range(51))
    assert store.provenance_rows() == 51


@pytest.mark.timeout(90)
def test_a_disabled_write_replays_a_large_journal_for_a_bounded_time_then_spills_behind(store, records,
                                                                                         spill_dir, monkeypatch):
    """A review's find: the disabled write replayed everything a write-ahead queue had left, on the
    caller's thread, however long that took (the budget bounded only a failing store). It now stops
    after the budget (a segment at a time), spills its entry behind the rest, and order holds."""
    from conftest import slow_store
    from iai_queue.writebehind import journaling

    writer = journaling.JournalWriter
    monkeypatch.setattr(journaling, "JournalWriter",
                        lambda *a, **k: writer(*a, **{**k, "segment_bytes": 32 << 10}))  # many small segments
    rid = records[0].id
    n = 1500
    down = RefuseAll(store)
    store.enable_provenance_queue(spill_dir=spill_dir, durability="process", **FAST)
    for i in range(n):
        store.queue_provenance_batch([(rid, {"n": i})])
    store.disable_provenance_queue(timeout=0.2)
    segments = [p for p in spill_dir.iterdir() if p.name.endswith(".wal")]
    assert len(segments) >= 4
    down.heal()
    slow_store(store, 0.4)  # each segment's replay takes a write of 0.4 s: more than the 1 s budget in all
    store.queue_provenance_batch([(rid, {"n": n})])  # disabled: replays some, then spills behind the rest
    assert [p for p in spill_dir.iterdir() if p.name.endswith(".wal")], "it replayed every segment first"
    assert [p for p in spill_dir.iterdir() if p.name.endswith(".jsonl")], "its entry was not spilled behind"
    drain(store, spill_dir, timeout=60)
    assert _order(store, rid) == list(range(n + 1))
    assert store.provenance_rows() == n + 1
