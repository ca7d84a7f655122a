"""Provenance clustering: the plan, rows kept exactly once under concurrent appends and SIGKILL, version pruning."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from _proc_helpers import wait_for
from conftest import make_records
from iai_queue import MemoryStore
from iai_queue import store_maintenance
from iai_queue.provenance_clustering import ClusterPolicy, ProvenanceClusterer, _is_sorted, plan_merges

SMALL = ClusterPolicy(base_rows=64, fanout=2, max_run_rows=1024)


def test_plan_merges_by_tier():
    p = ClusterPolicy(base_rows=100, fanout=4, max_run_rows=1000)
    assert plan_merges([(1, 10, False)], p) == []  # one small fragment: left as it is
    assert plan_merges([(1, 10, False), (2, 20, True)], p) == [[1, 2]]
    assert plan_merges([(1, 500, False)], p) == [[1]]  # a large unsorted fragment is sorted alone
    assert plan_merges([(1, 500, True)], p) == []
    # tier 1 (100..399): four merge into one, the fifth waits
    assert plan_merges([(i, 100 + i, True) for i in range(5)], p) == [[0, 1, 2, 3]]
    # four of tier 2 would exceed max_run_rows: settled
    assert plan_merges([(i, 400, True) for i in range(4)], p) == []
    # tier 0 is cut at max_run_rows
    groups = plan_merges([(i, 90, False) for i in range(25)], p)
    assert sorted(f for g in groups for f in g) == list(range(25))
    assert all(len(g) * 90 <= 1000 for g in groups)
    assert plan_merges([(1, 0, False), (2, 0, False)], p) == []
    assert plan_merges([(1, 5000, False)], p) == [[1]]  # unsorted and over max_run_rows: sorted alone
    mixed = plan_merges([(1, 10, False), (2, 20, True), (3, 150, True), (4, 160, True), (5, 170, True),
                         (6, 180, True), (7, 450, True)], p)
    assert mixed == [[1, 2], [3, 4, 5, 6]]  # tier 0 and tier 1 at once; tier 2 alone waits


def _store_with_records(tmp_path, n: int, **kwargs):
    store = MemoryStore(tmp_path / "db", dim=4, **{"maintenance": "never", **kwargs})  # kwargs may override it
    recs = make_records(n, dim=4)
    store.insert_many(recs)
    return store, recs


@pytest.mark.parametrize("bad", [dict(base_rows=0), dict(fanout=1), dict(fanout=2.0), dict(max_run_rows=10)])
def test_cluster_policy_refuses_values_that_would_never_settle(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ClusterPolicy(**bad)


def _rows(store):
    t = store._provenance.to_arrow()
    return t.num_rows, pc.count_distinct(t.column("entry_id")).as_py()


@pytest.mark.timeout(120)
def test_clustering_under_concurrent_appends_keeps_every_row_once_and_in_order(tmp_path):
    store, recs = _store_with_records(tmp_path, 12)
    clusterer = ProvenanceClusterer(store._provenance, SMALL)
    done = threading.Event()
    written = [0]
    errors = []

    def writer():
        rnd = random.Random(5)
        try:
            for b in range(80):
                store.append_provenance_batch([(rnd.choice(recs).id, {"n": written[0] + j}) for j in range(24)])
                written[0] += 24
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    rewritten = 0
    while not done.is_set():
        rewritten += clusterer.run()
    t.join(30)
    rewritten += clusterer.run()
    assert not errors and rewritten > 0
    assert _rows(store) == (written[0], written[0])  # every row once: none lost, none doubled
    seen = []
    for r in recs:
        ns = [e["n"] for e in store.get(r.id).provenance]
        assert ns == sorted(ns)  # per-record order kept
        seen += ns
    assert sorted(seen) == list(range(written[0]))
    fragments = store._provenance.to_lance().get_fragments()
    assert len(fragments) <= 8, len(fragments)  # 80 appends, clustered into a few runs
    assert sum(_is_sorted(f) for f in fragments) >= len(fragments) - 1  # at most one small raw append left


@pytest.mark.timeout(60)
def test_maintain_prunes_versions_superseded_for_longer_than_the_grace(tmp_path, monkeypatch):
    store = MemoryStore(tmp_path / "db", dim=4, maintenance="never")
    recs = make_records(3, dim=4)
    for r in recs:
        store.insert_many([r])
    for i in range(20):
        store.append_provenance_batch([(recs[i % 3].id, {"n": i})])
    store.maintain()
    assert len(store._provenance.to_lance().versions()) > 20  # within the grace: kept
    assert len(store._records.to_lance().versions()) > 3
    monkeypatch.setattr(store_maintenance, "VERSION_GRACE_S", 0.0)
    store.maintain()
    assert len(store._provenance.to_lance().versions()) <= 2
    assert len(store._records.to_lance().versions()) <= 2
    assert [e["n"] for e in store.get(recs[1].id).provenance] == [1, 4, 7, 10, 13, 16, 19]
    assert _rows(store) == (20, 20)


_CHILD = textwrap.dedent("""
    import random, sys
    sys.path.insert(0, {root!r})
    from iai_queue import MemoryStore
    from iai_queue.provenance_clustering import ClusterPolicy, ProvenanceClusterer
    store = MemoryStore({db!r}, dim=4, maintenance="never")
    ids = {ids!r}
    clusterer = ProvenanceClusterer(store._provenance, ClusterPolicy(base_rows=64, fanout=2, max_run_rows=4096))
    rnd, n = random.Random({seed}), {start}
    while True:
        store.append_provenance_batch([(rnd.choice(ids), {{"n": n + j}}) for j in range(50)])
        n += 50
        print(n, flush=True)
        clusterer.run()
