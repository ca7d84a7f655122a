"""Smoke tests of the benchmark harness: correctness of the figures' plumbing, never speed."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iai_queue import cli

ROOT = Path(__file__).resolve().parent.parent


def test_bench_harness_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--records", "200", "--recalls", "20", "--rounds", "2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["modes"]) == {"queued", "sync", "noop"}
    for mode in data["modes"].values():
        assert {"p50", "p99", "p99.9", "max", "n"} <= set(mode["enqueue_us"])
        assert {"p50", "p99", "n"} <= set(mode["recall_ms"])
        assert mode["recall_ms"]["n"] == 20
    d = data["drain"]
    assert d["queued_entries"] == 20 * 10
    assert d["drained_entries"] == d["queued_entries"] == d["accepted"]
    assert d["rows_landed"] == d["rows_expected"] == 2 * 20 * 10
    assert d["ok"] is True
    assert "queued" in capsys.readouterr().out


def test_bench_enqueue_script_tiny(tmp_path):
    out = tmp_path / "enqueue.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_enqueue.py"), "--calls", "400",
                           "--rounds", "2", "--records", "50", "--dim", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["queue"]["n"] == data["reference"]["n"] == 400
    assert data["queue_written"] == data["queue_accepted"]
    assert {"p50", "p99", "p99.9", "max"} <= set(data["ratio"])


def _peer_installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


PEER_MODULES = {"otel": "opentelemetry.sdk._shared_internal", "sentry": "sentry_sdk.worker",
                "pq_file": "persistqueue", "pq_sqlite": "persistqueue"}


def _run_script(name: str, args: list, cwd: Path, timeout: float = 90, prelude: str = "", env=None):
    """Runs a script of scripts/ in a fresh interpreter; ``prelude`` runs first (e.g. to hide a package)."""
    script = str(ROOT / "scripts" / name)
    code = f"import runpy, sys\n{prelude}\nsys.argv = {[script, *args]!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


@pytest.mark.timeout(120)
def test_bench_peers_script_tiny(tmp_path):
    out = tmp_path / "peers.json"
    calls, burst = 300, 64
    proc = _run_script("bench_peers.py", ["--calls", str(calls), "--rounds", "2", "--records", "50", "--dim", "8",
                                          "--json", str(out)], tmp_path, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    expected_keys = {"iai", "iai_str", "iai_journal", "otel", "simplequeue", "sentry", "pq_file", "pq_sqlite"}
    assert set(data["queues"]) | set(data["skipped"]) == expected_keys
    for key in expected_keys:
        installed = _peer_installed(PEER_MODULES[key]) if key in PEER_MODULES else True
        if not installed:
            assert data["skipped"][key] == "not installed"
            continue
        q = data["queues"][key]
        assert q["n"] == calls, key
        # every pair enqueued (warm-up included) was written by the worker and is a row in that queue's own store
        assert q["enqueued"] == q["written"] == q["rows"] == calls + 4 * burst, (key, q)
        assert q["ok"] is True and q["errors"] == []
        assert {"p50", "p99", "p99.9", "max"} <= set(q)
        assert set(data["iai_over"][key]) == {"p50", "p99", "p99.9", "max"}
        assert q["after_pause_p50"] > 0  # each burst's first call, reported apart
    assert data["iai_over"]["iai"]["p50"] == 1.0
    assert set(data["str_over_uuid"]) == {"p50", "p99", "p99.9"}
    assert {"p99_le_5us", "p99.9_le_25us", "str_ids_le_1.5x_uuid"} <= set(data["targets"])
    ran_pq = [k for k in ("pq_file", "pq_sqlite") if k in data["queues"]]
    assert set(data["journal_speedup"]) == set(ran_pq)
    assert {f"journal_p50_ge_100x_faster_than_{k}" for k in ran_pq} | {"journal_p50_le_2us"} <= set(data["targets"])
    assert data["targets"]["every_queue_wrote_everything"] is True
    assert "every_queue_wrote_everything: met" in proc.stdout
    assert isinstance(data["config"]["order_seed"], int) and f"order seed {data['config']['order_seed']}" in proc.stdout


@pytest.mark.timeout(60)
def test_bench_peers_reports_a_missing_peer_as_skipped(tmp_path):
    out = tmp_path / "peers.json"
    hide = "sys.modules['sentry_sdk'] = None; sys.modules['persistqueue'] = None  # as if not installed"
    proc = _run_script("bench_peers.py", ["--peers", "iai,sentry,pq_sqlite", "--calls", "100", "--rounds", "1",
                                          "--records", "20", "--dim", "8", "--json", str(out)], tmp_path, prelude=hide)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sentry-sdk BackgroundWorker.submit: skipped: not installed" in proc.stdout
    assert "persist-queue SQLiteAckQueue.put: skipped: not installed" in proc.stdout
    data = json.loads(out.read_text())
    assert data["skipped"] == {"sentry": "not installed", "pq_sqlite": "not installed"}
    assert set(data["queues"]) == {"iai"} and data["queues"]["iai"]["rows"] == 100 + 4 * 64
    assert "p50_le_1.0x_otel_emit" not in data["targets"]  # no target against a peer that did not run


def test_bench_peers_usage_error_is_one_line_before_any_work(tmp_path):
    tmp = tmp_path / "tmp"  # where the script would make its work directory
    tmp.mkdir()
    proc = _run_script("bench_peers.py", ["--peers", "iai,nope"], tmp_path, timeout=30,
                       env=dict(os.environ, TMPDIR=str(tmp)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0], proc.stderr
    assert list(tmp.iterdir()) == []


@pytest.mark.timeout(90)
def test_bench_drain_backlog_tiny(tmp_path):
    out = tmp_path / "drain.json"
    proc = _run_script("bench_drain_backlog.py", ["--entries", "3000", "--pairs", "10", "--rounds", "1",
                                                  "--records", "50", "--dim", "8", "--max-batch-pairs", "128",
                                                  "--backlog-batch-pairs", "128",
                                                  "--replay-batch-pairs", "1024", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    run = data["queue"]["runs"][0]
    assert run["landed"] == run["written"] == 3000 and run["ok"] is True
    assert run["largest_write"] <= 128 and run["writes"] >= 3000 // 128  # the batch bounds reached the queue
    assert data["raw"]["runs"][0]["landed"] == 3000 and data["raw"]["runs"][0]["writes"] == -(-3000 // 256)
    assert data["raw_large"]["runs"][0]["writes"] == 3  # 1024-row reference appends
    assert data["ok"] is True and "drain_ge_2x_raw_256_rows" in data["targets"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [[], ["--rusage", "--pause", "hash"]])
def test_bench_tail_script_tiny(tmp_path, extra):
    out = tmp_path / "tail.json"
    proc = _run_script("bench_tail.py", ["--calls", "400", "--rounds", "2", "--records", "20", "--dim", "8",
                                         "--modes", "memory,process", "--json", str(out), *extra],
                       tmp_path, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert [m["mode"] for m in data["modes"]] == ["memory", "process"]
    for m in data["modes"]:
        assert m["pause"] == ("hash" if extra else "sleep")
        assert m["calls"] == 400 and m["rows"] == m["expected_rows"] == 400 + 4 * 64  # the warm-up too: all written
        assert m["first_after_pause_p50"] > 0 and m["others"]["n"] == 400 - 2 * 4  # 200 calls a round: 4 first calls
        c = m["collections"]
        assert c["on_caller"] + c["on_other_threads"] == sum(c["by_generation"].values())
        assert sum(m["slowest_0.1pct"]["causes"].values()) == m["slowest_0.1pct"]["n"] == 1
        if extra:
            assert isinstance(m["calls_with_faults"], int) and isinstance(m["calls_with_switches"], int)
        else:
            assert m["calls_with_faults"] is None and "page fault" not in str(m["slowest_0.1pct"]["causes"])
    assert "first call of a burst" in proc.stdout


def test_bench_tail_usage_error_names_the_bad_mode(tmp_path):
    proc = _run_script("bench_tail.py", ["--modes", "memory,nope"], tmp_path, timeout=30)
    assert proc.returncode == 2 and "--modes 'memory,nope'" in proc.stderr
    proc = _run_script("bench_tail.py", ["--pause", "nap"], tmp_path, timeout=30)
    assert proc.returncode == 2 and "invalid choice: 'nap'" in proc.stderr


@pytest.mark.timeout(30)
def test_bench_tail_pauses_last_as_long_as_asked():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_tail import PAUSES
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    for kind, pause in PAUSES.items():
        t0 = time.perf_counter()
        pause(0.02)
        assert 0.02 <= time.perf_counter() - t0 < 1.0, kind


@pytest.mark.timeout(120)
def test_bench_alloc_script_tiny(tmp_path):
    out = tmp_path / "alloc.json"
    proc = _run_script("bench_alloc.py", ["--calls", "300", "--rounds", "1", "--records", "20", "--dim", "8",
                                          "--json", str(out)], tmp_path, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["rows"] == data["enqueued"] == 6 * 300 and data["errors"] == []  # 3 producers, idle and writing
    assert set(data["p50_us"]) == {"0 tuples", "1 tuple", "2 tuples"}
    assert all(v["worker_idle"] > 0 and v["worker_writing"] > 0 for v in data["p50_us"].values())
    proc = _run_script("bench_alloc.py", ["--calls", "0"], tmp_path, timeout=30)
    assert proc.returncode == 2 and "argument --calls: must be >= 1, got 0" in proc.stderr


def test_bench_tail_collection_hook_tells_this_thread_from_another():
    import gc
    import threading
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_tail import Collections
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    hook = Collections()
    other = threading.Thread(target=gc.collect, args=(0,))
    gc.callbacks.append(hook)
    try:
        gc.collect(0)
        other.start()
        other.join(10)
    finally:
        gc.callbacks.remove(hook)
    me = threading.get_ident()
    # Other threads of the test process may collect meanwhile too: look for ours by thread.
    (s1, e1, _, _), = [c for c in hook.done if c[3] == me][:1]
    (s2, e2, _, _), = [c for c in hook.done if c[3] == other.ident][:1]
    assert s1 <= e1 <= s2 <= e2
    assert hook.overlapping(s1, e1 + 1, me) == "this thread"
    assert hook.overlapping(s2, e2 + 1, me) == "another thread"
    assert hook.overlapping(e2 + 1, e2 + 2, me) is None
