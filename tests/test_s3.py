"""The store in object storage: a real S3-compatible server (moto) on loopback.

Several hosts are several MemoryStore connections with their own queues and
spill directories (in this process, or separate python processes); outages come
from a TCP proxy between them and the server that refuses or hangs connections.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from uuid import UUID

import pytest

from _proc_helpers import Reader, pending_spill_files, wait_for
from _s3 import SECRET_KEY, ProxyMode, TcpProxy
from conftest import DIM, Gate, make_records
from iai_queue import MemoryStore, ProvenanceWriteQueue
from iai_queue.location import StoreLocation

HOST = str(Path(__file__).resolve().parent / "_s3_host.py")
ROOT = Path(__file__).resolve().parent.parent
FAST = dict(coalesce_ms=5, retry_initial_s=0.02, retry_max_s=0.2, idle_replay_s=0.2)
# Surface an outage to the queue as an error within ~2 s instead of LanceDB's own minutes-long retries.
FAIL_FAST = dict(client_max_retries="1", client_retry_timeout="1", connect_timeout="1s", timeout="2s")


def spawn_host(**args) -> Reader:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return Reader(subprocess.Popen([sys.executable, HOST, json.dumps(args)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, bufsize=1, env=env))


def by_host_and_record(store, ids) -> dict:
    """{host: {record id: [n, ...] in stored order}}; raises on an entry stored twice."""
    out: dict = defaultdict(dict)
    for rid in ids:
        for e in store.get(rid).provenance:
            out[e["h"]].setdefault(str(rid), []).append(e["n"])
    return out


def assert_host_entries(store, ids, host, expected_n: set, *, exact: bool = True) -> int:
    """Host ``host``'s entries: each once, ascending per record, and (``exact``) all of ``expected_n``."""
    seen: list[int] = []
    for rid, ns in by_host_and_record(store, ids).get(host, {}).items():
        assert ns == sorted(ns), f"host {host}, record {rid}: order broken: {ns[:20]}"
        seen.extend(ns)
    assert len(seen) == len(set(seen)), f"host {host}: {len(seen) - len(set(seen))} duplicates"
    if exact:
        missing = expected_n - set(seen)
        assert not missing, f"host {host}: {len(missing)} missing, e.g. {sorted(missing)[:10]}"
        assert set(seen) <= expected_n
    return len(seen)


# -- the location: identity, redaction, bad input ----------------------------------------------------


def test_location_redacts_credentials_and_names_the_store_alike_everywhere(tmp_path):
    a = StoreLocation.parse("s3://AKIAKEY:s3cr3t@bucket/prefix/?X-Amz-Signature=zzz#frag")
    b = StoreLocation.parse("s3://bucket/prefix")
    assert a.display == b.display == "s3://bucket/prefix"
    assert a.identity == b.identity and len(a.identity) == 8
    assert "s3cr3t" not in repr((a.display, a.identity)) and "zzz" not in a.display
    assert StoreLocation.parse("s3://bucket/other").identity != b.identity
    assert StoreLocation.parse("gs://bucket/prefix").identity != b.identity
    assert not b.is_local and b.uri == "s3://bucket/prefix"
    local = StoreLocation.parse(tmp_path / "db")
    assert local.is_local and local.local_path == tmp_path / "db"
    assert StoreLocation.parse(f"file://{tmp_path}/db").identity == local.identity
    from iai_queue.spill import store_tag

    assert local.identity == store_tag(tmp_path / "db")  # local spill names keep their tag
    for bad, needle in [("http://host/x", "unsupported scheme 'http'"), ("s3:///prefix", "no bucket"), ("", "empty")]:
        with pytest.raises(ValueError, match=needle):
            StoreLocation.parse(bad)
    with pytest.raises(ValueError) as exc:
        StoreLocation.parse("ftp://user:hunter2@host/x")
    assert "hunter2" not in str(exc.value)


def test_storage_options_are_checked_at_the_boundary(s3_uri, s3_options):
    with pytest.raises(TypeError, match="aws_secret_access_key"):
        MemoryStore(s3_uri, dim=DIM, storage_options={**s3_options, "aws_secret_access_key": 123})
    with pytest.raises(TypeError, match="storage_options must be a mapping"):
        MemoryStore(s3_uri, dim=DIM, storage_options=["endpoint"])
    with pytest.raises(ValueError, match="maintenance='sometimes'"):
        MemoryStore(s3_uri, dim=DIM, storage_options=s3_options, maintenance="sometimes")


