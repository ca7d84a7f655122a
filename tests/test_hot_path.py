"""The enqueue hot path: string ids take a cheap path and still reach the store as UUIDs."""

from uuid import UUID

import pytest

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
