"""Smoke tests of the benchmark harness: correctness of the figures' plumbing, never speed."""

import json
import subprocess
import sys
from pathlib import Path

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
