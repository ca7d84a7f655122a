import atexit
import gc
import json
import threading
import time
import uuid
import weakref

import pytest

from conftest import slow_store
from iai_queue import ProvenanceWriteQueue


def wait_until(predicate, timeout=5.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- enqueue ------------------------------------------------------------------------


def test_enqueue_does_not_wait_for_a_slow_store(store, records):
    slow_store(store, 0.2)
    with ProvenanceWriteQueue(store, coalesce_ms=1) as q:
        worst = 0.0
        for i in range(20):
            t0 = time.perf_counter()
            q.enqueue([(records[0].id, {"i": i})])
            worst = max(worst, time.perf_counter() - t0)
        assert worst < 0.020
        assert q.flush(5.0)
    assert [e["i"] for e in store.get(records[0].id).provenance] == list(range(20))


def test_ten_entries_flushed_within_500ms(store, records):
    with ProvenanceWriteQueue(store) as q:
        t0 = time.monotonic()
        for i in range(10):
            q.enqueue([(records[i].id, {"i": i})])
        assert q.flush(timeout=0.5)
        assert time.monotonic() - t0 < 0.5
    for i in range(10):
        assert store.get(records[i].id).provenance == [{"i": i}]


@pytest.mark.parametrize("bad, exc, needle", [
    ("not a list", TypeError, "str"),
    ([(uuid.uuid4(), {})], None, None),
    ([("x", {})], ValueError, "'x'"),
    ([(uuid.uuid4(), {}), (uuid.uuid4(),)], ValueError, "pairs[1]"),
    ([(uuid.uuid4(), {}), [uuid.uuid4(), {}]], TypeError, "pairs[1]"),
    ([(uuid.uuid4(), "entry")], TypeError, "'entry'"),
    ([(12345, {})], TypeError, "12345"),
])
def test_enqueue_validates_and_accepts_nothing_from_a_bad_call(store, bad, exc, needle):
    q = ProvenanceWriteQueue(store)
    if exc is None:
        q.enqueue(bad)
        assert q.stats().accepted == 1
        return
    with pytest.raises(exc) as info:
        q.enqueue(bad)
    assert needle in str(info.value)
    assert q.stats().accepted == 0 and q.stats().pending == 0


def test_enqueue_accepts_canonical_uuid_strings_and_empty(store, records):
    with ProvenanceWriteQueue(store) as q:
        q.enqueue([])
        q.enqueue([(str(records[0].id), {"s": 1})])
        assert q.flush()
    assert store.get(records[0].id).provenance == [{"s": 1}]
    assert q.stats().accepted == 1


def test_enqueue_copies_the_callers_list(store, records):
    with ProvenanceWriteQueue(store, coalesce_ms=20) as q:
        pairs = [(records[0].id, {"n": 1})]
        q.enqueue(pairs)
        pairs.append((records[0].id, {"n": 2}))
        assert q.flush()
    assert store.get(records[0].id).provenance == [{"n": 1}]


# -- worker ------------------------------------------------------------------------


def test_worker_coalesces_up_to_max_batch_pairs(store, records):
    sizes = []
    real = store.append_provenance_batch

    def recording(pairs, records_cache=None):
        sizes.append(len(pairs))
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = recording
    with ProvenanceWriteQueue(store, coalesce_ms=200, max_batch_pairs=8) as q:
        for i in range(20):
            q.enqueue([(records[i].id, {"i": i})])
        assert q.flush(5.0)
    assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) <= 4


def test_store_is_looked_up_at_call_time(store, records):
    with ProvenanceWriteQueue(store, coalesce_ms=1) as q:
        seen = []
        real = store.append_provenance_batch
        store.append_provenance_batch = lambda pairs, records_cache=None: (seen.append(len(pairs)), real(pairs))
        q.enqueue([(records[0].id, {"n": 1})])
        assert q.flush()
    assert seen == [1]


def test_a_store_error_is_retried_not_dropped(store, records):
    real = store.append_provenance_batch
    failures = [2]

    def flaky(pairs, records_cache=None):
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("lance commit conflict")
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = flaky
    with ProvenanceWriteQueue(store, coalesce_ms=1, retry_initial_s=0.01) as q:
        q.enqueue([(records[0].id, {"n": 1}), (records[1].id, {"n": 2})])
        assert q.flush(5.0)
        assert q.running  # the worker survived
        assert q.stats().store_errors >= 2 and q.stats().written == 2
    assert store.get(records[0].id).provenance == [{"n": 1}]
    assert store.get(records[1].id).provenance == [{"n": 2}]


