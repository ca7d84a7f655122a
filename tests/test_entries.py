"""Issue 9, items 7-10: entries the store cannot hold as they are, on every path an entry can take.

The paths: memory (the worker writes the batch), spill (the entry goes through a
spill file first, then replay), replay (a spill file found on disk), after
``stop()`` (written synchronously by ``enqueue``) and synchronous (the store's
queue disabled: ``store.queue_provenance_batch`` writes on the caller's thread).

The decided codec: datetime/date/time -> ISO 8601 strings, UUID -> its
canonical string, numpy scalars and arrays -> numbers and lists, tuples ->
lists, NaN and +-Infinity -> null (as JavaScript's JSON.stringify does).
Anything else it cannot hold (a set, bytes, a circular dict, nesting deeper
than 254 levels) is quarantined at once, never taken for a store outage.
"""

from __future__ import annotations

import json
import logging
import random
import string
from datetime import date, datetime, time as dtime, timezone
from uuid import UUID, uuid4

import numpy as np
import pytest

from _loss_helpers import FAST, FLUSH_S, SOON_S, TimedEnqueuer, events, stat_field, stop_quietly
from _proc_helpers import failed_files, orphan_name, pending_spill_files, spill_line, wait_for
from conftest import Gate
from iai_queue import ProvenanceWriteQueue


def _nest(levels: int) -> dict:
    d: dict = {"leaf": 1}
    for _ in range(levels):
        d = {"a": d}
    return d


def _circular() -> dict:
    d: dict = {"name": "loop"}
    d["self"] = d
    return d


UNENCODABLE = {
    "set": lambda: {"tags": {"a", "b"}},
    "bytes": lambda: {"raw": b"\x00\x01binary"},
    "circular": _circular,
    "deep300": lambda: _nest(300),
}


def _quarantined_lines(spill_dir) -> int:
    return sum(len([x for x in p.read_bytes().split(b"\n") if x.strip()]) for p in failed_files(spill_dir))


def _reasons(spill_dir) -> list[str]:
    return [line for p in failed_files(spill_dir) if p.with_suffix(".reason").exists()
            for line in p.with_suffix(".reason").read_text().splitlines() if line.strip()]


def _ns(store, rid) -> list:
    return [e["n"] for e in store.get(rid).provenance]


class SpillingQueue:
    """A started queue whose store holds the first batch: later entries overflow into spill files."""

    def __init__(self, store, spill_dir, rid, **opts):
        self.gate = Gate(store)
        self.q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=1, max_batch_pairs=8,
                                      **{**FAST, **opts}).start()
        self.q.enqueue([(rid, {"t": "fill", "n": -2})])
        assert self.gate.entered.wait(5), "the worker never reached the store"
        self.q.enqueue([(rid, {"t": "fill", "n": -1})])  # memory is full now: what follows spills

    def settle(self) -> None:
        """Wait until nothing is on its way to the spill directory."""
        wait_for(lambda: self.q.stats().spill_buffered == 0, 10, what="the spill thread to catch up")


# -- item 7: one codec on every path --------------------------------------------------------------

def _convertible() -> dict:
    return {
        "dt": datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc),
        "naive": datetime(2024, 5, 6, 7, 8, 9),
        "d": date(2024, 5, 6),
        "tm": dtime(7, 8, 9, 500),
        "u": UUID("12345678-1234-5678-1234-567812345678"),
        "i64": np.int64(2**40), "i32": np.int32(-7), "u8": np.uint8(255),
        "f32": np.float32(1.5), "f64": np.float64(2.25), "b": np.bool_(True),
        "arr": np.arange(3), "mat": np.array([[1.5, 2.5], [3.5, np.nan]]),
        "tup": (1, "a", (2, 3)),
        "nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "np_nan": np.float64("nan"),
        "nested": {"when": date(2020, 1, 2), "xs": [np.int16(3), (4, 5), {"u": UUID(int=1)}]},
        "plain": {"s": "text ü", "i": 1, "f": 0.5, "none": None, "t": True},
    }