def test_env_store_accepts_a_uri(s3_uri, s3_options, monkeypatch):
    monkeypatch.setenv("IAI_QUEUE_STORE", s3_uri)
    store = MemoryStore(dim=DIM, storage_options=s3_options)
    assert store.path == store.location == s3_uri and not store.is_local
    assert store.identity == StoreLocation.parse(s3_uri).identity


# -- the seed contract on S3 -------------------------------------------------------------------------


def test_s3_store_same_api(s3_store, s3_uri, s3_options):
    recs = make_records(10)
    s3_store.insert_many(recs)
    s3_store.append_provenance_batch([(recs[0].id, {"i": 0}), (recs[0].id, {"i": 1})])
    got = s3_store.get(recs[0].id)
    assert got.text == recs[0].text and [e["i"] for e in got.provenance] == [0, 1]
    assert s3_store.search(recs[3].embedding, k=1)[0]["id"] == recs[3].id
    s3_store.maintain()
    other = MemoryStore(s3_uri, dim=DIM, storage_options=s3_options)  # a second host sees it all
    assert other.count() == 10 and other.provenance_rows() == 2
    assert [e["i"] for e in other.get(recs[0].id).provenance] == [0, 1]
    with pytest.raises(ValueError, match=r"holds 8-d embeddings, not dim=4"):
        MemoryStore(s3_uri, dim=4, storage_options=s3_options)


@pytest.mark.timeout(60)
def test_s3_enqueue_is_fast_flush_drains_order_kept(s3_store, spill_dir, caplog):
    recs = make_records(20)
    s3_store.insert_many(recs)
    caplog.set_level(logging.DEBUG, logger="iai_queue")
    worst = 0.0
    with ProvenanceWriteQueue(s3_store, coalesce_ms=20, spill_dir=spill_dir) as q:
        for i in range(600):
            t0 = time.perf_counter()
            q.enqueue([(recs[i % 20].id, {"i": i})])
            worst = max(worst, time.perf_counter() - t0)
        assert q.flush(30)
        assert q.stats().written == 600
    assert worst < 0.02, f"an enqueue took {worst * 1000:.1f} ms"
    for j, r in enumerate(recs):
        assert [e["i"] for e in s3_store.get(r.id).provenance] == list(range(j, 600, 20))
    assert s3_store.provenance_rows() == 600
    assert SECRET_KEY not in caplog.text


@pytest.mark.timeout(60)
def test_s3_spill_round_trip(s3_store, spill_dir):
    recs = make_records(5)
    s3_store.insert_many(recs)
    gate = Gate(s3_store)
    try:
        with ProvenanceWriteQueue(s3_store, max_queue_size=2, max_batch_pairs=4, coalesce_ms=1,
                                  spill_dir=spill_dir) as q:
            for i in range(100):
                q.enqueue([(recs[i % 5].id, {"i": i})])
            assert gate.entered.wait(10)
            wait_for(lambda: q.stats().spilled_pairs >= 50, 10, what="a spill")
            names = [p.name for p in spill_dir.iterdir()]
            assert names and not any(SECRET_KEY in n or "iai-queue-test" in n for n in names)
            gate.open()
            assert q.flush(30)
    finally:
        gate.open()
    for j, r in enumerate(recs):
        assert [e["i"] for e in s3_store.get(r.id).provenance] == list(range(j, 100, 5))
    assert s3_store.provenance_rows() == 100
    assert not pending_spill_files(spill_dir)


@pytest.mark.timeout(60)
def test_ambiguous_commit_failure_on_s3_is_retried_without_a_duplicate(s3_store, spill_dir):
    """The write lands, then the call fails (a timeout after the commit): the retry must not double it."""
    recs = make_records(4)
    s3_store.insert_many(recs)
    real = s3_store.append_provenance_batch
    failed = []

    def lands_then_fails(pairs, records_cache=None):
        real(pairs, records_cache=records_cache)
        if len(failed) < 3:
            failed.append(len(pairs))
            raise OSError("Generic S3 error: request timed out after the commit")

    s3_store.append_provenance_batch = lands_then_fails
    with ProvenanceWriteQueue(s3_store, spill_dir=spill_dir, **FAST) as q:
        for i in range(40):
            q.enqueue([(recs[i % 4].id, {"i": i})])
        assert q.flush(30)
        assert q.stats().store_errors == 3
    assert len(failed) == 3
    for j, r in enumerate(recs):
        assert [e["i"] for e in s3_store.get(r.id).provenance] == list(range(j, 40, 4))
    assert s3_store.provenance_rows() == 40