def test_flush_from_several_threads(store, records):
    slow_store(store, 0.05)
    with ProvenanceWriteQueue(store, coalesce_ms=5) as q:
        results = []

        def producer(t):
            for i in range(10):
                q.enqueue([(records[t].id, {"i": i})])
            results.append(q.flush(10.0))

        ts = [threading.Thread(target=producer, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert results == [True] * 4
    for t in range(4):
        assert [e["i"] for e in store.get(records[t].id).provenance] == list(range(10))


def test_flush_times_out_while_the_store_is_blocked(store, records, gate):
    with ProvenanceWriteQueue(store, coalesce_ms=1) as q:
        q.enqueue([(records[0].id, {"n": 1})])
        t0 = time.monotonic()
        assert q.flush(timeout=0.2) is False
        assert 0.15 < time.monotonic() - t0 < 2.0
        gate.open()
        assert q.flush(5.0)


# -- lifecycle ------------------------------------------------------------------------


def test_start_is_idempotent_and_registers_one_exit_handler(store, monkeypatch):
    registered, unregistered = [], []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: registered.append(f) or f)
    monkeypatch.setattr(atexit, "unregister", lambda f: unregistered.append(f))
    q = ProvenanceWriteQueue(store)
    q.start()
    q.start()
    workers = [t for t in threading.enumerate() if t.name == "iai_queue-worker"]
    assert len(registered) == 1 and len(workers) >= 1
    q.stop()
    q.stop()
    assert registered[0] in unregistered
    assert not q._worker.is_alive()


def test_captured_exit_handler_drains(store, records, monkeypatch):
    captured = []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: captured.append(f) or f)
    q = ProvenanceWriteQueue(store, coalesce_ms=10_000)  # only the exit handler will write
    q.start()
    q.enqueue([(records[0].id, {"n": 1}), (records[1].id, {"n": 2})])
    assert len(captured) == 1
    captured[0]()
    assert store.get(records[0].id).provenance == [{"n": 1}]
    assert store.get(records[1].id).provenance == [{"n": 2}]
    assert not q.running


def test_stop_drains_and_start_after_stop_works(store, records):
    q = ProvenanceWriteQueue(store, coalesce_ms=10_000)
    q.start()
    q.enqueue([(records[0].id, {"n": 1})])
    assert q.stop() is True
    assert store.get(records[0].id).provenance == [{"n": 1}]
    q.start()
    q.enqueue([(records[0].id, {"n": 2})])
    assert q.flush()
    q.stop()
    assert store.get(records[0].id).provenance == [{"n": 1}, {"n": 2}]


def test_context_manager_starts_and_stops(store, records):
    with ProvenanceWriteQueue(store) as q:
        assert q.running
        q.enqueue([(records[0].id, {"n": 1})])
    assert not q.running
    assert store.get(records[0].id).provenance == [{"n": 1}]


def test_toggles_leak_no_threads_or_handlers(store, records):
    threads_before = threading.active_count()
    queues = []
    for i in range(150):
        queues.append(weakref.ref(store.enable_provenance_queue(coalesce_ms=1)))
        store.queue_provenance_batch([(records[0].id, {"i": i})])
        store.disable_provenance_queue()
    assert threading.active_count() == threads_before
    gc.collect()
    # Nothing (atexit included) holds a stopped queue. CPython's atexit._ncallbacks()
    # also counts unregistered slots, so it cannot tell a live handler from a dead one.
    assert [r for r in queues if r() is not None] == []
    assert [e["i"] for e in store.get(records[0].id).provenance] == list(range(150))


# -- spill ------------------------------------------------------------------------


def test_overflow_spills_then_lands_exactly_once(store, records, gate, spill_dir):
    with ProvenanceWriteQueue(store, max_queue_size=2, max_batch_pairs=1, coalesce_ms=1) as q:
        for i in range(5):
            q.enqueue([(records[0].id, {"i": i})])
        assert gate.entered.wait(5)
        assert wait_until(lambda: q.stats().spilled_pairs >= 2)
        files = list(spill_dir.glob("*.jsonl"))
        assert files
        for line in files[0].read_text().splitlines():
            obj = json.loads(line)
            assert uuid.UUID(obj["id"]) == records[0].id and isinstance(obj["entry"], dict)
        gate.open()
        assert q.flush(10.0)
    assert [e["i"] for e in store.get(records[0].id).provenance] == list(range(5))
    assert list(spill_dir.glob("*.jsonl")) == []
    assert not [p for p in spill_dir.iterdir() if not p.name.startswith(".")]