def _check_convertible(got: dict) -> None:
    want = _convertible()
    for key in ("dt", "naive"):
        assert isinstance(got[key], str) and datetime.fromisoformat(got[key]) == want[key], (key, got[key])
    assert isinstance(got["d"], str) and date.fromisoformat(got["d"]) == want["d"], got["d"]
    assert isinstance(got["tm"], str) and dtime.fromisoformat(got["tm"]) == want["tm"], got["tm"]
    rest = {k: v for k, v in got.items() if k not in ("dt", "naive", "d", "tm")}
    assert rest == {
        "u": "12345678-1234-5678-1234-567812345678",
        "i64": 2**40, "i32": -7, "u8": 255, "f32": 1.5, "f64": 2.25, "b": True,
        "arr": [0, 1, 2], "mat": [[1.5, 2.5], [3.5, None]],
        "tup": [1, "a", [2, 3]],
        "nan": None, "inf": None, "ninf": None, "np_nan": None,
        "nested": {"when": "2020-01-02", "xs": [3, [4, 5], {"u": "00000000-0000-0000-0000-000000000001"}]},
        "plain": {"s": "text ü", "i": 1, "f": 0.5, "none": None, "t": True},
    }


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["memory", "spill", "after_stop", "sync"])
def test_item07_codec_gives_the_same_stored_value_on_every_path(store, records, spill_dir, path):
    rid = records[0].id
    entry = {"t": "c", "n": 0, **_convertible()}
    q = None
    try:
        if path == "memory":
            q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
            q.enqueue([(rid, entry)])
            assert q.flush(FLUSH_S) is True
        elif path == "spill":
            sq = SpillingQueue(store, spill_dir, rid)
            q = sq.q
            q.enqueue([(rid, entry)])
            sq.settle()
            assert q.stats().spilled_pairs == 1, q.stats()
            sq.gate.open()
            assert q.flush(FLUSH_S) is True
        elif path == "after_stop":
            q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
            q.stop()
            q.enqueue([(rid, entry)])
        else:
            store.enable_provenance_queue(spill_dir=spill_dir)
            store.disable_provenance_queue()
            store.queue_provenance_batch([(rid, entry)])
    finally:
        if q is not None:
            stop_quietly(q)
    got = [e for e in store.get(rid).provenance if e["t"] == "c"]
    assert len(got) == 1, f"stored {len(got)} times; quarantined: {_reasons(spill_dir)[:3]}"
    _check_convertible({k: v for k, v in got[0].items() if k not in ("t", "n")})
    assert not failed_files(spill_dir)
    if q is not None:
        s = q.stats()
        assert s.retries == 0 and s.store_errors == 0 and s.quarantined_lines == 0, s


@pytest.mark.timeout(30)
def test_item07_replayed_nan_and_infinity_are_stored_as_null(store, records, spill_dir):
    rid = records[0].id
    spill_dir.mkdir(parents=True)
    line = (b'{"id":"' + str(rid).encode() + b'","entry":{"t":"r","n":0,"nan":NaN,"inf":Infinity,'
            b'"ninf":-Infinity,"xs":[1,NaN]},"eid":"nan-0"}\n')
    (spill_dir / orphan_name(store.path, 1)).write_bytes(line)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the replay")
        assert q.flush(FLUSH_S)
    finally:
        stop_quietly(q)
    (got,) = store.get(rid).provenance
    assert got == {"t": "r", "n": 0, "nan": None, "inf": None, "ninf": None, "xs": [1, None]}, got
    # and the stored text is standard JSON
    assert json.loads(json.dumps(got, allow_nan=False)) == got


def _run_with_bad(kind: str, rid) -> tuple[list, list, int]:
    """Calls: 10 good, 30 bad in a row, one mixed [good, bad, good], 10 good. Returns (calls, good ns, bad count)."""
    make = UNENCODABLE[kind]
    calls, good, n = [], [], 0
    for _ in range(10):
        calls.append([(rid, {"t": "g", "n": n})])
        good.append(n)
        n += 1
    for _ in range(30):
        calls.append([(rid, {"t": "bad", "n": -1, "v": make()})])
    calls.append([(rid, {"t": "g", "n": n}), (rid, {"t": "bad", "n": -1, "v": make()}), (rid, {"t": "g", "n": n + 1})])
    good += [n, n + 1]
    n += 2
    for _ in range(10):
        calls.append([(rid, {"t": "g", "n": n})])
        good.append(n)
        n += 1
    return calls, good, 31


