"""Write-ahead mode (issue 11): real processes, real SIGKILL, real files, a real small filesystem.

The entry ``{"c": child, "n": k}`` identifies every enqueue call; a child reports
``acked upto=k`` only after ``enqueue`` for k has returned, so every acked call
must be in the store exactly once, whatever happened after.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from iai_queue import ProvenanceWriteQueue
from iai_queue.journal import Durability, JournalWriter, scan_segment
from iai_queue.journal.format import MAGIC
from iai_queue.spill import SpillDirectory, status
from iai_queue.writebehind.journal_replay import JournalReplayer
from iai_queue.writebehind.lifecycle import StopSignal

from _proc_helpers import Reader, wait_for


def wait_until(cond, timeout, what):
    return wait_for(cond, timeout, interval=0.05, what=what)

from conftest import make_records

CHILD = str(Path(__file__).resolve().parent / "_journal_child.py")


def spawn(**args) -> Reader:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    return Reader(proc)


def last_ack(r: Reader) -> int:
    acks = r.of("acked")
    return acks[-1]["upto"] if acks else -1


def entries(store, ids) -> dict[str, list[tuple]]:
    return {str(rid): [(e["c"], e["n"]) for e in store.get(rid).provenance] for rid in ids}


def check_landed(store, ids, acked: dict, across_children: bool = True) -> int:
    """Every acked (c, n) once; nothing twice (rows counted); per record in n order per child, and in
    child order too when the children ran one after another (``across_children``). Returns rows."""
    got = entries(store, ids)
    seen = defaultdict(int)
    for rid, lst in got.items():
        for cn in lst:
            seen[cn] += 1
        if across_children:
            assert lst == sorted(lst), f"record {rid}: order broken: {lst[:40]}"
        for c in {c for c, _ in lst}:
            mine = [n for cc, n in lst if cc == c]
            assert mine == sorted(mine), f"record {rid}, child {c}: order broken: {mine[:40]}"
    dup = [cn for cn, k in seen.items() if k > 1]
    assert not dup, f"duplicates: {dup[:10]}"
    missing = [(c, n) for c, upto in acked.items() for n in range(upto + 1) if (c, n) not in seen]
    assert not missing, f"{len(missing)} acked entries missing, e.g. {missing[:10]}"
    assert store.provenance_rows() == len(seen), f"{store.provenance_rows()} rows for {len(seen)} entries"
    return len(seen)


def drain(store, spill_dir, timeout=30.0) -> None:
    """A queue of this process replays every orphan journal and spill file, then stops."""
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process").start()
    try:
        wait_until(lambda: not [n for n in os.listdir(spill_dir) if n.endswith((".wal", ".jsonl", ".claimed"))
                                and "failed" not in n and q._spill.writer not in n] and q.flush(1.0),
                   timeout, "the journals to be replayed")
    finally:
        q.stop(5.0)


@pytest.fixture
def ids(store):
    recs = make_records(6)
    store.insert_many(recs)
    return [r.id for r in recs]


# -- SIGKILL at random moments ------------------------------------------------------------

def kill_run(store, ids, spill_dir, kills: int, seed: int) -> dict:
    rnd = random.Random(seed)
    acked = {}
    for c in range(kills):
        r = spawn(db=str(store.path), spill_dir=str(spill_dir), ids=[str(i) for i in ids], tag=c,
                  outages=True, opts={"durability": "process", "max_queue_size": 16})
        r.wait_event("acked", 30)
        time.sleep(rnd.uniform(0.05, 0.5))
        r.proc.send_signal(signal.SIGKILL)
        r.finish(10)
        acked[c] = last_ack(r)
    return acked


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_loses_and_doubles_nothing(store, ids, spill_dir):
    acked = kill_run(store, ids, spill_dir, kills=8, seed=11)
    assert sum(v + 1 for v in acked.values()) > 100
    drain(store, spill_dir)
    landed = check_landed(store, ids, acked)
    assert landed >= sum(v + 1 for v in acked.values())


# -- torn and damaged journals --------------------------------------------------------------

PREFIX = "qtest-"


def write_dead_journal(spill_dir: Path, store, ids, records: int) -> tuple[Path, list]:
    """A journal segment as a dead writer leaves it: records ``n=0..records-1``, the lock released."""
    d = SpillDirectory(spill_dir, store_path=store.path)
    w = JournalWriter(d, PREFIX, Durability.PROCESS)
    w.open()
    offsets = []
    with w.lock:
        for n in range(records):
            seg, off = w.append_locked(n + 1, ((ids[n % len(ids)], {"c": 0, "n": n}),))
            offsets.append(off)
    path, used = w.current.path, w.current.size
    for s in w.segments:
        os.close(s.fd)
    d.release()  # the writer is gone
    os.truncate(path, used)  # without its zero tail (test_journal_framing.py covers that): these tests cut the data
    return path, offsets + [used]


@pytest.mark.timeout(60)
def test_journal_cut_at_every_byte_of_its_last_records(store, ids, tmp_path):
    spill_dir = tmp_path / "cut"
    path, bounds = write_dead_journal(spill_dir, store, ids, 12)
    whole = path.read_bytes()
    first_cut = bounds[-4]
    for cut in range(first_cut, len(whole) + 1):
        scan = scan_segment(path, whole[:cut])
        complete = sum(1 for b in bounds[1:] if b <= cut)  # records whose last byte is before the cut
        assert [r.items[0][1]["n"] for r in scan.records] == list(range(complete)), cut
        if cut in bounds:
            assert not scan.damage, cut
        else:
            (d,) = scan.damage
            assert (d.offset, d.end) == (bounds[complete], cut) and "torn" in d.reason, (cut, d)
    # Replayed for real at a cut inside a frame, inside a payload, and at a record boundary.
    for cut in (first_cut + 3, bounds[-2] + 20, bounds[-2]):
        spill_dir.joinpath(path.name).write_bytes(whole[:cut])
        before = store.provenance_rows()
        r = JournalReplayer.for_store(store, spill_dir)
        assert r.replay_all(StopSignal()) == 1
        complete = sum(1 for b in bounds[1:] if b <= cut)
        assert store.provenance_rows() == max(before, complete)  # verified: what landed before never twice
        failed = sorted(spill_dir.glob("*.failed-*.wal"))
        if cut not in bounds:
            assert failed and failed[-1].read_bytes() == whole[bounds[complete]:cut]  # byte for byte
            assert "torn" in failed[-1].with_suffix(".reason").read_text()
            for f in failed:
                f.unlink()
                f.with_suffix(".reason").unlink()
        assert not list(spill_dir.glob("*.wal"))
    check_landed(store, ids, {0: 10})


@pytest.mark.timeout(60)
def test_flipped_bytes_set_the_record_aside_and_resync_to_the_next(store, ids, tmp_path):
    spill_dir = tmp_path / "flip"
    path, bounds = write_dead_journal(spill_dir, store, ids, 30)
    whole = path.read_bytes()
    rnd = random.Random(5)
    for victim in rnd.sample(range(1, 29), 12):  # flips inside one record, anywhere in it
        data = bytearray(whole)
        for _ in range(rnd.randint(1, 3)):
            i = rnd.randrange(bounds[victim], bounds[victim + 1])
            data[i] ^= 1 << rnd.randrange(8)
        scan = scan_segment(path, bytes(data))
        got = [r.items[0][1]["n"] for r in scan.records]
        assert got == [n for n in range(30) if n != victim], victim
        (d,) = scan.damage
        assert (d.offset, d.end) == (bounds[victim], bounds[victim + 1])
    # Replayed for real: the others land once, the damaged record is set aside with its reason.
    victim = 17
    data = bytearray(whole)
    data[bounds[victim] + 12] ^= 0xFF
    path.write_bytes(bytes(data))
    JournalReplayer.for_store(store, spill_dir).replay_all(StopSignal())
    (failed,) = spill_dir.glob("*.failed-*.wal")
    assert failed.read_bytes() == bytes(data[bounds[victim]:bounds[victim + 1]])
    assert "checksum mismatch" in failed.with_suffix(".reason").read_text()
    got = sorted(n for lst in entries(store, ids).values() for _, n in lst)
    assert got == [n for n in range(30) if n != victim]
    assert store.provenance_rows() == 29
    st = status(spill_dir).as_dict()
    assert st["quarantined_files"] == 1


def test_damaged_header_sets_the_whole_segment_aside(store, ids, tmp_path):
    spill_dir = tmp_path / "hdr"
    path, _ = write_dead_journal(spill_dir, store, ids, 3)
    data = bytearray(path.read_bytes())
    data[len(MAGIC) + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    JournalReplayer.for_store(store, spill_dir).replay_all(StopSignal())
    (failed,) = spill_dir.glob("*.failed-*.wal")
    assert failed.read_bytes() == bytes(data) and not path.exists()
    assert store.provenance_rows() == 0


# -- several processes on one directory ------------------------------------------------------

@pytest.mark.timeout(90)
def test_live_writers_never_replay_each_other_and_a_dead_ones_journal_lands_once(store, ids, spill_dir):
    common = dict(db=str(store.path), spill_dir=str(spill_dir), ids=[str(i) for i in ids])
    a = spawn(**common, tag=0, n=200, block_store=True)  # A's store takes nothing: all of A waits in A's journal
    a.wait_event("enqueued", 30)
    b = spawn(**common, tag=1, n=50)
    c = spawn(**common, tag=2, n=50)
    for r in (b, c):
        r.wait_event("enqueued", 30)
    wait_until(lambda: len([e for e in b.of("stats") + c.of("stats")]) >= 6, 20, "B and C to idle a while")
    a_files = [n for n in os.listdir(spill_dir) if n.endswith(".wal") and a.of("started")[0]["pid"] and
               f"-w{a.of('started')[0]['pid']}x" in n]
    assert a_files, os.listdir(spill_dir)
    for n in a_files:
        assert (spill_dir / n).exists()  # untouched while A lives
    assert not [e for e in entries(store, ids).values() for cn in e if cn[0] == 0]
    assert all(e["replayed"] == 0 for e in b.of("stats") + c.of("stats"))
    a.proc.send_signal(signal.SIGKILL)
    a.finish(10)
    wait_until(lambda: not any((spill_dir / n).exists() for n in a_files), 30, "A's journal to be replayed")
    for r in (b, c):
        r.proc.send_signal(signal.SIGKILL)
        r.finish(10)
    drain(store, spill_dir)
    check_landed(store, ids, {0: 199, 1: 49, 2: 49}, across_children=False)  # B and C ran beside A


# -- exit and SIGTERM ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_exit_and_sigterm_return_fast_and_lose_nothing(store, ids, spill_dir, how):
    r = spawn(db=str(store.path), spill_dir=str(spill_dir), ids=[str(i) for i in ids], tag=0, n=300,
              store_delay_s=5.0, exit=(how == "exit"), sigterm_helper=(how == "sigterm"),
              opts={"durability": "process"})
    r.wait_event("enqueued", 30)
    t0 = time.monotonic()
    if how == "sigterm":
        r.proc.send_signal(signal.SIGTERM)
    r.finish(10)
    took = time.monotonic() - t0
    assert took < 2.0, f"{how} took {took:.2f}s with a store that takes 5 s per write"
    drain(store, spill_dir)
    check_landed(store, ids, {0: 299})


# -- disk full / read-only -----------------------------------------------------------------------

def _fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:
            pass
    return filler


@pytest.mark.timeout(60)
def test_full_disk_falls_back_to_memory_then_journals_again(store, ids, small_fs):
    spill_dir = small_fs / "spill"
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", retry_max_s=0.05,
                             retry_initial_s=0.01).start()
    try:
        filler = _fill(small_fs, leave=8192)
        for n in range(400):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n, "pad": "x" * 100})])  # never raises
        s = q.stats()
        assert s.journal_fallbacks > 0 and s.dropped == 0
        assert q.flush(20)
        filler.unlink()
        time.sleep(0.1)  # past retry_s: the next append tries a new segment
        before = q.stats().journal_fallbacks
        for n in range(400, 500):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n, "pad": "x"})])
        s = q.stats()
        assert s.journal_fallbacks == before and s.journal_segments >= 1
        assert q.flush(20)
    finally:
        q.stop(5)
    check_landed(store, ids, {0: 499})


@pytest.mark.timeout(60)
def test_read_only_journal_directory_falls_back_then_recovers(store, ids, small_fs):
    spill_dir = small_fs / "spill"
    spill_dir.mkdir(mode=0o700)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", retry_max_s=0.05,
                             retry_initial_s=0.01, max_queue_size=256).start()  # EROFS: cannot open a segment
    try:
        for n in range(100):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])  # never raises
        s = q.stats()
        assert s.journal_fallbacks > 0 and s.journal_segments == 0
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
        time.sleep(0.1)
        for n in range(100, 150):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])
        assert q.stats().journal_segments >= 1
        assert q.flush(20)
    finally:
        q.stop(5)
    check_landed(store, ids, {0: 149})


@pytest.mark.timeout(60)
def test_injected_enospc_falls_back_and_recovers(store, ids, spill_dir, monkeypatch, caplog):
    real = JournalWriter._write_locked
    failing = {"on": True}

    def write(self, seg, data):
        if failing["on"]:
            exc = OSError(errno.ENOSPC, "No space left on device (injected)")
            self._failed_locked(exc)
            raise exc
        return real(self, seg, data)

    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="fsync-interval", retry_max_s=0.05,
                             retry_initial_s=0.01).start()
    try:
        monkeypatch.setattr(JournalWriter, "_write_locked", write)
        with caplog.at_level("ERROR", logger="iai_queue"):
            for n in range(300):
                q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])
        assert q.stats().journal_fallbacks >= 1
        errors = [r for r in caplog.records if "journal.failed" in r.getMessage()]
        assert 1 <= len(errors) < 20  # rate-limited
        failing["on"] = False
        time.sleep(0.1)
        for n in range(300, 400):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])
        assert q.sync(5)
        assert q.flush(20)
    finally:
        q.stop(5)
    check_landed(store, ids, {0: 399})


# -- options, stats, status ---------------------------------------------------------------------------

def test_bad_durability_is_refused_naming_the_value(store):
    with pytest.raises(ValueError, match="durability.*'disk'"):
        ProvenanceWriteQueue(store, durability="disk")


def test_memory_mode_creates_no_journal_and_binds_the_memory_hot_path(store, spill_dir):
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir).start()
    try:
        assert q.enqueue == q._admission.enqueue and q._journal is None
        assert not spill_dir.exists()
    finally:
        q.stop()


def test_backlog_keeps_memory_bounded_and_order(store, ids, spill_dir, gate):
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", max_queue_size=4,
                             coalesce_ms=1).start()
    try:
        for n in range(500):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])
        s = q.stats()
        assert s.journal_backlog > 400 and s.spilled_files == 0 and s.accepted == 500
        assert len(q._admission.pending) <= 4
        st = status(spill_dir).as_dict()
        assert any(f["state"] == "journal" for f in st["files"])
        gate.open()
        assert q.flush(30)
    finally:
        q.stop(5)
    check_landed(store, ids, {0: 499})


class StoreDown:
    """Wraps ``store.append_provenance_batch``: every write fails, before writing anything, until ``heal()``."""

    def __init__(self, store):
        self.store, self.real = store, store.append_provenance_batch
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        raise ConnectionError("test: store down")

    def heal(self) -> None:
        self.store.append_provenance_batch = self.real


def journaled_ns(spill_dir) -> set:
    """The ``n`` of every entry in the journal segments on disk: what a SIGKILL now would leave."""
    return {entry["n"] for p in spill_dir.glob("*.wal") for r in scan_segment(p).records for _, entry in r.items}


@pytest.mark.timeout(60)
def test_calls_after_a_fallback_that_spilled_are_journaled_once_the_disk_takes_them(store, ids, spill_dir,
                                                                                     monkeypatch):
    """A review's find: once a journal fallback had overflowed memory into the spill, every later call took
    memory mode's path until the spill drained, which needs the store: held in memory only while the
    journal worked again (a SIGKILL lost them), and not counted as fallbacks."""
    real_append = JournalWriter.append_locked
    failing = {"on": True}

    def append(self, seq, items):
        if failing["on"]:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_append(self, seq, items)

    down = StoreDown(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", max_queue_size=4,
                             retry_max_s=0.05, retry_initial_s=0.01).start()
    try:
        monkeypatch.setattr(JournalWriter, "append_locked", append)
        for n in range(20):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])  # memory, then the spill (the store is down)
        fallbacks = q.stats().journal_fallbacks
        assert fallbacks == 20 and q.stats().spill_buffered + q.stats().spilled_files > 0
        failing["on"] = False
        time.sleep(0.1)  # the journal's retry_s (retry_max_s: 0.05 s)
        for n in range(20, 60):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])
        assert q.stats().journal_fallbacks == fallbacks + 1 or q.stats().journal_fallbacks == fallbacks
        assert set(range(21, 60)) <= journaled_ns(spill_dir), "calls accepted with the journal working again " \
                                                               "are not in it"
    finally:
        q.stop(0.2)
    down.heal()
    drain(store, spill_dir)
    check_landed(store, ids, {0: 59})


@pytest.mark.timeout(90)
def test_a_call_that_waited_out_a_stop_is_journaled_in_the_run_started_right_after(store, ids, spill_dir):
    """A review's find: calls that waited in the closed route while stop() drained, and found the queue
    started again, went to memory only: written ahead of what the last run left in its journal, or lost
    at the next stop (the store down: nothing spilled them). Here each waiting call looks at the state
    only once the queue has been started again."""
    from iai_queue.writebehind.lifecycle import Lifecycle

    k = min(8, len(ids))
    down = StoreDown(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", retry_initial_s=0.01,
                             retry_max_s=0.05).start()
    restarted = threading.Event()
    drained = q._closed.wait_for_drain

    def wait_for_drain_then_the_restart():
        drained()
        assert restarted.wait(20)
        return q._admission.state

    q._closed.wait_for_drain = wait_for_drain_then_the_restart
    for i in range(k):
        q.enqueue([(ids[i], {"c": i, "n": 0})])
    stopper = threading.Thread(target=q.stop, args=(0.5,))
    stopper.start()
    wait_until(lambda: q._admission.state is Lifecycle.CLOSING, 10, "stop() to begin")
    callers = [threading.Thread(target=q.enqueue, args=([(ids[i], {"c": i, "n": 1})],)) for i in range(k)]
    for t in callers:
        t.start()  # each waits in the closed route for the drain
    stopper.join(20)
    assert not stopper.is_alive()
    q.start()
    restarted.set()
    for t in callers:
        t.join(20)
        assert not t.is_alive()
    for i in range(k):
        q.enqueue([(ids[i], {"c": i, "n": 2})])
    assert q.stats().journal_fallbacks == 0
    assert q.stop(0.2) is False  # the store is still down: all of it stays on disk
    down.heal()
    drain(store, spill_dir)
    check_landed(store, ids[:k], {i: 2 for i in range(k)})  # c: the record's index


@pytest.mark.timeout(60)
def test_a_start_right_after_the_state_turns_stopped_waits_for_the_stop_to_let_go(store, ids, spill_dir):
    """A review's find: stop() marked the queue STOPPED and let go of the spill directory's writer lock
    after; a start() in between could not take that lock, so the new run's journal fell back to memory
    mode (and its calls went ahead of the last run's journal), or took it and lost it to the release.
    The start() now waits for the release."""
    from iai_queue.spill.locks import lock_held
    from iai_queue.spill.names import writer_lock_name

    down = StoreDown(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", retry_initial_s=0.01,
                             retry_max_s=0.05).start()
    q.enqueue([(ids[0], {"c": 0, "n": 0})])
    release = q._spill.release
    starter = threading.Thread(target=q.start)

    def release_after_a_start_was_asked_for():
        if starter.ident is None:  # stop()'s release, the first one
            starter.start()
            starter.join(0.5)  # the fix: it waits for this release (bounded here either way)
        release()

    q._spill.release = release_after_a_start_was_asked_for
    q.stop(0.2)
    starter.join(20)
    assert not starter.is_alive()
    q.enqueue([(ids[0], {"c": 0, "n": 1})])
    assert q.stats().journal_fallbacks == 0 and q.stats().journal_segments >= 1
    # The new run holds the writer lock (a release after its start let go of it: its live journal
    # looked dead to every other process).
    assert lock_held(spill_dir / writer_lock_name(q._spill.writer)) is True
    q.stop(0.2)
    down.heal()
    drain(store, spill_dir)
    check_landed(store, ids[:1], {0: 1})


@pytest.mark.timeout(60)
def test_a_call_made_while_the_first_use_starts_the_queue_is_journaled(store, ids, spill_dir, monkeypatch):
    """A review's find: a write-ahead call that found the queue not yet running went through admission's
    own path; when another thread's start() finished in between, that path put it in memory only (not
    journaled, and lost at a stop with the store down)."""
    real_open = JournalWriter.open
    in_open, go = threading.Event(), threading.Event()

    def open_held(self):
        in_open.set()
        assert go.wait(20)
        return real_open(self)

    monkeypatch.setattr(JournalWriter, "open", open_held)
    down = StoreDown(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", retry_initial_s=0.01,
                             retry_max_s=0.05)
    first = threading.Thread(target=q.enqueue, args=([(ids[0], {"c": 0, "n": 0})],))  # its first use: start()
    first.start()
    assert in_open.wait(20)
    second = threading.Thread(target=q.enqueue, args=([(ids[0], {"c": 1, "n": 0})],))  # concurrent: its own c
    second.start()
    second.join(0.3)  # it waits for the start() (bounded here either way)
    go.set()
    for t in (first, second):
        t.join(20)
        assert not t.is_alive()
    assert sum(len(r.items) for p in spill_dir.glob("*.wal") for r in scan_segment(p).records) == 2
    assert q.stop(0) is False  # the store is down: both stay in the journal
    down.heal()
    drain(store, spill_dir)
    check_landed(store, ids[:1], {0: 0, 1: 0}, across_children=False)


@pytest.mark.timeout(60)
def test_stats_counters_never_go_down_while_the_backlog_refills_memory(store, ids, spill_dir):
    """A review's find: stats() read memory under the queue's lock and the backlog under the writer's, so
    pairs the refill moved between the two reads were counted in neither: ``accepted`` went down (a
    counter reset to Prometheus' rate())."""
    from conftest import slow_store

    from iai_queue.metrics import METRICS, Kind

    slow_store(store, 0.002)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", max_queue_size=4,
                             coalesce_ms=1).start()
    counters = [m.field for m in METRICS if m.kind is Kind.COUNTER]
    decreases, done = [], threading.Event()

    def sample() -> None:
        prev = q.stats()
        while not done.is_set():
            cur = q.stats()
            decreases.extend((f, getattr(prev, f), getattr(cur, f)) for f in counters
                             if getattr(cur, f) < getattr(prev, f))
            prev = cur

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for n in range(200):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])
        assert q.flush(30)
    finally:
        done.set()
        sampler.join(10)
        q.stop(5)
    assert not decreases, decreases[:5]
    assert q.stats().accepted == 200 == store.provenance_rows()
