"""Recovery hands a store that takes them (``MemoryStore.takes_encoded_entries``) each entry as its JSON.

The bulk path (``journal.bulk.decode_run_encoded``) must give exactly what the
dict path gives: the same entries stored, the same records judged damaged,
the same bytes set aside — for single- and multi-pair calls, for records the
reader rejects although their checksum is right, and through a quarantine.
Real LanceDB in ``tmp_path``, real segment files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from uuid import UUID

import orjson
import pytest

from iai_queue import MemoryStore
from iai_queue.journal import Durability, JournalWriter
from iai_queue.jsoncodec import EncodedEntry, encode
from iai_queue.spill import SpillDirectory
from iai_queue.writebehind.journal_replay import JournalReplayer
from iai_queue.writebehind.lifecycle import StopSignal

from conftest import DIM, make_records

ENTRIES = [
    {"cue": "plain", "n": 0},
    {"cue": "unicode: é ✓ 😀", "n": 1, "nested": {"a": [1, 2.5, None, True], "b": {"c": "d"}}},
    {"cue": "escapes \" \\ \n \t", "n": 2, "big": 10 ** 18, "neg": -3.25e-7},
    {"n": 3, "empty": {}, "list": []},
]


def _dead_journal(spill_dir: Path, store: MemoryStore, calls: list[tuple]) -> None:
    """A writer journals ``calls`` (each a tuple of pairs) and dies: its segments stay as they are."""
    w = JournalWriter(SpillDirectory(spill_dir, store_path=store.path), "qenc-", Durability.PROCESS,
                      segment_bytes=64 << 10)
    w.open()
    with w.lock:
        for seq, items in enumerate(calls, start=1):
            w.append_locked(seq, items)
    for s in w.segments:
        os.close(s.fd)
    w.directory.release()


def _recover(store: MemoryStore, spill_dir: Path, takes_encoded: bool) -> list:
    """Replay everything; returns the entry types the store's append saw."""
    store.takes_encoded_entries = takes_encoded
    seen, real = [], store.append_provenance_batch

    def recording(pairs, records_cache=None):
        seen.extend(type(e) for _, e in pairs)
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = recording
    JournalReplayer.for_store(store, spill_dir).replay_all(StopSignal())
    return seen


def _twin_stores(tmp_path: Path):
    recs = make_records(4)
    stores = []
    for name in ("encoded", "dicts"):
        s = MemoryStore(tmp_path / name / "db", dim=DIM)
        s.insert_many(recs)
        stores.append(s)
    return stores, [str(r.id) for r in recs]


def _stored(store: MemoryStore, ids: list[str]) -> dict:
    return {rid: store.get(UUID(rid)).provenance for rid in ids}


@pytest.mark.timeout(60)
def test_recovered_entries_reach_the_store_as_json_and_land_as_the_dict_path_lands_them(tmp_path):
    (enc, dicts), ids = _twin_stores(tmp_path)
    calls = []
    for k in range(40):
        if k % 3 == 2:  # a recall's call: several hits
            calls.append(tuple((ids[(k + j) % 4], {**ENTRIES[j % 4], "k": k, "j": j}) for j in range(3)))
        else:
            calls.append(((ids[k % 4], {**ENTRIES[k % 4], "k": k}),))
    for store, takes in ((enc, True), (dicts, False)):
        _dead_journal(tmp_path / f"spill-{takes}", store, calls)
        seen = _recover(store, tmp_path / f"spill-{takes}", takes)
        assert set(seen) == ({EncodedEntry} if takes else {dict}), seen
    want = sum(len(c) for c in calls)
    assert enc.provenance_rows() == dicts.provenance_rows() == want
    assert _stored(enc, ids) == _stored(dicts, ids)
    first = [e for e in _stored(enc, ids)[ids[1]] if e.get("k") == 1][0]
    assert first == {**ENTRIES[1], "k": 1}  # byte for byte back to the same dict


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["number", "array", "short id", "no pairs"])
def test_a_checksummed_record_the_reader_rejects_is_judged_the_same_on_both_paths(tmp_path, bad):
    """A record whose checksum is right but whose shape is not a call's is damage on the bulk path as on
    the reader's (one kind per journal: any bad record sends its whole run to the reader's path)."""
    (enc, dicts), ids = _twin_stores(tmp_path)
    calls = [((ids[k % 4], {"n": k}),) for k in range(30)]
    calls[7] = {"number": ((ids[0], 5),), "array": ((ids[2], [1, 2]),), "short id": (("not-a-uuid", {"n": 7}),),
                "no pairs": ()}[bad]
    results = []
    for store, takes in ((enc, True), (dicts, False)):
        spill = tmp_path / f"spill-{takes}"
        _dead_journal(spill, store, calls)
        _recover(store, spill, takes)
        failed = sorted(spill.glob("*.failed-*.wal"))
        results.append(([f.read_bytes() for f in failed], store.provenance_rows()))
        assert [f for f in spill.glob("*.wal") if ".failed-" not in f.name] == []  # replayed; damage aside
    assert results[0] == results[1]
    assert results[0][1] == 29


@pytest.mark.timeout(30)
def test_an_encoded_entry_is_embedded_as_json_in_spill_and_quarantine_lines():
    e = EncodedEntry(b'{"cue":"x","n":1,"u":"\xc3\xa9"}')
    assert orjson.loads(encode({"entry": e, "why": "poison"})) == {"entry": {"cue": "x", "n": 1, "u": "é"},
                                                                   "why": "poison"}
    with pytest.raises(TypeError, match="bytes"):
        encode({"entry": b'{"cue":"x"}'})  # bytes from a caller stay unencodable


@pytest.mark.timeout(60)
def test_a_recovered_entry_the_store_rejects_is_quarantined_whole_and_the_rest_lands(tmp_path):
    """A poison entry in a replayed journal: the store refuses every batch holding it (a host's wrapper
    sees each entry as its JSON). It is quarantined with its entry as the JSON object it was; the
    others land once, in order."""
    from _proc_helpers import failed_files

    (store, _), ids = _twin_stores(tmp_path)
    calls = [((ids[0], {"n": k, "poison": k == 5}),) for k in range(12)]
    spill = tmp_path / "spill"
    _dead_journal(spill, store, calls)
    real = store.append_provenance_batch
    seen = []

    def refuse_poison(pairs, records_cache=None):
        entries = [json.loads(e) if isinstance(e, bytes) else e for _, e in pairs]  # as the docstring says
        seen.extend(type(e) for _, e in pairs)
        if any(e.get("poison") for e in entries):  # (the poison probe's entry has no "poison")
            raise ValueError("poison pill rejected by the store")
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = refuse_poison
    JournalReplayer.for_store(store, spill, retry_initial_s=0.001, retry_max_s=0.01).replay_all(StopSignal())
    assert EncodedEntry in seen
    assert [e["n"] for e in store.get(UUID(ids[0])).provenance] == [k for k in range(12) if k != 5]
    assert store.provenance_rows() == 11
    (quarantined,) = failed_files(spill)
    (line,) = [orjson.loads(raw) for raw in quarantined.read_bytes().splitlines() if raw.strip()]
    assert line["entry"] == {"n": 5, "poison": True}, line