def _check_quarantine(store, rid, spill_dir, q, kind, good, bad) -> None:
    assert _ns(store, rid)[-len(good):] == good
    s = q.stats() if q is not None else None
    if s is not None:
        assert s.quarantined_lines == bad, s
        assert s.retries == 0 and s.store_errors == 0, f"an encoding error was taken for a store outage: {s}"
        assert s.dropped == 0
    assert _quarantined_lines(spill_dir) == bad
    reasons = _reasons(spill_dir)
    assert len(reasons) == bad, reasons[:3]
    if kind in ("set", "bytes"):
        assert all(kind in r for r in reasons), reasons[:3]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(UNENCODABLE))
def test_item07_unencodable_run_quarantined_at_once_memory_path(store, records, spill_dir, kind):
    rid = records[0].id
    calls, good, bad = _run_with_bad(kind, rid)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_batch_pairs=16, **FAST).start()
    try:
        enq = TimedEnqueuer(q.enqueue, calls).start()
        enq.wait(10)
        assert q.flush(FLUSH_S) is True, f"stalled: {q.stats()}"
        _check_quarantine(store, rid, spill_dir, q, kind, good, bad)
        assert q.stats().written == len(good)
        assert store.provenance_rows() == len(good)
    finally:
        stop_quietly(q)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(UNENCODABLE))
def test_item07_unencodable_run_quarantined_at_once_spill_path(store, records, spill_dir, kind):
    rid = records[0].id
    calls, good, bad = _run_with_bad(kind, rid)
    sq = SpillingQueue(store, spill_dir, rid)
    q = sq.q
    try:
        enq = TimedEnqueuer(q.enqueue, calls).start()
        enq.wait(10)
        sq.settle()
        # quarantined before the store is asked for anything
        wait_for(lambda: q.stats().quarantined_lines >= bad, SOON_S, what=f"{bad} quarantined lines")
        sq.gate.open()
        assert q.flush(FLUSH_S) is True, f"stalled: {q.stats()}; left: {pending_spill_files(spill_dir)}"
        _check_quarantine(store, rid, spill_dir, q, kind, [-2, -1] + good, bad)
        assert store.provenance_rows() == len(good) + 2
    finally:
        sq.gate.open()
        stop_quietly(q)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", sorted(UNENCODABLE))
def test_item07_unencodable_quarantined_on_the_synchronous_path(store, records, spill_dir, kind):
    rid = records[0].id
    store.enable_provenance_queue(spill_dir=spill_dir)
    store.disable_provenance_queue()
    make = UNENCODABLE[kind]
    store.queue_provenance_batch([(rid, {"t": "g", "n": 0}), (rid, {"t": "bad", "n": -1, "v": make()}),
                                  (rid, {"t": "g", "n": 1})])
    store.queue_provenance_batch([(rid, {"t": "bad", "n": -1, "v": make()}) for _ in range(3)]
                                 + [(rid, {"t": "g", "n": 2})])
    assert _ns(store, rid) == [0, 1, 2]
    assert store.provenance_rows() == 3
    assert _quarantined_lines(spill_dir) == 4
    assert len(_reasons(spill_dir)) == 4


@pytest.mark.timeout(30)
def test_item07_too_deep_line_in_a_spill_file_is_quarantined_on_replay(store, records, spill_dir):
    rid = records[0].id
    spill_dir.mkdir(parents=True)
    deep = (b'{"id":"' + str(rid).encode() + b'","entry":{"t":"bad","n":-1,"v":' + b'{"a":' * 300 + b'1'
            + b'}' * 300 + b'},"eid":"deep-1"}\n')
    data = spill_line(rid, {"t": "g", "n": 0}, eid="g-0") + deep + spill_line(rid, {"t": "g", "n": 1}, eid="g-1")
    (spill_dir / orphan_name(store.path, 1)).write_bytes(data)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the replay")
        assert q.flush(FLUSH_S)
        assert _ns(store, rid) == [0, 1]
        assert store.provenance_rows() == 2
        (bad,) = failed_files(spill_dir)
        assert bad.read_bytes() == deep
        assert q.stats().quarantined_lines == 1
    finally:
        stop_quietly(q)


# -- item 8: a 2000-level nested dict ---------------------------------------------------------------

def _deep_calls(rid) -> tuple[list, list]:
    calls, good = [], []
    for n in range(5):
        calls.append([(rid, {"t": "g", "n": n})])
        good.append(n)
    calls.append([(rid, {"t": "g", "n": 5}), (rid, {"t": "bad", "n": -1, "v": _nest(2000)}), (rid, {"t": "g", "n": 6})])
    good += [5, 6]
    for n in range(7, 60):
        calls.append([(rid, {"t": "g", "n": n})])
        good.append(n)
    return calls, good


