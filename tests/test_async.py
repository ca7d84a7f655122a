"""The async surface, on asyncio and trio: nothing blocks the event loop."""

import threading
import time

import anyio
import pytest

from iai_queue import ProvenanceWriteQueue, adispatch


pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def pairs_for(records, tag, n=None):
    return [(r.id, {"tag": tag, "i": i}) for i, r in enumerate(records[:n])]


def recall_args(record, session="s1"):
    return {"cue": "what", "session_id": session, "cue_embedding": record.embedding, "k": 3}


class SlowWrites:
    """Wraps store.append_provenance_batch on the instance: every write takes ``delay`` seconds."""

    def __init__(self, store, delay=0.3):
        self.real = store.append_provenance_batch
        self.delay = delay
        self.calls = 0
        self.threads = set()
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        self.calls += 1
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        return self.real(pairs, records_cache=records_cache)


class Ticker:
    """A 1 ms ticker on the event loop: the longest gap between ticks is how long the loop was blocked."""

    def __init__(self):
        self.max_gap = 0.0
        self.ticks = 0
        self.phase = "start"
        self.worst_phase = None

    async def run(self):
        last = time.perf_counter()
        while True:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            if now - last > self.max_gap:
                self.max_gap, self.worst_phase = now - last, self.phase
            self.ticks += 1
            last = now


async def test_context_manager_starts_and_drains(store, records, tmp_path):
    async with ProvenanceWriteQueue(store, spill_dir=tmp_path / "spill", coalesce_ms=1000) as q:
        assert q.running
        q.enqueue(pairs_for(records, "cm"))
        assert q.stats().written == 0  # the coalescing window is still open: exit must drain it
    assert not q.running
    assert q.stats().written == len(records)
    assert store.get(records[0].id).provenance == [{"tag": "cm", "i": 0}]


