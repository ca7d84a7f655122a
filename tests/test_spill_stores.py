"""The tag → store-location map in the spill directory, and the operator commands that show it."""

import json

from iai_queue.cli import main
from iai_queue.spill import encode_line, store_tag
from iai_queue.spill.stores import record_store_location, redact_location, store_locations


def spill_file(d, store_path, record, n=1, writer="w1x0dead"):
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{1_700_000_000_000_000_000 + n:019d}-{store_tag(store_path)}-{writer}-{n:06d}.jsonl"
    path.write_bytes(encode_line(record.id, {"n": n}, f"t-{n}", False))
    return path


def test_map_is_written_once_per_store_and_read_back(tmp_path):
    d = tmp_path / "spill"
    assert record_store_location(d, tmp_path / "db") is None and not d.exists()  # never creates the directory
    d.mkdir()
    first = record_store_location(d, tmp_path / "db")
    mtime = first.stat().st_mtime_ns
    assert record_store_location(d, tmp_path / "db") == first and first.stat().st_mtime_ns == mtime  # unchanged
    record_store_location(d, tmp_path / "other")
    (d / ".store-zzzz.json").write_text("not a map")  # ignored: not a tag name
    (d / f".store-{store_tag('x')}.json").write_text("{broken")  # ignored: unreadable
    assert store_locations(d) == {store_tag(tmp_path / "db"): str((tmp_path / "db").resolve()),
                                  store_tag(tmp_path / "other"): str((tmp_path / "other").resolve())}
    assert [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []


def test_locations_never_hold_credentials():
    assert redact_location("s3://AKIA:secret@bucket.example:9000/mem/db?token=abc#x") == "s3://bucket.example:9000/mem/db"
    assert redact_location("gs://bucket/path") == "gs://bucket/path"


def test_enabling_the_queue_names_the_store_in_an_existing_spill_dir(store, tmp_path):
    d = tmp_path / "spill"
    store.enable_provenance_queue(spill_dir=d)
    store.disable_provenance_queue()
    assert not d.exists()  # a run that spills nothing leaves no trace
    d.mkdir()
    store.enable_provenance_queue(spill_dir=d)
    store.disable_provenance_queue()
    assert store_locations(d) == {store_tag(store.path): str(store.path.resolve())}


def test_status_shows_the_store_of_each_file_and_replay_names_the_others(capsys, tmp_path, store, records):
    d = tmp_path / "spill"
    spill_file(d, tmp_path / "elsewhere", records[0], 1)
    spill_file(d, tmp_path / "unknown", records[1], 2)
    record_store_location(d, tmp_path / "elsewhere")

    assert main(["spill", "status", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert " STORE " in out.splitlines()[5]
    assert f"{store_tag(tmp_path / 'elsewhere')}  {(tmp_path / 'elsewhere').resolve()}" in out
    assert f"{store_tag(tmp_path / 'unknown')}  (not recorded)" in out

    assert main(["spill", "status", "--json", "--dir", str(d)]) == 0
    stores = json.loads(capsys.readouterr().out)["stores"]
    assert stores == {store_tag(tmp_path / "elsewhere"): str((tmp_path / "elsewhere").resolve()),
                      store_tag(tmp_path / "unknown"): None}

    assert main(["spill", "replay", "--store", str(store.path), "--dir", str(d)]) == 0
    err = capsys.readouterr().err
    assert "2 files belong to other stores: not touched" in err
    assert f"{(tmp_path / 'elsewhere').resolve()} ({store_tag(tmp_path / 'elsewhere')}): 1700000000000000001-" in err
    assert f"store {store_tag(tmp_path / 'unknown')} (location not recorded): 1700000000000000002-" in err
    assert store_tag(store.path) in store_locations(d)  # the replay named its own store too


def test_a_store_on_object_storage_is_named_by_the_tag_its_queue_writes(capsys, tmp_path, s3_store, s3_options,
                                                                        records, monkeypatch):
    """A review's find: the map of a store on object storage was written under a tag hashed from the URI
    taken for a local path (so it changed with the working directory) while the queue's files carry the
    store's identity; ``status`` showed those files' store as "(not recorded)"."""
    d = tmp_path / "spill"
    d.mkdir()
    s3_store.insert_many(records[:1])

    def down(pairs, records_cache=None):
        raise ConnectionError("test: store down")

    s3_store.append_provenance_batch = down  # what the queue holds at stop() is spilled
    monkeypatch.chdir(tmp_path)
    q = s3_store.enable_provenance_queue(spill_dir=d, retry_initial_s=0.01, retry_max_s=0.05)
    q.enqueue([(records[0].id, {"n": 1})])
    s3_store.disable_provenance_queue(timeout=0.5)
    (spilled,) = [p.name for p in d.iterdir() if p.name.endswith(".jsonl")]
    assert f"-{s3_store.identity}-" in spilled
    assert store_locations(d) == {s3_store.identity: s3_store.location}
    assert store_tag(s3_store.path) == s3_store.identity
    monkeypatch.chdir("/")
    assert store_tag(s3_store.path) == s3_store.identity  # whatever the working directory
    assert main(["spill", "status", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"{s3_store.identity}  {s3_store.location}" in out and "(not recorded)" not in out