@pytest.mark.timeout(30)
def test_item08_2000_level_nesting_memory_path_kills_no_thread(store, records, spill_dir):
    rid = records[0].id
    calls, good = _deep_calls(rid)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=8, max_batch_pairs=8, **FAST).start()
    try:
        TimedEnqueuer(q.enqueue, calls).start().wait(15)
        assert q.flush(FLUSH_S) is True, f"stalled: {q.stats()}"
        assert _ns(store, rid) == good
        assert store.provenance_rows() == len(good)
        s = q.stats()
        assert s.quarantined_lines == 1 and s.dropped == 0 and s.retries == 0 and s.store_errors == 0, s
        assert _quarantined_lines(spill_dir) == 1
        q.enqueue([(rid, {"t": "g", "n": 60})])  # and the queue still works
        assert q.flush(FLUSH_S) and _ns(store, rid)[-1] == 60
    finally:
        stop_quietly(q)


@pytest.mark.timeout(30)
def test_item08_2000_level_nesting_spill_path_kills_no_thread(store, records, spill_dir):
    rid = records[0].id
    calls, good = _deep_calls(rid)
    sq = SpillingQueue(store, spill_dir, rid, max_memory_pairs=8, spill_file_pairs=8)
    q = sq.q
    try:
        TimedEnqueuer(q.enqueue, calls).start().wait(15)
        sq.settle()
        sq.gate.open()
        assert q.flush(FLUSH_S) is True, f"stalled: {q.stats()}"
        assert _ns(store, rid) == [-2, -1] + good
        assert store.provenance_rows() == len(good) + 2
        s = q.stats()
        assert s.quarantined_lines == 1 and s.dropped == 0, s
    finally:
        sq.gate.open()
        stop_quietly(q)


@pytest.mark.timeout(30)
def test_item08_2000_level_nesting_synchronous_path(store, records, spill_dir):
    rid = records[0].id
    store.enable_provenance_queue(spill_dir=spill_dir)
    store.disable_provenance_queue()
    store.queue_provenance_batch([(rid, {"t": "g", "n": 0}), (rid, {"t": "bad", "n": -1, "v": _nest(2000)}),
                                  (rid, {"t": "g", "n": 1})])
    assert _ns(store, rid) == [0, 1]
    assert _quarantined_lines(spill_dir) == 1


@pytest.mark.timeout(30)
def test_item08_2000_level_line_in_a_spill_file_kills_no_thread(store, records, spill_dir):
    rid = records[0].id
    spill_dir.mkdir(parents=True)
    deep = (b'{"id":"' + str(rid).encode() + b'","entry":{"t":"bad","n":-1,"v":' + b'{"a":' * 2000 + b'1'
            + b'}' * 2000 + b'},"eid":"deep-1"}\n')
    data = spill_line(rid, {"t": "g", "n": 0}, eid="g-0") + deep + spill_line(rid, {"t": "g", "n": 1}, eid="g-1")
    (spill_dir / orphan_name(store.path, 1)).write_bytes(data)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), SOON_S, what="the replay")
        q.enqueue([(rid, {"t": "g", "n": 2})])
        assert q.flush(FLUSH_S) is True
        assert _ns(store, rid) == [0, 1, 2]
        (bad,) = failed_files(spill_dir)
        assert bad.read_bytes() == deep
    finally:
        stop_quietly(q)


# -- item 9: no size limit ----------------------------------------------------------------------------