# -- many hosts ----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_four_host_processes_one_maintaining_every_entry_once(s3_server, s3_uri, s3_options, tmp_path):
    recs = make_records(12)
    MemoryStore(s3_uri, dim=DIM, storage_options=s3_options).insert_many(recs)
    ids = [str(r.id) for r in recs]
    hosts = []
    for h in range(4):
        hosts.append(spawn_host(uri=s3_uri, options=s3_options, spill_dir=str(tmp_path / f"spill{h}"), host=h,
                                ids=ids, duration_s=6, per_call=2, pause_s=0.01, opts=FAST,
                                maintain_every_s=0.5 if h == 0 else None))
    done = []
    try:
        for kid in hosts:
            kid.wait_event("started", 60)
        for kid in hosts:
            assert kid.finish(90) == 0, kid.stderr()
            done.append(kid.wait_event("done", 1))
    finally:
        for kid in hosts:
            if kid.proc.poll() is None:
                kid.proc.kill()
                kid.proc.wait()
    assert done[0]["maint_runs"] >= 1 and not done[0]["maint_errors"], json.dumps(done[0])
    store = MemoryStore(s3_uri, dim=DIM, storage_options=s3_options)
    total = 0
    for h, d in enumerate(done):
        assert d["flushed"] and d["dropped"] == 0 and d["written"] == d["accepted"] == d["n"], d
        total += assert_host_entries(store, [r.id for r in recs], h, set(range(d["n"])))
    print("entries per host", [d["n"] for d in done], "store errors", [d["store_errors"] for d in done])
    assert total == sum(d["n"] for d in done) > 1000
    assert store.provenance_rows() == total  # row count: no entry stored twice anywhere


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", [ProxyMode.REFUSE, ProxyMode.HANG])
def test_object_store_unreachable_for_3s_then_back(s3_server, s3_uri, s3_options, tmp_path, mode):
    recs = make_records(8)
    MemoryStore(s3_uri, dim=DIM, storage_options=s3_options).insert_many(recs)
    proxy = TcpProxy(s3_server.port)
    try:
        options = s3_server.storage_options(proxy.endpoint, **FAIL_FAST)
        stores = [MemoryStore(s3_uri, dim=DIM, storage_options=options) for _ in range(2)]
        queues = [ProvenanceWriteQueue(s, spill_dir=tmp_path / f"spill{h}", max_queue_size=16, max_batch_pairs=16,
                                       spill_file_pairs=64, **FAST).start() for h, s in enumerate(stores)]
        sent = [0, 0]
        stop = threading.Event()

        def host(h: int) -> None:
            while not stop.is_set():
                queues[h].enqueue([(recs[sent[h] % 8].id, {"h": h, "n": sent[h]})])
                sent[h] += 1
                time.sleep(0.002)

        threads = [threading.Thread(target=host, args=(h,), daemon=True) for h in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: all(q.stats().written > 20 for q in queues), 20, what="writes before the outage")
        proxy.set_mode(mode)
        time.sleep(3.0)  # the outage itself
        spilled = [q.stats().spilled_pairs for q in queues]
        proxy.set_mode(ProxyMode.PASS)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(5)
        for q in queues:
            assert q.flush(60), q.stats()
            q.stop(timeout=5)
        assert all(s > 0 for s in spilled), f"nothing spilled during the outage: {spilled}"
    finally:
        proxy.close()
    store = MemoryStore(s3_uri, dim=DIM, storage_options=s3_options)
    for h in range(2):
        st = queues[h].stats()
        assert st.dropped == 0 and st.accepted == sent[h] and st.written == sent[h], st
        assert assert_host_entries(store, [r.id for r in recs], h, set(range(sent[h]))) == sent[h]
        assert not pending_spill_files(tmp_path / f"spill{h}")
    assert store.provenance_rows() == sum(sent)