""")


@pytest.mark.timeout(240)
def test_sigkill_mid_merge_leaves_every_acknowledged_row_once(tmp_path):
    db = tmp_path / "db"
    store = MemoryStore(db, dim=4, maintenance="never")
    recs = make_records(8, dim=4)
    store.insert_many(recs)
    root = str(Path(__file__).resolve().parent.parent)
    acknowledged = 0
    rnd = random.Random(11)
    for kill in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=root, db=str(db), ids=[str(r.id) for r in recs],
                                                                     seed=kill, start=acknowledged)],
                                stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        lines = 0
        target = rnd.randint(3, 12)
        while lines < target and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged = int(line)
            lines += 1
        time.sleep(rnd.uniform(0, 0.05))  # a random moment of the merge that follows the print
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # lines printed before the kill landed
        if rest.split():
            acknowledged = int(rest.split()[-1])
        proc.wait(10)
        assert lines == target, f"child {kill} printed {lines} of {target} lines"
        rows, distinct = _rows(store)
        assert distinct == rows and acknowledged <= rows <= acknowledged + 50, (kill, rows, acknowledged)
        acknowledged = rows
    store.maintain()
    assert _rows(store) == (acknowledged, acknowledged)
    ns = sorted(e["n"] for r in recs for e in store.get(r.id).provenance)
    assert ns == list(range(acknowledged))


@pytest.mark.timeout(60)
def test_background_run_starts_after_appends_threshold_appends_and_clusters_them(tmp_path):
    from iai_queue.maintenance import MaintenancePolicy

    store, recs = _store_with_records(tmp_path, 4, maintenance=MaintenancePolicy(
        rows_threshold=10**6, appends_threshold=5, idle_s=600, poll_s=0.05))
    for i in range(4):
        store.append_provenance_batch([(recs[i].id, {"n": i})])
    assert store.maintenance_stats().runs == 0  # 4 appends, 4 rows: nothing due
    store.append_provenance_batch([(recs[0].id, {"n": 4})])
    wait_for(lambda: store.maintenance_stats().runs >= 1, 30, what="a run after 5 appends")
    assert store.maintenance_stats().failures == 0
    assert len(store._provenance.to_lance().get_fragments()) == 1  # five one-row fragments, one run
    assert [e["n"] for e in store.get(recs[0].id).provenance] == [0, 4]
    store.close()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_appends_threshold_must_be_a_positive_int(bad):
    from iai_queue.maintenance import MaintenancePolicy

    with pytest.raises(ValueError, match="appends_threshold"):
        MaintenancePolicy(appends_threshold=bad)


@pytest.mark.timeout(120)
def test_two_maintainers_overlapping_with_a_writer_lose_and_double_nothing(tmp_path, monkeypatch):
    """What a window lock overlap on object storage (or two designated maintainers) amounts to, with
    versions pruned as they pass a short grace."""
    monkeypatch.setattr(store_maintenance, "VERSION_GRACE_S", 1.0)
    a = MemoryStore(tmp_path / "db", dim=4, maintenance="never")
    b = MemoryStore(tmp_path / "db", dim=4, maintenance="never")
    recs = make_records(6, dim=4)
    a.insert_many(recs)
    for store in (a, b):
        store._maintenance._clusterer = ProvenanceClusterer(store._provenance, SMALL)
    done = threading.Event()
    written = [0]
    failures: list[BaseException] = []
    writer_errors: list[BaseException] = []

    def writer():
        try:
            for i in range(150):
                a.append_provenance_batch([(recs[(i + j) % 6].id, {"n": written[0] + j}) for j in range(20)])
                written[0] += 20
        except BaseException as exc:
            writer_errors.append(exc)
        finally:
            done.set()

    def maintainer(store):
        while not done.is_set():
            try:
                store.maintain()
            except Exception as exc:  # a conflict the retries did not absorb: refused whole, by contract
                failures.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=maintainer, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not writer_errors, writer_errors
    a.maintain()
    assert _rows(a) == (written[0], written[0]), failures[:3]
    assert written[0] == 3000
    for r in recs:
        ns = [e["n"] for e in a.get(r.id).provenance]
        assert ns == sorted(ns) and len(ns) == written[0] // 6
    # A run may be refused whole, two ways, both documented (store_maintenance): the other maintainer's
    # commit came first (a conflict), or it pruned a version this run began from (not found; with a 1 s
    # grace under CPU load a run outlives it). Nothing else.
    unexpected = [exc for exc in failures
                  if "conflict" not in str(exc).lower() and "not found" not in str(exc).lower()]
    assert not unexpected, unexpected[:3]


@pytest.mark.timeout(60)
def test_a_run_returns_while_appends_keep_coming(tmp_path):
    """Planned once per run: a steady writer cannot keep a run merging forever."""
    store, recs = _store_with_records(tmp_path, 3)
    clusterer = ProvenanceClusterer(store._provenance, SMALL)
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            store.append_provenance_batch([(recs[n % 3].id, {"n": n})])
            n += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(5):
            clusterer.run()  # each returns (the test's timeout is the bound)
    finally:
        stop.set()
        t.join(30)
    rows, distinct = _rows(store)
    assert rows == distinct


def test_version_pruner_goes_by_its_own_clock_not_the_manifests(tmp_path):
    store, recs = _store_with_records(tmp_path, 2)
    for i in range(5):
        store.append_provenance_batch([(recs[0].id, {"n": i})])
    now = [1000.0]
    pruner = store_maintenance.VersionPruner(store._provenance, clock=lambda: now[0])
    before = len(store._provenance.to_lance().versions())
    assert pruner.run() == 0  # first seen superseded now, however old their timestamps
    now[0] += store_maintenance.VERSION_GRACE_S - 0.5
    store.append_provenance_batch([(recs[0].id, {"n": 5})])  # supersedes one more version
    assert pruner.run() == 0
    now[0] += 0.5
    assert pruner.run() == before - 1  # all but the one superseded later; the latest always stays
    assert len(store._provenance.to_lance().versions()) == 2
    now[0] += store_maintenance.VERSION_GRACE_S
    assert pruner.run() == 1
    assert [e["n"] for e in store.get(recs[0].id).provenance] == list(range(6))
