"""The enqueue hot path: string ids take a cheap path and still reach the store as UUIDs."""

import threading
from uuid import UUID

import pytest

from _loss_helpers import drain
from iai_queue import ProvenanceWriteQueue


@pytest.mark.timeout(30)
def test_string_ids_reach_the_store_as_uuids_in_order(store, records, spill_dir):
    seen_types = set()
    real = store.append_provenance_batch

    def observe(pairs, records_cache=None):
        seen_types.update(type(rid) for rid, _ in pairs)
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = observe
    rid = str(records[0].id)
    with ProvenanceWriteQueue(store, coalesce_ms=1) as q:
        q.enqueue([(rid, {"n": 0})])  # first sight: checked in full
        q.enqueue([(rid, {"n": 1}), (records[1].id, {"n": 2})])  # seen before: the cheap path, mixed with a UUID
        q.enqueue([(rid.upper(), {"n": 3})])  # canonical but upper case: converted at once
        assert q.flush(5)
    assert seen_types == {UUID}
    assert [e["n"] for e in store.get(records[0].id).provenance] == [0, 1, 3]
    assert store.get(records[1].id).provenance == [{"n": 2}]
    assert store.provenance_rows() == 4


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad,match", [
    ([("not-a-uuid", {})], r"pairs\[1\]\[0\] is not a canonical UUID string"),
    ([("{12345678-1234-5678-1234-567812345678}", {})], r"pairs\[1\]\[0\]"),
    ([(None, {})], r"pairs\[1\]\[0\] must be a UUID"),
    ([("x", "y", "z")], r"pairs\[1\] must have 2 elements"),
    ([["00000000-0000-0000-0000-000000000000", {}]], r"pairs\[1\] must be a \(UUID, dict\) tuple"),
])
def test_bad_ids_are_named_even_after_good_string_ids(store, records, bad, match):
    q = ProvenanceWriteQueue(store, coalesce_ms=1)
    try:
        q.enqueue([(str(records[0].id), {"n": 0})])
        with pytest.raises((TypeError, ValueError), match=match):
            q.enqueue([(str(records[0].id), {"n": 1})] + bad)
        assert q.flush(5)
        assert store.get(records[0].id).provenance == [{"n": 0}]  # nothing of the bad call
    finally:
        q.stop()


@pytest.mark.timeout(30)
def test_a_backlog_is_drained_in_larger_writes_and_an_explicit_cap_holds(store, records, gate):
    sizes = []

    def recording(pairs, records_cache=None):
        sizes.append(len(pairs))
        return gate(pairs, records_cache=records_cache)

    store.append_provenance_batch = recording
    with ProvenanceWriteQueue(store, coalesce_ms=1, max_queue_size=5000) as q:
        assert q.max_batch_pairs == 256 and q.backlog_batch_pairs == q.replay_batch_pairs == 8192
        q.enqueue([(records[0].id, {"n": -1})])
        assert gate.entered.wait(5)  # the worker is stuck on the first write: a backlog builds up
        for n in range(3000):
            q.enqueue([(records[n % len(records)].id, {"n": n})])
        gate.open()
        assert q.flush(10)
    assert sizes[0] == 1 and max(sizes[1:]) > 256 and sum(sizes) == 3001
    assert store.provenance_rows() == 3001
    assert ProvenanceWriteQueue(store, max_batch_pairs=8).backlog_batch_pairs == 8  # set explicitly: a hard cap
    assert ProvenanceWriteQueue(store, max_batch_pairs=8, backlog_batch_pairs=64).backlog_batch_pairs == 64


class CountingEvent(threading.Event):
    def __init__(self):
        super().__init__()
        self.sets = 0

    def set(self):
        self.sets += 1
        super().set()


@pytest.mark.timeout(30)
def test_a_burst_after_idle_wakes_the_worker_once_and_every_entry_lands(store, records):
    # The woken worker needs the GIL, which the caller keeps for the whole burst: the first
    # call must disarm the wake-up, or each call of the burst would set the Event again.
    q = ProvenanceWriteQueue(store, coalesce_ms=1)
    q.start()
    try:
        assert q.flush(5)
        adm = q.enqueue.__self__
        wake = adm.worker_wake = CountingEvent()
        idle = threading.Event()
        for _ in range(100):  # until the worker sleeps on the new Event, armed for the first call
            if adm.wake_threshold == 1:
                idle.set()
                break
            idle.wait(0.01)
        assert idle.is_set(), "the worker never went idle"
        rid = records[0].id
        for n in range(300):
            q.enqueue([(rid, {"n": n})])
        assert wake.sets <= 3, f"{wake.sets} wake-ups for one burst"
        assert q.flush(10)
        assert [e["n"] for e in store.get(rid).provenance] == list(range(300))
        assert store.provenance_rows() == 300
    finally:
        q.stop()


@pytest.mark.timeout(60)
def test_one_pair_and_several_pair_calls_keep_their_order_through_memory_the_spill_and_a_restart(
        store, records, gate, spill_dir):
    # One-pair and several-pair calls, with UUID and string ids, interleave on every path: memory,
    # overflow behind the spill, stop() giving up on a stuck write, replay by a new queue.
    rid, other = records[0].id, records[1].id
    q = ProvenanceWriteQueue(store, coalesce_ms=1, max_queue_size=8, max_batch_pairs=4, spill_dir=spill_dir)
    q.start()
    mine, total = [-1], 1
    try:
        q.enqueue([(rid, {"n": -1})])
        assert gate.entered.wait(5)  # the worker holds its first write: memory fills, then the rest spills
        for k in range(60):
            n = total
            if k % 3 == 2:
                q.enqueue([(rid, {"n": n}), (other, {"n": n + 1}), (rid, {"n": n + 2})])
                mine += [n, n + 2]
                total += 3
            else:
                q.enqueue([(str(rid) if k % 2 else rid, {"n": n})])  # a UUID, or its string
                mine.append(n)
                total += 1
        assert q.stats().spilled_pairs + q.stats().spill_buffered > 0
        assert not q.stop(timeout=0.2)  # gives up on the stuck write: it and memory go to disk
    finally:
        gate.open()
    drain(store, spill_dir)
    assert [e["n"] for e in store.get(rid).provenance] == mine
    assert store.provenance_rows() == total  # every entry of both records once: no duplicate row