@pytest.mark.timeout(120)
def test_host_sigkilled_mid_commit_then_restarted_each_entry_once(s3_server, s3_uri, s3_options, tmp_path):
    recs = make_records(6)
    MemoryStore(s3_uri, dim=DIM, storage_options=s3_options).insert_many(recs)
    ids = [str(r.id) for r in recs]
    spill = tmp_path / "spill"
    proxy = TcpProxy(s3_server.port)
    try:
        options = s3_server.storage_options(proxy.endpoint, **FAIL_FAST)
        args = dict(uri=s3_uri, options=options, spill_dir=str(spill), host=0, ids=ids, per_call=2,
                    pause_s=0.001, report_commits=True,
                    opts=dict(FAST, max_queue_size=8, max_batch_pairs=16, spill_file_pairs=32))
        kid = spawn_host(**args)
        try:
            kid.wait_event("started", 60)
            wait_for(lambda: len(kid.of("commit")) >= 5, 20, what="commits before the outage")
            proxy.set_mode(ProxyMode.HANG)  # entries spill meanwhile
            wait_for(lambda: sum(len(e["ns"]) for e in kid.of("spilled")) >= 100, 20, what="a spill")
            proxy.set_mode(ProxyMode.PASS)
            commits = len(kid.of("commit"))
            wait_for(lambda: len(kid.of("commit")) > commits, 20, what="a commit after the outage")
            time.sleep(random.uniform(0.0, 0.03))  # within a commit (tens of ms of HTTP round trips)
        finally:
            os.kill(kid.proc.pid, signal.SIGKILL)
            kid.finish(10)
    finally:
        proxy.close()
    spilled = {n for ev in kid.of("spilled") for n in ev["ns"]}
    assert spilled
    # The restarted host: no new entries, only what the spill directory holds.
    again = spawn_host(**dict(args, options=s3_options, n=0, report_commits=False, drain_spill=True))
    assert again.finish(60) == 0, again.stderr()
    assert not pending_spill_files(spill), pending_spill_files(spill)
    store = MemoryStore(s3_uri, dim=DIM, storage_options=s3_options)
    landed = by_host_and_record(store, [r.id for r in recs]).get(0, {})
    all_landed = [n for ns in landed.values() for n in ns]
    for rid, ns in landed.items():
        assert ns == sorted(ns), f"record {rid}: order broken"
    assert len(all_landed) == len(set(all_landed)), "an entry landed twice"
    assert spilled <= set(all_landed), f"spilled but lost: {sorted(spilled - set(all_landed))[:10]}"
    assert store.provenance_rows() == len(all_landed)


# -- maintenance: who runs it --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_one_host_per_window_claims_maintenance_on_s3(s3_uri, s3_options):
    from iai_queue.maintenance import WindowMaintenanceLock

    stores = [MemoryStore(s3_uri, dim=DIM, storage_options=s3_options, maintenance="never") for _ in range(4)]
    now = [1_000_000.0]
    locks = [WindowMaintenanceLock(s._db, window_s=30, clock=lambda: now[0]) for s in stores]
    for window in range(5):  # several races: a create that loses still commits (as version 2)
        results: list = [None] * 4
        barrier = threading.Barrier(4)

        def claim(i):
            barrier.wait(10)
            results[i] = locks[i].acquire()

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sum(r is True for r in results) == 1, (window, results)
        winner = results.index(True)
        assert locks[winner].acquire()  # still its window
        assert not any(lk.acquire() for i, lk in enumerate(locks) if i != winner)
        now[0] += 30  # the next window: someone else may win it


@pytest.mark.timeout(60)
def test_background_maintenance_runs_by_rows_off_the_write_path(s3_uri, s3_options):
    from iai_queue.maintenance import MaintenancePolicy

    store = MemoryStore(s3_uri, dim=DIM, storage_options=s3_options,
                        maintenance=MaintenancePolicy(rows_threshold=200, idle_s=60, poll_s=0.1))
    recs = make_records(5)
    store.insert_many(recs)
    writes = []
    for i in range(20):
        t0 = time.perf_counter()
        store.append_provenance_batch([(recs[i % 5].id, {"i": i})] * 1)
        store.append_provenance_batch([(r.id, {"i": i, "b": k}) for k in range(3) for r in recs])
        writes.append(time.perf_counter() - t0)
    wait_for(lambda: store.maintenance_stats().runs >= 1, 30, what="a background run")
    st = store.maintenance_stats()
    assert st.failures == 0
    names = store._db.list_tables().tables
    assert any(n.startswith("_iai_queue_maintenance_") for n in names)
    assert any(idx.columns == ["record_id"] for idx in store._provenance.list_indices())
    assert store.provenance_rows() == 20 * 16
    store.close()


# -- the CLI against an s3:// store ----------------------------------------------------------------


def _option_args(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in ("--storage-option", f"{k}={v}")]