def _big_text(mib: int, seed: int) -> str:
    rnd = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + ' "\\/\n\t\x00\x7fαβγ€\u2028😀'
    block = "".join(rnd.choice(alphabet) for _ in range(1 << 16))
    return (block * ((mib << 20) // len(block) + 1))[: mib << 20] + f"-end-{seed}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mib", [2, 20])
def test_item09_big_entry_survives_spill_and_replay_byte_for_byte(store, records, spill_dir, mib):
    rid = records[0].id
    big = {"t": "big", "n": 0, "blob": _big_text(mib, mib), "also": {"xs": [1, 2, 3]}}
    sq = SpillingQueue(store, spill_dir, rid)
    q = sq.q
    try:
        q.enqueue([(rid, big)])
        q.enqueue([(rid, {"t": "after", "n": 1})])
        sq.settle()
        assert q.stats().spilled_pairs == 2
        sq.gate.open()
        assert q.flush(30) is True
        got = store.get(rid).provenance
        assert [e["n"] for e in got] == [-2, -1, 0, 1]
        assert got[2]["blob"] == big["blob"], "the big entry changed on its way through the spill file"
        assert got[2] == big
        assert store.provenance_rows() == 4
        assert q.stats().quarantined_lines == 0 and not failed_files(spill_dir)
    finally:
        sq.gate.open()
        stop_quietly(q)


@pytest.mark.timeout(30)
def test_item09_quarantine_keeps_a_3_mib_bad_line_whole(store, records, spill_dir):
    rid = records[0].id
    spill_dir.mkdir(parents=True)
    bad = b'{"id": "not-a-uuid", "entry": {"blob": "' + b"y" * (3 << 20) + b'"}}\n'
    data = spill_line(rid, {"t": "g", "n": 0}, eid="g-0") + bad + spill_line(rid, {"t": "g", "n": 1}, eid="g-1")
    (spill_dir / orphan_name(store.path, 1)).write_bytes(data)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the replay")
        assert q.flush(FLUSH_S)
        assert _ns(store, rid) == [0, 1]
        (failed,) = failed_files(spill_dir)
        assert failed.read_bytes() == bad, f"kept {failed.stat().st_size} of {len(bad)} bytes"
        assert q.stats().quarantined_lines == 1
    finally:
        stop_quietly(q)


# -- item 10: record ids the store does not have ------------------------------------------------------

@pytest.mark.timeout(30)
def test_item10_unknown_records_counted_as_skipped_not_written(store, records, spill_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="iai_queue")
    unknown = [uuid4() for _ in range(3)]
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        q.enqueue([(records[0].id, {"n": 0}), (unknown[0], {"n": 1}), (records[1].id, {"n": 2}),
                   (unknown[1], {"n": 3}), (unknown[2], {"n": 4})])
        assert q.flush(FLUSH_S)
        s = q.stats()
        assert s.written == 2, f"written counts pairs the store skipped: {s}"
        assert stat_field(s, "skipped_unknown") == 3
        assert store.provenance_rows() == 2
        assert events(caplog, "skip.unknown_record"), "the skip was not logged"
    finally:
        stop_quietly(q)


@pytest.mark.timeout(30)
def test_item10_unknown_records_in_a_replay_counted_as_skipped(store, records, spill_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="iai_queue")
    spill_dir.mkdir(parents=True)
    data = b"".join(spill_line(rid, {"n": k}, eid=f"u-{k}")
                    for k, rid in enumerate([records[0].id, uuid4(), records[1].id, uuid4()]))
    (spill_dir / orphan_name(store.path, 1)).write_bytes(data)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the replay")
        assert q.flush(FLUSH_S)
        s = q.stats()
        assert s.written == 2 and stat_field(s, "skipped_unknown") == 2, s
        assert store.provenance_rows() == 2
        assert events(caplog, "skip.unknown_record")
    finally:
        stop_quietly(q)


@pytest.mark.timeout(10)
def test_codec_plain_first_gives_the_bytes_of_the_full_options():
    """encode() tries plain orjson first (faster) and falls back to the codec's options: the bytes must
    be those of the options every time, for entries that need them and entries that do not."""
    import orjson

    from iai_queue.jsoncodec import OPTIONS, encode, encode_entries

    class Key(str):
        pass

    values = [
        {"cue": "x", "n": 1, "f": 0.1, "ok": True, "none": None, "l": [1, "a", {"b": 2}]},
        {1: "int key", 2.5: "float key", True: "bool key", None: "none key"},
        {Key("sub"): 1, "plain": 2},
        {"np_float": np.float64(0.1), "np_int": np.int64(7), "arr": np.arange(3), "b": np.bool_(True)},
        {"when": datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc), "day": date(2026, 1, 2), "id": uuid4()},
        {"nan": float("nan"), "inf": float("inf"), "t": (1, 2)},
        (5, ((uuid4(), {"n": 1}),)),  # a journal record
    ]
    for v in values:
        assert encode(v) == orjson.dumps(v, option=OPTIONS), v
    assert encode_entries(values) == [orjson.dumps(v, option=OPTIONS) for v in values]
    with pytest.raises(TypeError):
        encode({"s": {1, 2}})
