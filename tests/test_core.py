import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

from conftest import slow_store
from iai_queue import ProvenanceWriteQueue, dispatch


def recall(store, rec, cue="cue", session="s1", k=3):
    return dispatch(store, "memory_recall", {"cue": cue, "session_id": session, "cue_embedding": rec.embedding, "k": k})


def test_recall_returns_hits_and_queues_provenance_in_hit_order(store, records):
    store.enable_provenance_queue(coalesce_ms=5)
    try:
        seen = []
        real = store.queue_provenance_batch
        store.queue_provenance_batch = lambda pairs: (seen.append(pairs), real(pairs))
        hits = recall(store, records[2], k=4)
        assert len(hits) == 4 and hits[0]["id"] == records[2].id
        assert set(hits[0]) == {"id", "text", "score"}
        assert [p[0] for p in seen[0]] == [h["id"] for h in hits]
        assert store._provenance_queue.flush()
    finally:
        store.disable_provenance_queue()
    entry = store.get(records[2].id).provenance[0]
    assert set(entry) == {"ts", "cue", "session_id"} and entry["cue"] == "cue" and entry["session_id"] == "s1"
    assert datetime.fromisoformat(entry["ts"]).utcoffset().total_seconds() == 0


def test_recall_is_not_slowed_by_a_slow_store(store, records):
    slow_store(store, 0.5)
    store.enable_provenance_queue()
    try:
        recall(store, records[0], k=1)  # warm-up: LanceDB opens its files on first search
        t0 = time.perf_counter()
        recall(store, records[0], k=1)
        assert time.perf_counter() - t0 < 0.4
        assert store._provenance_queue.flush(5.0)
    finally:
        store.disable_provenance_queue()
    assert len(store.get(records[0].id).provenance) == 2


def test_three_recalls_keep_their_order(store, records):
    store.enable_provenance_queue(coalesce_ms=20)
    try:
        for cue in ("first", "second", "third"):
            recall(store, records[0], cue=cue, k=1)
    finally:
        store.disable_provenance_queue()
    assert [e["cue"] for e in store.get(records[0].id).provenance] == ["first", "second", "third"]


def test_disabled_queue_writes_on_the_callers_thread(store, records):
    threads = []
    real = store.append_provenance_batch

    def recording(pairs, records_cache=None):
        threads.append(threading.current_thread())
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = recording
    assert store._provenance_queue is None
    recall(store, records[0], k=2)
    assert threads == [threading.current_thread()]
    assert len(store.get(records[0].id).provenance) == 1


def test_enable_disable_are_idempotent(store, records):
    q1 = store.enable_provenance_queue(coalesce_ms=5)
    q2 = store.enable_provenance_queue(coalesce_ms=5)
    assert q1 is q2 is store._provenance_queue and isinstance(q1, ProvenanceWriteQueue)
    store.queue_provenance_batch([(records[0].id, {"n": 1})])
    store.disable_provenance_queue()
    store.disable_provenance_queue()
    assert store._provenance_queue is None and not q1.running
    assert store.get(records[0].id).provenance == [{"n": 1}]  # disable drained it


def test_queue_options_pass_through(store):
    q = store.enable_provenance_queue(coalesce_ms=7, max_queue_size=10, max_batch_pairs=3)
    try:
        assert (q.coalesce_s, q.max_queue_size, q.max_batch_pairs) == (0.007, 10, 3)
    finally:
        store.disable_provenance_queue()


def test_sync_path_validates_like_enqueue(store, records):
    with pytest.raises(ValueError, match="pairs\\[0\\]"):
        store.queue_provenance_batch([("nope", {})])


@pytest.mark.parametrize("op, args, needle", [
    ("memory_forget", {}, "unknown op 'memory_forget'"),
    ("memory_recall", {"session_id": "s", "cue_embedding": [0.0] * 8}, "'cue'"),
    ("memory_recall", {"cue": "c", "cue_embedding": [0.0] * 8}, "'session_id'"),
    ("memory_recall", {"cue": "c", "session_id": "s"}, "'cue_embedding'"),
    ("memory_recall", {"cue": "c", "session_id": "s", "cue_embedding": [0.0] * 5}, "length 5"),
    ("memory_recall", {"cue": "c", "session_id": "s", "cue_embedding": [0.0] * 8, "k": 0}, "'k'"),
    ("memory_recall", "not a mapping", "mapping"),
])
def test_dispatch_errors_name_the_problem(store, op, args, needle):
    with pytest.raises(ValueError) as info:
        dispatch(store, op, args)
    assert needle in str(info.value)


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["spill", "--help"]])
def test_cli_help(argv):
    out = subprocess.run([sys.executable, "-m", "iai_queue", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "usage: iai-queue" in out.stdout