def test_no_spill_dir_without_overflow(store, records, spill_dir):
    with ProvenanceWriteQueue(store) as q:
        for i in range(50):
            q.enqueue([(records[i % 20].id, {"i": i})])
        assert q.flush()
    assert not spill_dir.exists()
    assert not (spill_dir.parent).exists()


def test_spill_dir_from_env_resolved_at_construction(store, tmp_path, monkeypatch):
    monkeypatch.setenv("IAI_QUEUE_SPILL_DIR", str(tmp_path / "env-spill"))
    q = ProvenanceWriteQueue(store)
    monkeypatch.setenv("IAI_QUEUE_SPILL_DIR", str(tmp_path / "later"))
    assert q.spill_dir == tmp_path / "env-spill"
    assert ProvenanceWriteQueue(store, spill_dir=tmp_path / "x").spill_dir == tmp_path / "x"


def test_spill_files_from_older_writers_are_replayed_oldest_first(store, records, spill_dir):
    spill_dir.mkdir(parents=True)
    rid = str(records[0].id)
    (spill_dir / "a-older.jsonl").write_text("".join(json.dumps({"id": rid, "entry": {"n": i}}) + "\n" for i in range(3)))
    (spill_dir / "b-newer.jsonl").write_text(json.dumps({"id": rid, "entry": {"n": 3}}) + "\n")
    with ProvenanceWriteQueue(store) as q:
        assert wait_until(lambda: not list(spill_dir.glob("*.jsonl")) + list(spill_dir.glob("*.claimed")))
        assert q.flush()
    assert [e["n"] for e in store.get(records[0].id).provenance] == [0, 1, 2, 3]


def test_garbage_spill_file_is_quarantined_within_6_5s(store, records, spill_dir):
    spill_dir.mkdir(parents=True)
    (spill_dir / "bad.jsonl").write_bytes(b"\x00\xffnot json at all\n{{{\n")
    (spill_dir / "good.jsonl").write_text(json.dumps({"id": str(records[1].id), "entry": {"ok": 1}}) + "\n")
    t0 = time.monotonic()
    with ProvenanceWriteQueue(store) as q:
        assert wait_until(lambda: list(spill_dir.glob("bad.failed-*.jsonl")), timeout=6.5)
        assert time.monotonic() - t0 < 6.5
        assert wait_until(lambda: not list(spill_dir.glob("good.*")))  # gone, not just claimed
        assert q.flush()
        assert wait_until(lambda: q.stats().quarantined_files == 1)
    failed = list(spill_dir.glob("bad.failed-*.jsonl"))[0]
    assert failed.read_bytes() == b"\x00\xffnot json at all\n{{{\n"  # kept, byte for byte
    assert failed.with_suffix(".reason").read_text()
    assert not (spill_dir / "bad.jsonl").exists()
    assert store.get(records[1].id).provenance == [{"ok": 1}]


def test_spilled_at_stop_when_the_store_is_stuck(store, records, gate, spill_dir):
    q = ProvenanceWriteQueue(store, coalesce_ms=1)
    q.start()
    q.enqueue([(records[0].id, {"n": 1})])
    assert gate.entered.wait(5)
    q.enqueue([(records[0].id, {"n": 2})])
    t0 = time.monotonic()
    assert q.stop(timeout=0.3) is False
    assert time.monotonic() - t0 < 2.0
    lines = [json.loads(l) for p in sorted(spill_dir.glob("*.jsonl")) for l in p.read_text().splitlines()]
    assert [l["entry"]["n"] for l in lines] == [1, 2]
    gate.open()
    with ProvenanceWriteQueue(store) as q2:
        assert wait_until(lambda: not list(spill_dir.glob("*.jsonl")) + list(spill_dir.glob("*.claimed")))
        assert q2.flush()
    # {"n": 1} may have been written by the stuck call too: it still shows once.
    assert [e["n"] for e in store.get(records[0].id).provenance] == [1, 2]


def test_concurrent_stops_both_return_after_the_drain(store, records):
    slow_store(store, 0.2)
    q = ProvenanceWriteQueue(store, coalesce_ms=10_000)
    q.start()
    q.enqueue([(records[0].id, {"n": 1})])
    results = []
    ts = [threading.Thread(target=lambda: results.append(q.stop(5.0))) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [True, True]
    assert store.get(records[0].id).provenance == [{"n": 1}]