async def test_context_manager_drains_when_the_body_raises(store, records, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        async with ProvenanceWriteQueue(store, spill_dir=tmp_path / "spill", coalesce_ms=1000) as q:
            q.enqueue(pairs_for(records, "raised", 2))
            raise RuntimeError("boom")
    assert not q.running
    assert store.get(records[1].id).provenance == [{"tag": "raised", "i": 1}]


async def test_aflush_times_out_then_succeeds(store, records, gate, tmp_path):
    q = ProvenanceWriteQueue(store, spill_dir=tmp_path / "spill", coalesce_ms=0).start()
    try:
        q.enqueue(pairs_for(records, "f", 3))
        assert gate.entered.wait(10)
        assert await q.aflush(timeout=0.2) is False
        gate.open()
        assert await q.aflush(timeout=10) is True
        assert q.stats().written == 3
    finally:
        assert await q.astop() is True
    assert not q.running


async def test_aflush_is_cancellable_and_astop_still_drains(store, records, gate, tmp_path):
    q = ProvenanceWriteQueue(store, spill_dir=tmp_path / "spill", coalesce_ms=0).start()
    try:
        q.enqueue(pairs_for(records, "c", 2))
        assert gate.entered.wait(10)
        t0 = time.perf_counter()
        with anyio.move_on_after(0.1) as scope:
            await q.aflush(timeout=20)
        assert scope.cancelled_caught
        assert time.perf_counter() - t0 < 5  # not the 20 s flush timeout
        gate.open()
    finally:
        gate.open()
        assert await q.astop(timeout=10) is True
    assert q.stats().written == 2


async def test_astop_drains_and_reports(store, records, tmp_path):
    q = ProvenanceWriteQueue(store, spill_dir=tmp_path / "spill", coalesce_ms=1000).start()
    q.enqueue(pairs_for(records, "stop", 4))
    assert await q.astop(timeout=10) is True
    assert not q.running
    assert q.stats().written == 4
    assert await q.astop() is True  # idempotent


async def test_adisable_provenance_queue_drains(store, records, tmp_path):
    q = store.enable_provenance_queue(coalesce_ms=1000, spill_dir=tmp_path / "spill")
    store.queue_provenance_batch(pairs_for(records, "dis", 2))
    await store.adisable_provenance_queue()
    assert store._provenance_queue is None and not q.running
    assert store.get(records[0].id).provenance == [{"tag": "dis", "i": 0}]
    await store.adisable_provenance_queue()  # idempotent


async def test_adispatch_searches_off_the_loop_and_enqueues(store, records, tmp_path):
    loop_thread = threading.get_ident()
    search_threads = []
    real_search = store.search

    def search(emb, k=10):
        search_threads.append(threading.get_ident())
        return real_search(emb, k)

    store.search = search
    q = store.enable_provenance_queue(coalesce_ms=1, spill_dir=tmp_path / "spill")
    try:
        hits = await adispatch(store, "memory_recall", recall_args(records[5]))
        assert hits[0]["id"] == records[5].id and len(hits) == 3
        assert search_threads and loop_thread not in search_threads
        assert q.stats().accepted == 3
        assert await q.aflush(timeout=10)
    finally:
        await store.adisable_provenance_queue()
    entries = store.get(records[5].id).provenance
    assert [(e["cue"], e["session_id"]) for e in entries] == [("what", "s1")]


async def test_adispatch_without_queue_writes_off_the_loop(store, records):
    loop_thread = threading.get_ident()
    slow = SlowWrites(store, delay=0.0)
    hits = await adispatch(store, "memory_recall", recall_args(records[2]))
    assert slow.calls == 1 and loop_thread not in slow.threads
    assert len(store.get(hits[0]["id"]).provenance) == 1  # written before adispatch returned


async def test_adispatch_rejects_bad_requests(store, records):
    with pytest.raises(ValueError, match="unknown op"):
        await adispatch(store, "nope", {})
    with pytest.raises(ValueError, match="cue_embedding"):
        await adispatch(store, "memory_recall", {"cue": "c", "session_id": "s", "cue_embedding": [0.0]})


async def test_enqueue_is_a_plain_call_while_the_store_is_stuck(store, records, gate, tmp_path):
    q = ProvenanceWriteQueue(store, spill_dir=tmp_path / "spill", coalesce_ms=0).start()
    try:
        q.enqueue(pairs_for(records, "a", 1))
        assert gate.entered.wait(10)  # the worker is now stuck in the store
        t0 = time.perf_counter()
        result = q.enqueue(pairs_for(records, "b"))
        assert result is None  # not a coroutine
        assert time.perf_counter() - t0 < 0.05
        assert q.stats().accepted == 1 + len(records)
        gate.open()
        assert await q.aflush(timeout=10)
    finally:
        gate.open()
        await q.astop()


async def test_slow_store_never_blocks_the_event_loop(store, records, tmp_path):
    slow = SlowWrites(store, delay=0.3)
    ticker = Ticker()
    calls_at = {}
    # Started before the ticker: Thread.start() waits for the new thread to run, which a loaded
    # box can delay; that is start-up cost, not the write path this test is about.
    q = store.enable_provenance_queue(coalesce_ms=1, spill_dir=tmp_path / "s1")
    q2 = ProvenanceWriteQueue(store, spill_dir=tmp_path / "s2", coalesce_ms=1000).start()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        await anyio.sleep(0.01)

        ticker.phase = "recall+aflush"
        for i in range(3):
            await adispatch(store, "memory_recall", recall_args(records[i], session=f"r{i}"))
        assert await q.aflush(timeout=10)
        calls_at["aflush"] = slow.calls
        ticker.phase = "adisable"
        await adispatch(store, "memory_recall", recall_args(records[3], session="late"))
        await store.adisable_provenance_queue()
        calls_at["adisable"] = slow.calls
        ticker.phase = "astop"

        q2.enqueue(pairs_for(records, "astop", 2))
        assert await q2.astop(timeout=10)
        calls_at["astop"] = slow.calls
        ticker.phase = "aexit"

        async with ProvenanceWriteQueue(store, spill_dir=tmp_path / "s3", coalesce_ms=1000) as q3:
            q3.enqueue(pairs_for(records, "cm", 2))
        calls_at["aexit"] = slow.calls

        tg.cancel_scope.cancel()

    # Each phase really waited on at least one 300 ms write: a blocking call would show as a gap.
    assert calls_at["aflush"] >= 1
    assert calls_at["adisable"] > calls_at["aflush"]
    assert calls_at["astop"] > calls_at["adisable"]
    assert calls_at["aexit"] > calls_at["astop"]
    assert ticker.ticks > 100
    assert ticker.max_gap < 0.05, (
        f"event loop blocked for {ticker.max_gap * 1000:.0f} ms during {ticker.worst_phase}")
    assert q3.stats().written == 2 and not q3.running
    assert store.get(records[3].id).provenance[-1]["session_id"] == "late"
