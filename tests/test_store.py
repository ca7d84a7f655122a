import threading
import uuid

import pytest

from conftest import DIM, make_records
from iai_queue import MemoryRecord, MemoryStore, ProvenanceBatch


def test_record_defaults():
    r = MemoryRecord(id=uuid.uuid4(), text="hello", embedding=[0.0] * DIM)
    assert r.provenance == []
    assert r.created_at.tzinfo is not None


def test_insert_get_roundtrip(store):
    rec = make_records(1)[0]
    rec.provenance = [{"ts": "t0", "cue": "c", "session_id": "s"}]
    store.insert(rec)
    got = store.get(rec.id)
    assert got.id == rec.id and got.text == rec.text
    assert got.embedding == pytest.approx(rec.embedding)
    assert got.provenance == [{"ts": "t0", "cue": "c", "session_id": "s"}]
    assert store.get(uuid.uuid4()) is None
    assert store.get(str(rec.id)).id == rec.id


def test_insert_many_is_one_commit(store):
    before = store._records.version
    store.insert_many(make_records(50))
    assert store._records.version == before + 1
    assert store.count() == 50


def test_wrong_embedding_length_is_value_error(store):
    bad = MemoryRecord(id=uuid.uuid4(), text="x", embedding=[0.0] * (DIM + 1))
    with pytest.raises(ValueError, match=f"length {DIM + 1}"):
        store.insert(bad)
    assert store.count() == 0


def test_path_that_is_a_file_is_value_error(tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    with pytest.raises(ValueError, match="not-a-dir"):
        MemoryStore(f)


def test_default_path_from_env_then_home(tmp_path, monkeypatch, _isolated_home):
    monkeypatch.setenv("IAI_QUEUE_STORE", str(tmp_path / "envdb"))
    assert MemoryStore(dim=DIM).path == tmp_path / "envdb"
    monkeypatch.delenv("IAI_QUEUE_STORE")
    s = MemoryStore(dim=DIM)
    assert s.path == _isolated_home / ".iai-mcp" / "lancedb"
    assert s.path.is_dir()


def test_reopen_with_other_dim_is_value_error(tmp_path):
    MemoryStore(tmp_path / "db", dim=DIM)
    with pytest.raises(ValueError, match="dim=16"):
        MemoryStore(tmp_path / "db", dim=16)


def test_append_keeps_order_skips_unknown_and_empty(store, records):
    a, b = records[0], records[1]
    store.append_provenance_batch([])
    store.append_provenance_batch([(a.id, {"n": 1}), (uuid.uuid4(), {"n": "ghost"}), (b.id, {"n": 2}), (a.id, {"n": 3})])
    store.append_provenance_batch([(a.id, {"n": 4})], records_cache={a.id: a})
    assert store.get(a.id).provenance == [{"n": 1}, {"n": 3}, {"n": 4}]
    assert store.get(b.id).provenance == [{"n": 2}]
    assert store.provenance_rows() == 4


def test_entries_come_back_without_extra_keys(store, records):
    entry = {"ts": "2026-01-01T00:00:00+00:00", "cue": "c", "session_id": "s"}
    store.append_provenance_batch([(records[0].id, entry)])
    assert store.get(records[0].id).provenance == [entry]


def test_concurrent_appends_lose_nothing(store, records):
    rid = records[0].id
    threads, per_thread = 4, 15

    def writer(t):
        for i in range(per_thread):
            store.append_provenance_batch([(rid, {"t": t, "i": i})])

    ts = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    prov = store.get(rid).provenance
    assert len(prov) == threads * per_thread
    for t in range(threads):  # each writer's own order is kept
        assert [e["i"] for e in prov if e["t"] == t] == list(range(per_thread))


def test_verify_batch_skips_entry_ids_already_stored(store, records):
    rid = records[0].id
    store.append_provenance_batch(ProvenanceBatch([(rid, {"n": 1})], ["e1"]))
    store.append_provenance_batch(ProvenanceBatch([(rid, {"n": 1}), (rid, {"n": 2})], ["e1", "e2"], verify=True))
    assert store.provenance_rows() == 2
    assert store.get(rid).provenance == [{"n": 1}, {"n": 2}]


def test_get_shows_an_entry_id_once_even_if_written_twice(store, records):
    rid = records[0].id
    for _ in range(2):  # an unverified replay: the row lands twice, the entry shows once
        store.append_provenance_batch(ProvenanceBatch([(rid, {"n": 1})], ["same"]))
    assert store.provenance_rows() == 2
    assert store.get(rid).provenance == [{"n": 1}]


def test_search_returns_hits_best_first(store, records):
    hits = store.search(records[3].embedding, k=5)
    assert hits[0]["id"] == records[3].id
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert set(hits[0]) == {"id", "text", "score"}


def test_maintain_builds_indexes_and_keeps_data(store, records):
    store.append_provenance_batch([(r.id, {"n": i}) for i, r in enumerate(records)])
    store.maintain()
    store.maintain()  # idempotent
    cols = {tuple(i.columns) for i in store._provenance.list_indices()}
    assert ("record_id",) in cols and ("entry_id",) in cols
    assert store.get(records[5].id).provenance == [{"n": 5}]