@pytest.mark.timeout(60)
def test_cli_spill_status_and_replay_with_an_s3_store(s3_store, s3_uri, s3_options, spill_dir, capsys):
    from iai_queue import cli

    recs = make_records(4)
    s3_store.insert_many(recs)
    gate = Gate(s3_store)  # the store never answers: stop() spills what is left
    q = ProvenanceWriteQueue(s3_store, spill_dir=spill_dir, exit_timeout=0.2, **FAST).start()
    for i in range(30):
        q.enqueue([(recs[i % 4].id, {"i": i})])
    assert gate.entered.wait(10)
    q.stop(timeout=0.5)
    gate.open()
    capsys.readouterr()
    assert cli.main(["spill", "status", "--json", "--dir", str(spill_dir)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["pending_entries"] >= 25  # the batch held by the gate may have landed after it opened

    argv = ["spill", "replay", "--store", s3_uri, "--dir", str(spill_dir), *_option_args(s3_options)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "replayed" in err and SECRET_KEY not in err + out
    for j, r in enumerate(recs):
        assert [e["i"] for e in s3_store.get(r.id).provenance] == list(range(j, 30, 4))
    assert s3_store.provenance_rows() == 30
    assert not pending_spill_files(spill_dir)

    # a prefix with no memory store in it: refused, never created
    missing = s3_uri + "-missing"
    assert cli.main(["spill", "replay", "--store", missing, "--dir", str(spill_dir), *_option_args(s3_options)]) == 1
    assert "is not a memory store" in capsys.readouterr().err


def test_cli_storage_option_usage_errors_exit_2(capsys):
    from iai_queue import cli

    for bad in ("novalue", "=x"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["spill", "replay", "--store", "s3://b/p", "--storage-option", bad])
        assert exc.value.code == 2
        assert "KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["bench", "--store", "http://host/x", "--records", "1"]) == 2
    assert "unsupported scheme" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_bench_runs_against_an_s3_store(s3_uri, s3_options, tmp_path, capsys):
    from iai_queue import cli

    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--records", "100", "--recalls", "10", "--rounds", "1", "--json", str(out),
                   "--store", s3_uri, *_option_args(s3_options)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["drain"]["ok"] and data["drain"]["rows_landed"] == 2 * 10 * 10
    assert data["store"].startswith(s3_uri + "/iai-queue-bench-")


def test_local_store_maintenance_lock_is_one_process_at_a_time(tmp_path):
    from iai_queue.maintenance import FlockMaintenanceLock

    MemoryStore(tmp_path / "db", dim=DIM)
    a, b = FlockMaintenanceLock(tmp_path / "db"), FlockMaintenanceLock(tmp_path / "db")
    assert a.acquire()
    assert not b.acquire()  # flock is per open file description: the same as another process
    a.release()
    assert b.acquire()
    b.release()


def _paced_commits(store: MemoryStore, rec_id, calls: int, every_s: float, **options) -> tuple[int, float]:
    """Enqueue one pair every ``every_s`` through ``store``'s queue; its commits until all landed, and its coalesce."""
    commits = []
    real_append = store.append_provenance_batch

    def counted(pairs, records_cache=None):  # wrapping the instance's method: the sanctioned seam
        commits.append(len(pairs))
        return real_append(pairs, records_cache)

    store.append_provenance_batch = counted
    q = store.enable_provenance_queue(**options)
    try:
        for i in range(calls):
            store.queue_provenance_batch([(rec_id, {"i": i})])
            time.sleep(every_s)  # the traffic's pace, not a wait for the queue
        assert wait_for(lambda: q.stats().written == calls, timeout=20)  # landed without a flush
        return len(commits), q.coalesce_s
    finally:
        store.disable_provenance_queue(timeout=20)


@pytest.mark.timeout(60)
def test_queue_on_an_object_store_commits_less_often(s3_store, tmp_path, monkeypatch):
    monkeypatch.delenv("IAI_QUEUE_COALESCE_MS", raising=False)
    rec = make_records(1)[0]
    s3_store.insert(rec)
    local = MemoryStore(tmp_path / "db", dim=DIM, maintenance="never")
    local.insert(rec)
    # 12 pairs over ~0.36 s: a 500 ms coalesce gathers them into one or two commits, 50 ms into many.
    s3_commits, s3_coalesce = _paced_commits(s3_store, rec.id, 12, 0.03, spill_dir=tmp_path / "s1")
    local_commits, local_coalesce = _paced_commits(local, rec.id, 12, 0.03, spill_dir=tmp_path / "s2")
    assert (s3_coalesce, local_coalesce) == (0.5, 0.05)
    assert s3_commits <= 2 < local_commits
    assert [e["i"] for e in s3_store.get(rec.id).provenance] == list(range(12))
    assert s3_store.provenance_rows() == 12
    # an explicit option, then the environment, win over the object-store default
    assert _paced_commits(s3_store, rec.id, 1, 0, spill_dir=tmp_path / "s3", coalesce_ms=20)[1] == 0.02
    monkeypatch.setenv("IAI_QUEUE_COALESCE_MS", "30")
    assert _paced_commits(s3_store, rec.id, 1, 0, spill_dir=tmp_path / "s4")[1] == 0.03
    assert s3_store.provenance_rows() == 14
