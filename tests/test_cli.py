"""Operator surface: ``iai-queue spill …``, ``stats()`` and the logging events."""

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from iai_queue import ProvenanceWriteQueue
from iai_queue.cli import main
from iai_queue.events import RateLimiter
from iai_queue.spill import SpillDirectory, encode_line, is_pending_name, store_tag

from conftest import DIM


# -- helpers --------------------------------------------------------------------------


def line(record, n, eid=None):
    return encode_line(record.id, {"n": n}, eid or f"test-{record.id}-{n}", False)


def spill_name(store_path, writer="w1x0dead", ts=1_700_000_000_000_000_000, n=1, suffix=".jsonl"):
    return f"{ts:019d}-{store_tag(store_path)}-{writer}-{n:06d}{suffix}"


def write(path: Path, *lines: bytes, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err


def entries(store, record):
    return store.get(record.id).provenance


class Events(logging.Handler):
    """Collects iai_queue log records; wait_for() blocks until one with that event arrives."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self.cond = threading.Condition()

    def emit(self, record):
        with self.cond:
            self.records.append(record)
            self.cond.notify_all()

    def wait_for(self, event, timeout=15.0):
        with self.cond:
            return self.cond.wait_for(lambda: any(getattr(r, "event", None) == event for r in self.records), timeout)


@pytest.fixture
def events():
    h = Events()
    lg = logging.getLogger("iai_queue")
    old = lg.level
    lg.setLevel(logging.DEBUG)
    lg.addHandler(h)
    yield h
    lg.removeHandler(h)
    lg.setLevel(old)


def of_event(caplog, name):
    return [r for r in caplog.records if getattr(r, "event", None) == name]


# -- spill status -----------------------------------------------------------------------


def test_status_of_a_missing_directory_is_an_empty_spill(capsys, tmp_path):
    code, out, err = run(capsys, "spill", "status", "--json", "--check", "--dir", str(tmp_path / "nope"))
    assert code == 0 and err == ""
    d = json.loads(out)
    assert d["exists"] is False
    assert (d["pending_files"], d["pending_entries"], d["quarantined_files"], d["bytes"]) == (0, 0, 0, 0)
    assert d["oldest_age_s"] is None
    assert not (tmp_path / "nope").exists()


def test_status_counts_every_kind_of_file(capsys, tmp_path, store, records):
    d = tmp_path / "spill"
    write(d / spill_name(store.path), line(records[0], 1), line(records[1], 2), b"\n", age_s=300)
    write(d / spill_name(store.path, n=2, suffix=".claimed"), line(records[2], 3))
    write(d / "legacy.jsonl", line(records[3], 4), age_s=10)
    write(d / "x.failed-1700000000.jsonl", line(records[4], 5), b"not json\n", b"{}\n")
    write(d / "x.failed-1700000000.reason", b"line 1: bad\n")
    write(d / f".{spill_name(store.path, writer='w2x0', n=3)}.tmp", line(records[5], 6))
    write(d / "notes.txt", b"ignored\n")

    code, out, err = run(capsys, "spill", "status", "--json", "--dir", str(d))
    assert code == 0
    s = json.loads(out)
    assert s["exists"] is True
    assert s["pending_files"] == 3 and s["claimed_files"] == 1
    assert s["pending_entries"] == 4  # blank lines do not count
    assert (s["quarantined_files"], s["quarantined_lines"]) == (1, 3)
    assert s["tmp_files"] == 1
    assert 300 <= s["oldest_age_s"] < 400
    sizes = [p.stat().st_size for p in d.iterdir() if p.name not in ("notes.txt", "x.failed-1700000000.reason")]
    assert s["bytes"] == sum(sizes)
    by_name = {f["name"]: f for f in s["files"]}
    assert by_name[spill_name(store.path)]["writer_alive"] is False
    assert by_name["legacy.jsonl"]["store"] is None

    code, out, _ = run(capsys, "spill", "status", "--dir", str(d))
    assert code == 0
    assert "3 files (1 claimed), 4 entries" in out
    assert "1 file, 3 lines" in out
    assert "x.failed-1700000000.jsonl" in out


def test_status_check_flags_quarantined_files(capsys, tmp_path, records):
    d = tmp_path / "spill"
    write(d / "ok.jsonl", line(records[0], 1))
    assert run(capsys, "spill", "status", "--check", "--dir", str(d))[0] == 0
    write(d / "x.failed-1700000000.jsonl", b"junk\n")
    code, out, err = run(capsys, "spill", "status", "--check", "--dir", str(d))
    assert code == 1
    assert "1 quarantined file" in err


def test_status_uses_the_default_directory(capsys, spill_dir, records, monkeypatch, tmp_path):
    write(spill_dir / "a.jsonl", line(records[0], 1))
    code, out, _ = run(capsys, "spill", "status", "--json")
    assert code == 0 and json.loads(out)["pending_files"] == 1
    monkeypatch.setenv("IAI_QUEUE_SPILL_DIR", str(tmp_path / "env-dir"))
    code, out, _ = run(capsys, "spill", "status", "--json")
    assert json.loads(out)["dir"] == str(tmp_path / "env-dir") and json.loads(out)["pending_files"] == 0


def test_status_of_a_file_is_a_clean_error(capsys, tmp_path):
    f = write(tmp_path / "plain", b"x")
    code, out, err = run(capsys, "spill", "status", "--dir", str(f))
    assert code == 1 and out == ""
    one_line_error(err)
    assert "not a directory" in err


def test_status_as_a_real_subprocess(tmp_path, records):
    d = tmp_path / "spill"
    write(d / "a.jsonl", line(records[0], 1), line(records[1], 2))
    env = {k: v for k, v in os.environ.items() if k != "IAI_QUEUE_SPILL_DIR"}
    proc = subprocess.run([sys.executable, "-m", "iai_queue", "spill", "status", "--json", "--dir", str(d)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert (s["pending_files"], s["pending_entries"]) == (1, 2)


# -- inspect ------------------------------------------------------------------------------


def test_inspect_judges_every_line(capsys, tmp_path, records):
    d = tmp_path / "spill"
    f = write(d / "x.failed-1700000000.jsonl", line(records[0], 1), b"not json\n", b"\n",
              b'{"id": "nope", "entry": {}}\n', b'{"id": "%s"}\n' % str(records[1].id).encode())
    write(d / "x.failed-1700000000.reason", b"line 2: not JSON\n")

    code, out, _ = run(capsys, "spill", "inspect", "--json", str(f))
    assert code == 1
    r = json.loads(out)
    assert [(x["line"], x["ok"]) for x in r["lines"]] == [(1, True), (2, False), (4, False), (5, False)]
    assert r["lines"][0]["record_id"] == str(records[0].id)
    assert "not JSON" in r["lines"][1]["problem"]
    assert "not a UUID" in r["lines"][2]["problem"]
    assert "'entry' missing" in r["lines"][3]["problem"]
    assert (r["ok_lines"], r["bad_lines"]) == (1, 3)
    assert r["recorded_reasons"] == ["line 2: not JSON"]

    # A bare name is looked up in --dir; the text form says the same.
    code, out, _ = run(capsys, "spill", "inspect", "--dir", str(d), f.name)
    assert code == 1
    assert "line 1: ok" in out and "line 2: BAD  not JSON" in out and "1 ok, 3 bad" in out


def test_inspect_of_a_good_file_exits_0(capsys, tmp_path, records):
    f = write(tmp_path / "a.jsonl", line(records[0], 1), line(records[1], 2))
    code, out, _ = run(capsys, "spill", "inspect", str(f))
    assert code == 0 and "2 ok, 0 bad" in out


def test_inspect_of_an_empty_file_is_bad(capsys, tmp_path):
    f = write(tmp_path / "a.jsonl")
    code, out, _ = run(capsys, "spill", "inspect", str(f))
    assert code == 1 and "empty file" in out


@pytest.mark.parametrize("target", ["missing.jsonl", "a-directory"])
def test_inspect_bad_paths_are_clean_errors(capsys, tmp_path, target):
    (tmp_path / "a-directory").mkdir()
    code, out, err = run(capsys, "spill", "inspect", str(tmp_path / target))
    assert code == 1 and out == ""
    one_line_error(err)


# -- requeue --------------------------------------------------------------------------------


def test_requeue_refuses_bad_lines_then_requeues_the_repaired_file(capsys, tmp_path, store, records):
    d = tmp_path / "spill"
    stem = spill_name(store.path, suffix="")
    f = write(d / f"{stem}.failed-1700000000.jsonl", line(records[0], 1), b"{broken\n")
    reason = write(d / f"{stem}.failed-1700000000.reason", b"line 2: not JSON\n")

    code, out, err = run(capsys, "spill", "requeue", str(f))
    assert code == 1
    one_line_error(err)
    assert "line 2" in err and "--force" in err
    assert f.exists() and reason.exists()

    write(f, line(records[0], 1), line(records[1], 2))  # the operator repairs line 2
    code, out, err = run(capsys, "spill", "requeue", "--dir", str(d), f.name)
    assert code == 0, err
    assert not f.exists() and not reason.exists()
    pending = [p.name for p in d.iterdir() if is_pending_name(p.name)]
    assert len(pending) == 1 and pending[0] in out
    # Pending for this store: a queue of this store replays it, one of another store does not.
    assert [n for n, _ in SpillDirectory(d, store_path=store.path).replayable()] == pending
    assert SpillDirectory(d, store_path=tmp_path / "other").replayable() == []

    code, _, err = run(capsys, "spill", "replay", "--store", str(store.path), "--dir", str(d))
    assert code == 0, err
    assert entries(store, records[0]) == [{"n": 1}] and entries(store, records[1]) == [{"n": 2}]


def test_requeue_force_and_unknown_store(capsys, tmp_path, records):
    d = tmp_path / "spill"
    f = write(d / "wabc-poison.failed-1700000000.jsonl", line(records[0], 1), b"junk\n")
    code, out, _ = run(capsys, "spill", "requeue", "--force", str(f))
    assert code == 0
    (new,) = [p.name for p in d.iterdir() if is_pending_name(p.name)]
    assert new.startswith("wabc-poison.requeued-") and new.endswith(".jsonl")


def test_requeue_refuses_a_file_that_is_not_quarantined(capsys, tmp_path, records):
    f = write(tmp_path / "a.jsonl", line(records[0], 1))
    code, _, err = run(capsys, "spill", "requeue", str(f))
    assert code == 1 and "not a quarantined file" in err
    assert f.exists()


# -- replay -----------------------------------------------------------------------------------


def test_replay_drains_into_the_store_and_leaves_live_writers_alone(capsys, tmp_path, store, records):
    d = tmp_path / "spill"
    write(d / spill_name(store.path, n=1), line(records[0], 1), line(records[1], 1))
    write(d / spill_name(store.path, n=2, suffix=".claimed"), line(records[0], 2))
    write(d / "legacy.jsonl", line(records[2], 1))
    other = write(d / spill_name(tmp_path / "other-store"), line(records[3], 1))
    live = write(d / spill_name(store.path, writer="w4242x0live"), line(records[4], 1))
    fd = os.open(d / ".writer-w4242x0live.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live queue in "another process" owns that file
    try:
        code, out, err = run(capsys, "spill", "replay", "--store", str(store.path), "--dir", str(d))
    finally:
        os.close(fd)
    assert code == 0, err
    assert "Traceback" not in err
    assert "live writer (pid 4242)" in err and "left to it" in err
    assert "other stores" in err
    assert "replayed 4 entries" in err
    assert entries(store, records[0]) == [{"n": 1}, {"n": 2}]
    assert entries(store, records[1]) == [{"n": 1}] and entries(store, records[2]) == [{"n": 1}]
    assert entries(store, records[4]) == [] and entries(store, records[3]) == []
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == sorted([other.name, live.name])


def test_replay_quarantines_bad_lines_and_exits_1(capsys, tmp_path, store, records):
    d = tmp_path / "spill"
    write(d / spill_name(store.path), line(records[0], 1), b"garbage\n")
    code, _, err = run(capsys, "spill", "replay", "--store", str(store.path), "--dir", str(d), "--dim", str(DIM))
    assert code == 1
    assert "1 line quarantined" in err
    assert entries(store, records[0]) == [{"n": 1}]
    code, out, _ = run(capsys, "spill", "status", "--json", "--dir", str(d))
    s = json.loads(out)
    assert (s["pending_files"], s["quarantined_files"], s["quarantined_lines"]) == (0, 1, 1)


def test_replay_with_nothing_to_do(capsys, tmp_path, store):
    code, _, err = run(capsys, "spill", "replay", "--store", str(store.path), "--dir", str(tmp_path / "none"))
    assert code == 0 and "nothing to replay" in err


def test_replay_gives_up_on_a_failing_store(capsys, tmp_path, store, records, monkeypatch):
    from iai_queue.store import MemoryStore

    def failing(self, pairs, records_cache=None):
        raise OSError("store is down")

    d = tmp_path / "spill"
    f = write(d / spill_name(store.path), line(records[0], 1))
    monkeypatch.setattr(MemoryStore, "append_provenance_batch", failing)
    code, _, err = run(capsys, "spill", "replay", "--store", str(store.path), "--dir", str(d), "--timeout", "0.5")
    assert code == 1
    assert "gave up" in err and "Traceback" not in err
    # Nothing lost: the file is still there (claimed, to be verified by the next replayer).
    assert [p.name for p in d.iterdir() if not p.name.startswith(".")] in ([f.name], [f.name[:-6] + ".claimed"])


def test_replay_rejects_what_is_not_a_store(capsys, tmp_path, store):
    plain = write(tmp_path / "plain", b"x")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = [
        (plain, "is a file"),
        (tmp_path / "missing", "does not exist"),
        (empty_dir, "not a memory store"),
    ]
    for path, message in cases:
        code, out, err = run(capsys, "spill", "replay", "--store", str(path), "--dir", str(tmp_path / "spill"))
        assert code == 1, path
        one_line_error(err)
        assert message in err
    assert not (tmp_path / "missing").exists()  # never created: entries replayed there would be skipped
    assert list(empty_dir.iterdir()) == []
    code, _, err = run(capsys, "spill", "replay", "--store", str(store.path), "--dim", "4")
    assert code == 1 and "dim=4" in err
    one_line_error(err)


# -- usage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--help"], ["spill", "--help"], ["spill", "status", "--help"], ["spill", "inspect", "--help"],
    ["spill", "replay", "--help"], ["spill", "requeue", "--help"], ["bench", "--help"],
])
def test_help_everywhere(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: iai-queue" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["spill"], ["spill", "status", "--bogus"], ["spill", "replay"],
                                  ["spill", "inspect"], ["spill", "replay", "--store", "x", "--dim", "eight"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# -- stats() and logging events ------------------------------------------------------------------


def test_stats_and_events_through_a_spill_and_its_replay(store, records, gate, spill_dir, events, caplog):
    caplog.set_level(logging.DEBUG, logger="iai_queue")
    q = ProvenanceWriteQueue(store, coalesce_ms=0, max_queue_size=4).start()
    try:
        q.enqueue([(records[0].id, {"n": 0})])
        assert gate.entered.wait(10)  # the worker is stuck writing pair 0
        for i in range(1, 20):
            q.enqueue([(records[i].id, {"n": i})])
        assert events.wait_for("spill")
        s = q.stats()
        assert s.accepted == 20 and s.written == 0
        assert s.spilled_files >= 1 and s.spilled_pairs >= 1
        gate.open()
        assert q.flush(timeout=20)
        s = q.stats()
        assert s.written == 20 and s.replayed == s.spilled_pairs >= 15
        assert (s.pending, s.dropped, s.quarantined_files, s.store_errors) == (0, 0, 0, 0)
    finally:
        gate.open()
        q.stop()
    assert [e["n"] for r in records for e in entries(store, r)] == list(range(20))
    spills, replays = of_event(caplog, "spill"), of_event(caplog, "replay")
    assert spills and replays
    assert sum(r.pairs for r in spills) == q.stats().spilled_pairs
    assert all(r.name == "iai_queue.queue" for r in spills + replays)


def test_stats_and_events_for_a_quarantine(store, records, spill_dir, events, caplog):
    caplog.set_level(logging.DEBUG, logger="iai_queue")
    write(spill_dir / "legacy.jsonl", line(records[0], 1), b"not json\n")
    q = ProvenanceWriteQueue(store).start()
    try:
        assert events.wait_for("replay")
        s = q.stats()
        assert (s.replayed, s.quarantined_files, s.quarantined_lines, s.dropped) == (1, 1, 1, 0)
    finally:
        q.stop()
    (rec,) = of_event(caplog, "quarantine")
    assert rec.levelno == logging.WARNING and rec.lines == 1 and "not JSON" in rec.reason
    assert (spill_dir / rec.file).exists()
    (rep,) = of_event(caplog, "replay")
    assert (rep.pairs, rep.bad_lines) == (1, 1)
    assert entries(store, records[0]) == [{"n": 1}]


def test_store_errors_retries_and_rate_limited_write_failed(store, records, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="iai_queue")
    real = store.append_provenance_batch
    calls = {"n": 0}

    def flaky(pairs, records_cache=None):
        calls["n"] += 1
        if calls["n"] <= 4:
            raise ConnectionError("store unavailable")
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = flaky
    q = ProvenanceWriteQueue(store, spill_dir=tmp_path / "spill", coalesce_ms=0, retry_initial_s=0.001,
                             retry_max_s=0.01).start()
    try:
        q.enqueue([(records[0].id, {"n": 1})])
        assert q.flush(timeout=20)
        s = q.stats()
    finally:
        q.stop()
    # four failed store calls: three tries of the pair, then the poison probe (a harmless write
    # that fails too: an outage, not poison); three backoff sleeps between them
    assert (s.store_errors, s.retries, s.written) == (4, 3, 1)
    assert (s.dropped, s.quarantined_files) == (0, 0)  # an outage quarantines nothing
    failed = of_event(caplog, "write.failed")
    assert len(failed) == 1  # four identical failures, one warning
    assert failed[0].levelno == logging.WARNING and "store unavailable" in failed[0].error
    assert len(of_event(caplog, "retry")) == 3


def test_rate_limiter_counts_what_it_suppressed(caplog):
    caplog.set_level(logging.DEBUG, logger="iai_queue")
    lg = logging.getLogger("iai_queue.test")
    limiter = RateLimiter(interval=3600)
    for _ in range(5):
        limiter.emit(lg, logging.WARNING, "write.failed", key="E", error="x")
    limiter.emit(lg, logging.WARNING, "write.failed", key="other", error="y")
    limiter.interval = 0
    limiter.emit(lg, logging.WARNING, "write.failed", key="E", error="x")
    recs = of_event(caplog, "write.failed")
    assert [(r.error, getattr(r, "suppressed", 0)) for r in recs] == [("x", 0), ("y", 0), ("x", 4)]


@pytest.mark.timeout(60)
def test_status_and_replay_list_an_unreadable_file_and_go_on(capsys, tmp_path, store, records):
    """A review's find: one directory, FIFO or symlink under a spill name made ``spill status`` and
    ``spill replay`` fail whole (the good file beside it was not replayed). Each is listed with why it
    cannot be read, and everything else goes on."""
    d = tmp_path / "spill"
    write(d / spill_name(store.path), line(records[0], 1))
    (d / "dir.jsonl").mkdir()
    os.mkfifo(d / "fifo.jsonl")
    os.symlink(d / "nowhere", d / "link.jsonl")
    code, out, err = run(capsys, "spill", "status", "--dir", str(d))
    assert code == 0, err
    assert "pending          1 file (0 claimed), 1 entry" in out
    assert "unreadable       3 files" in out
    assert "dir.jsonl  (not a regular file (d" in out and "fifo.jsonl  (not a regular file (p" in out
    assert "link.jsonl  (not a regular file (l" in out
    code, out, err = run(capsys, "spill", "status", "--dir", str(d), "--json")
    data = json.loads(out)
    assert (data["pending_files"], data["pending_entries"], data["unreadable_files"]) == (1, 1, 3)
    code, _, err = run(capsys, "spill", "replay", "--store", str(store.path), "--dir", str(d))
    assert code == 0, err
    assert "3 files cannot be read: left alone" in err
    assert entries(store, records[0]) == [{"n": 1}] and store.provenance_rows() == 1
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["dir.jsonl", "fifo.jsonl",
                                                                                 "link.jsonl"]


def test_requeue_refuses_set_aside_journal_bytes_even_with_force(capsys, tmp_path, store):
    """A review's find: ``requeue --force`` renamed a set-aside journal span (binary records) to a
    ``.jsonl`` spill file, and removed its reason."""
    d = tmp_path / "spill"
    stem = spill_name(store.path, suffix="")
    f = write(d / f"{stem}.failed-1763889999.wal", b"\x10\x00\x00\x00\xde\xad\xbe\xef torn journal bytes")
    reason = write(d / f"{stem}.failed-1763889999.reason", b"bytes 0..37 of a segment: checksum mismatch\n")
    for extra in ([], ["--force"]):
        code, out, err = run(capsys, "spill", "requeue", *extra, str(f))
        assert code == 1
        one_line_error(err)
        assert "set-aside journal bytes" in err and f"renaming it to {stem}.wal" in err
    assert f.exists() and reason.exists()
    assert sorted(p.name for p in d.iterdir()) == sorted([f.name, reason.name])


def test_replay_says_how_many_rows_it_added_when_some_entries_were_skipped(capsys, tmp_path, store, records):
    """A review's find: "replayed 3 entries" when one of them was for a record the store does not have
    (skipped, no row)."""
    from types import SimpleNamespace
    from uuid import uuid4

    d = tmp_path / "spill"
    write(d / spill_name(store.path), line(records[0], 1), line(SimpleNamespace(id=uuid4()), 2), line(records[1], 3))
    code, _, err = run(capsys, "spill", "replay", "--store", str(store.path), "--dir", str(d))
    assert code == 0, err
    assert "replayed 3 entries into" in err and ": 2 rows added (the rest are for records" in err
    assert store.provenance_rows() == 2


def test_status_lists_a_file_it_cannot_even_stat(tmp_path, monkeypatch, store, records):
    """An lstat that fails (EACCES; injected: the tests run as root) lists the file with the reason too."""
    import errno

    from iai_queue.spill import status

    d = tmp_path / "spill"
    bad = write(d / spill_name(store.path, n=1), line(records[0], 1))
    write(d / spill_name(store.path, n=2), line(records[0], 2))
    real = Path.lstat

    def lstat(self):
        if self.name == bad.name:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "lstat", lstat)
    files = {f.name: f for f in status(d).files}
    assert files[bad.name].problem == "cannot be read: Permission denied" and files[bad.name].entries == 0
    assert status(d).as_dict()["pending_entries"] == 1 and status(d).as_dict()["unreadable_files"] == 1
