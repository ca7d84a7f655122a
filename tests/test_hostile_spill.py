"""Issue 9, items 11-21: the spill directory under an operator, a hostile local user and a broken disk.

Real files, FIFOs, symlinks, killed writer processes and the operator CLI run as
a subprocess. A full or read-only filesystem is real where this machine lets the
test mount one (a 512 KiB tmpfs, a read-only bind mount); elsewhere the same test
runs with the ``OSError`` injected into ``os`` and the mounted variant skips.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import defaultdict
import pytest

from _loss_helpers import (FAST, FLUSH_S, SOON_S, FailWhile, Ledger, ReadOnlyBind, TimedEnqueuer, assert_verdict, drain,
                           events, file_mode, fill_filesystem, judge, run_cli, small_tmpfs, stop_quietly,
                           unblock_fifos)
from _proc_helpers import ROOT, failed_files, orphan_name, pending_spill_files, spill_line, wait_for
from conftest import Gate
from iai_queue import ProvenanceWriteQueue
from iai_queue import cli
from iai_queue.spill import inspect_file, store_tag


def _spill_some(store, spill_dir, rid, n: int = 6, **opts):
    """A started queue whose store holds the first batch; ``n`` more entries are spilled. Returns (q, gate)."""
    gate = Gate(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=1, spill_file_pairs=2,
                             **{**FAST, **opts}).start()
    q.enqueue([(rid, {"t": "fill", "n": -2})])
    assert gate.entered.wait(5)
    q.enqueue([(rid, {"t": "fill", "n": -1})])
    for k in range(n):
        q.enqueue([(rid, {"t": "s", "n": k})])
    wait_for(lambda: q.stats().spill_buffered == 0, 10, what="the spill")
    return q, gate


def _holds_for(cond, seconds: float) -> bool:
    """True when ``cond`` stays true for ``seconds`` (for what must NOT happen: nothing to wait for)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not cond():
            return False
        time.sleep(0.02)
    return cond()


# -- item 11: modes of what we create ------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_item11_created_dirs_are_0700_and_files_0600_whatever_the_umask(store, records, spill_dir, _isolated_home):
    old_umask = os.umask(0)
    q = gate = None
    try:
        assert not (_isolated_home / ".iai-mcp").exists()
        q, gate = _spill_some(store, spill_dir, records[0].id)
        assert q.spill_dir == spill_dir  # the default location
        assert file_mode(_isolated_home / ".iai-mcp") == 0o700
        assert file_mode(spill_dir) == 0o700
        files = [p for p in spill_dir.iterdir() if stat.S_ISREG(os.lstat(p).st_mode)]
        assert any(p.name.endswith(".jsonl") for p in files) and any(p.name.endswith(".lock") for p in files)
        modes = {p.name: oct(file_mode(p)) for p in files}
        assert all(m == oct(0o600) for m in modes.values()), modes
    finally:
        os.umask(old_umask)
        if gate is not None:
            gate.open()
        if q is not None:
            stop_quietly(q, 2)


# -- item 12: a pre-existing, too open spill directory ------------------------------------------------

@pytest.mark.timeout(30)
def test_item12_world_writable_dir_of_ours_is_tightened_with_a_warning(store, records, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="iai_queue")
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    os.chmod(spill_dir, 0o777)
    q, gate = _spill_some(store, spill_dir, records[0].id)
    try:
        assert file_mode(spill_dir) == 0o700
        warned = events(caplog, "spill.dir_tightened")
        assert warned and all(r.levelno == logging.WARNING for r in warned)
        gate.open()
        assert q.flush(FLUSH_S)
        assert [e["n"] for e in store.get(records[0].id).provenance] == [-2, -1, 0, 1, 2, 3, 4, 5]
    finally:
        gate.open()
        stop_quietly(q, 2)


@pytest.mark.timeout(30)
def test_item12_dir_owned_by_another_user_is_refused_and_nothing_is_lost(store, records, tmp_path, caplog):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    caplog.set_level(logging.WARNING, logger="iai_queue")
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    os.chown(spill_dir, 65534, 65534)
    os.chmod(spill_dir, 0o777)
    rid = records[0].id
    gate = Gate(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=1, max_memory_pairs=50, **FAST).start()
    try:
        q.enqueue([(rid, {"n": -2})])
        assert gate.entered.wait(5)
        for k in range(-1, 10):
            q.enqueue([(rid, {"n": k})])
        wait_for(lambda: events(caplog, "spill.failed"), SOON_S, what="spill.failed to be logged")
        s = q.stats()
        assert s.dropped == 0 and s.spill_buffered > 0, s
        assert not [n for n in os.listdir(spill_dir)], "wrote into a directory another user owns"
        os.chown(spill_dir, os.geteuid(), os.getegid())  # the operator fixes it
        os.chmod(spill_dir, 0o700)
        wait_for(lambda: q.stats().spill_buffered == 0, 10, what="the spill to succeed once the dir is fixed")
        gate.open()
        assert q.flush(FLUSH_S)
        assert [e["n"] for e in store.get(rid).provenance] == list(range(-2, 10))
        assert store.provenance_rows() == 12
    finally:
        gate.open()
        stop_quietly(q, 2)


# -- item 13: a FIFO -------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_item13_fifo_named_jsonl_never_hangs_replay(store, records, spill_dir):
    rid = records[0].id
    spill_dir.mkdir(parents=True)
    (spill_dir / orphan_name(store.path, 1)).write_bytes(spill_line(rid, {"t": "a", "n": 0}, eid="a-0"))
    os.mkfifo(spill_dir / "x.jsonl")
    (spill_dir / "y.jsonl").write_bytes(spill_line(rid, {"t": "a", "n": 1}, eid="a-1"))  # behind the FIFO
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not (spill_dir / "y.jsonl").exists() and not (spill_dir / "y.claimed").exists(), SOON_S,
                 what="the file behind the FIFO to replay")
        q.enqueue([(rid, {"t": "a", "n": 2})])
        assert q.flush(FLUSH_S) is True
        assert [e["n"] for e in store.get(rid).provenance] == [0, 1, 2]
        assert stat.S_ISFIFO(os.lstat(spill_dir / "x.jsonl").st_mode), "the FIFO was not left alone"
    finally:
        unblock_fifos(spill_dir)  # a worker stuck in open() gets EOF
        stop_quietly(q)


# -- item 14: a symlink ------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_item14_symlink_named_jsonl_is_never_followed(store, records, spill_dir, tmp_path):
    rid = records[0].id
    outside = tmp_path / "elsewhere" / "secrets.jsonl"
    outside.parent.mkdir()
    content = (spill_line(rid, {"t": "secret", "n": 0}, eid="secret-0")
               + b"SECRET-MARKER this line is not JSON\n"
               + spill_line(records[1].id, {"t": "secret", "n": 1}, eid="secret-1"))
    outside.write_bytes(content)
    before = os.stat(outside)
    spill_dir.mkdir(parents=True)
    os.symlink(outside, spill_dir / "z.jsonl")
    (spill_dir / "zz.jsonl").write_bytes(spill_line(rid, {"t": "ok", "n": 0}, eid="ok-0"))  # sorts after z
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: any(e["t"] == "ok" for e in store.get(rid).provenance), 5, what="zz.jsonl to replay")
        assert q.flush(FLUSH_S)
    finally:
        stop_quietly(q, 2)
    assert outside.read_bytes() == content and os.stat(outside).st_mtime_ns == before.st_mtime_ns
    for r in records[:2]:
        assert not [e for e in store.get(r.id).provenance if e["t"] == "secret"], "the symlink was followed"
    assert store.provenance_rows() == 1
    for p in spill_dir.iterdir():
        if stat.S_ISREG(os.lstat(p).st_mode):
            assert b"SECRET-MARKER" not in p.read_bytes(), f"{p.name} holds a copy of the outside file"


# -- item 15: a read-only spill directory while the store comes back --------------------------------------

@pytest.mark.timeout(40)
@pytest.mark.parametrize("how", ["read_only_mount", "injected_erofs"])
def test_item15_erofs_on_claim_is_counted_retried_and_replays_later(store, records, tmp_path, monkeypatch, how):
    spill_dir = tmp_path / "spill"
    ro = ReadOnlyBind(spill_dir)
    if how == "read_only_mount" and not ReadOnlyBind.available(tmp_path / "probe"):
        pytest.skip("cannot bind-mount here (needs root): the injected variant covers this")
    fail = FailWhile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=2, max_batch_pairs=4, spill_file_pairs=4,
                             **FAST).start()
    ledger = Ledger()
    read_only = threading.Event()
    real_rename = os.rename
    try:
        for k in range(20):
            pairs = [(records[k % 4].id, {"t": "e", "n": k})]
            q.enqueue(pairs)
            ledger.accept(pairs)
        wait_for(lambda: q.stats().spill_buffered == 0 and q.stats().spilled_files >= 2, 10, what="spill files")
        assert q.stats().spill_errors == 0
        if how == "read_only_mount":
            ro.set_read_only()
        else:
            def rename(src, dst, *a, **kw):
                if read_only.is_set():
                    raise OSError(errno.EROFS, "Read-only file system", str(src))
                return real_rename(src, dst, *a, **kw)

            monkeypatch.setattr(os, "rename", rename)
            read_only.set()
        fail.failing.clear()  # the store comes back: the worker writes memory, then tries the spill files
        wait_for(lambda: q.stats().spill_errors >= 1, SOON_S, what="the failed claim to be counted in spill_errors")
        read_only.clear()
        ro.set_writable()
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the files to replay once writable")
        assert q.flush(FLUSH_S) is True
        assert_verdict(judge(store, [r.id for r in records[:4]], ledger))
    finally:
        read_only.clear()
        ro.set_writable()
        fail.failing.clear()
        stop_quietly(q, 2)


def _spill_files_of_20(store, records, spill_dir):
    """A started queue (store down) with 20 entries over 4 records spilled into at least 3 files."""
    fail = FailWhile(store)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=2, max_batch_pairs=4, spill_file_pairs=4,
                             **FAST).start()
    ledger = Ledger()
    for k in range(20):
        pairs = [(records[k % 4].id, {"t": "e", "n": k})]
        q.enqueue(pairs)
        ledger.accept(pairs)
    wait_for(lambda: q.stats().spill_buffered == 0 and len(pending_spill_files(spill_dir)) >= 3, 10,
             what="spill files")
    return q, fail, ledger, sorted(pending_spill_files(spill_dir))


@pytest.mark.timeout(60)
def test_a_file_that_cannot_be_claimed_holds_back_the_younger_files(store, records, spill_dir, monkeypatch):
    q, fail, ledger, files = _spill_files_of_20(store, records, spill_dir)
    oldest = files[0]
    refused = []
    real_rename = os.rename

    def rename(src, dst, *a, **kw):  # the oldest file's claim fails three times (EIO), the others work
        if os.path.basename(str(src)) == oldest and str(dst).endswith(".claimed") and len(refused) < 3:
            refused.append(oldest)
            raise OSError(errno.EIO, "Input/output error", str(src))
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    try:
        fail.failing.clear()
        wait_for(lambda: not pending_spill_files(spill_dir), 15, what="every file replayed")
        assert q.flush(FLUSH_S) is True
        assert len(refused) == 3
        assert q.stats().spill_errors >= 3
        assert_verdict(judge(store, [r.id for r in records[:4]], ledger))
    finally:
        fail.failing.clear()
        stop_quietly(q, 2)


@pytest.mark.timeout(60)
def test_a_file_unreadable_again_and_again_is_set_aside_and_the_rest_replays(store, records, spill_dir,
                                                                               monkeypatch, _isolated_home):
    from iai_queue.writebehind import replay
    from iai_queue.writebehind.file_retries import UNREADABLE_SET_ASIDE_AFTER

    q, fail, ledger, files = _spill_files_of_20(store, records, spill_dir)
    stem = files[0].split(".")[0]
    real_parse = replay.parse_file
    reads = []

    def parse_file(path, original_stem):
        if original_stem == stem:
            reads.append(path.name)
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_parse(path, original_stem)

    monkeypatch.setattr(replay, "parse_file", parse_file)
    try:
        fail.failing.clear()
        wait_for(lambda: not pending_spill_files(spill_dir), 20, what="the unreadable file set aside, the rest replayed")
        assert q.flush(FLUSH_S) is True
        assert len(reads) == UNREADABLE_SET_ASIDE_AFTER
        (aside,) = failed_files(spill_dir)
        assert aside.name.startswith(stem + ".failed-")
        assert "unreadable 5 times in a row" in aside.with_suffix(".reason").read_text()
        assert q.stats().quarantined_files == 1
        held_back = {json.loads(line)["entry"]["n"] for line in aside.read_text().splitlines()}
        assert held_back and len(held_back) <= 4
        v = judge(store, [r.id for r in records[:4]], ledger)
        assert (v.lost, v.doubled, v.duplicate_rows, v.unexpected) == (len(held_back), 0, 0, 0), v

        monkeypatch.setattr(replay, "parse_file", real_parse)  # the disk is readable again: the operator requeues
        r = run_cli("spill", "requeue", "--dir", str(spill_dir), "--force", aside.name, env_home=_isolated_home)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not pending_spill_files(spill_dir), 15, what="the requeued file replayed")
        assert q.flush(FLUSH_S) is True
        v = judge(store, [r.id for r in records[:4]], ledger)
        assert (v.landed, v.lost, v.doubled, v.duplicate_rows, v.unexpected) == (20, 0, 0, 0, 0), v
    finally:
        fail.failing.clear()
        stop_quietly(q, 2)


# -- item 16: the spill directory removed while the queue runs ----------------------------------------------

@pytest.mark.timeout(60)
def test_item16_removed_dir_is_recreated_with_the_live_writers_lock(store, records, spill_dir, _isolated_home):
    rid = records[0].id
    q, gate = _spill_some(store, spill_dir, rid, n=4)
    try:
        shutil.rmtree(spill_dir)  # the operator's rm -rf
        for k in range(10, 16):
            q.enqueue([(rid, {"t": "s", "n": k})])
        wait_for(lambda: q.stats().spill_buffered == 0 and pending_spill_files(spill_dir), 10, what="a new spill")
        ours = sorted(pending_spill_files(spill_dir))

        r = run_cli("spill", "status", "--json", "--dir", str(spill_dir), env_home=_isolated_home)
        assert r.returncode == 0, r.stderr
        files = [f for f in json.loads(r.stdout)["files"] if f["state"] == "pending"]
        assert files and all(f["writer_alive"] is True for f in files), [(f["name"], f["writer_alive"]) for f in files]

        r = run_cli("spill", "replay", "--store", str(store.path), "--dir", str(spill_dir), "--timeout", "10",
                    env_home=_isolated_home)
        assert r.returncode == 0, r.stderr
        assert sorted(pending_spill_files(spill_dir)) == ours, "replay took a live writer's files"
        assert [e["n"] for e in store.get(rid).provenance] == [], "entries landed ahead of the held batch"

        gate.open()
        wait_for(lambda: [e["n"] for e in store.get(rid).provenance][-1:] == [15], 10, what="the queue's own replay")
        assert [e["n"] for e in store.get(rid).provenance] == [-2, -1] + list(range(10, 16))
        assert store.provenance_rows() == 8
    finally:
        gate.open()
        stop_quietly(q, 2)


# -- item 17: order must not depend on clocks ----------------------------------------------------------------

@pytest.mark.timeout(30)
def test_item17_earlier_process_files_named_in_the_future_replay_first(store, records, spill_dir):
    ids = [r.id for r in records[:4]]
    spill_dir.mkdir(parents=True)
    future = time.time_ns() + 3600 * 10**9  # the earlier process's clock was an hour ahead
    expected: dict = defaultdict(list)
    k = 0
    for f in range(3):
        lines = []
        for _ in range(10):
            rid = ids[k % 4]
            lines.append(spill_line(rid, {"t": "old", "n": k}, eid=f"old-{k}"))
            expected[str(rid)].append(("old", k))
            k += 1
        (spill_dir / orphan_name(store.path, f + 1, writer="wearlier", ts=future + f)).write_bytes(b"".join(lines))
    # Another process is replaying the directory right now: hold its replay lock for a moment.
    lock_fd = os.open(spill_dir / ".replay.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, spill_file_pairs=5, **FAST).start()
    try:
        for n in range(20):
            rid = ids[n % 4]
            q.enqueue([(rid, {"t": "new", "n": n})])
            expected[str(rid)].append(("new", n))
        wait_for(lambda: q.stats().spill_buffered == 0, 10, what="the new entries to be accepted")
        q.flush(1.0)  # time for a wrong replay to happen; a right one waits for the old files
        os.close(lock_fd)
        lock_fd = None
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="every file to replay")
        assert q.flush(FLUSH_S)
        for rid in ids:
            got = [(e["t"], e["n"]) for e in store.get(rid).provenance]
            assert got == expected[str(rid)], f"record {rid}: {got}"
        assert store.provenance_rows() == 50
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        stop_quietly(q, 2)


# -- item 18: a dead writer's .tmp -------------------------------------------------------------------------

_KILLED_WRITER = """
import json, signal, sys
from iai_queue.spill import SpillDirectory
sd = SpillDirectory(sys.argv[1], store_path=sys.argv[2])
lines = [x.encode() + b"\\n" for x in json.loads(sys.argv[3])]
def hang(name):
    print(name, flush=True)   # written and fsynced, not yet renamed: killed right here
    signal.pause()
sd.write(lines, on_named=hang)
"""


@pytest.mark.timeout(40)
def test_item18_killed_writers_tmp_replays_at_once_and_first(store, records, spill_dir):
    ids = [r.id for r in records[:4]]
    spill_dir.mkdir(parents=True)
    expected: dict = defaultdict(list)
    lines = []
    for k in range(12):
        lines.append(spill_line(ids[k % 4], {"t": "tmp", "n": k}, eid=f"tmp-{k}").decode().rstrip("\n"))
        expected[str(ids[k % 4])].append(("tmp", k))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(spill_dir), str(store.path),
                              json.dumps(lines)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        name = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert name, "the writer never got to its rename"
    tmp = spill_dir / f".{name}.tmp"
    assert tmp.exists()
    os.utime(tmp)  # killed just now
    newer_ts = int(name.split("-")[0]) + 1000
    newer = []
    for k in range(12, 20):
        newer.append(spill_line(ids[k % 4], {"t": "new", "n": k}, eid=f"new-{k}"))
        expected[str(ids[k % 4])].append(("new", k))
    (spill_dir / orphan_name(store.path, 1, writer="wnewer", ts=newer_ts)).write_bytes(b"".join(newer))

    t0 = time.monotonic()
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 6, what="the tmp and the newer file to replay")
        took = time.monotonic() - t0
        for rid in ids:
            got = [(e["t"], e["n"]) for e in store.get(rid).provenance]
            assert got == expected[str(rid)], f"record {rid}: {got}"
        assert store.provenance_rows() == 20
        assert took < 1.5, f"the dead writer's tmp waited {took:.1f}s"
    finally:
        stop_quietly(q, 2)


@pytest.mark.timeout(30)
def test_item18_empty_dead_tmp_is_removed_not_quarantined(store, records, spill_dir, capsys):
    spill_dir.mkdir(parents=True)
    tmp = spill_dir / ("." + orphan_name(store.path, 1, writer="wkilled") + ".tmp")
    tmp.write_bytes(b"")  # its writer was killed between open() and its first write
    (spill_dir / orphan_name(store.path, 2, writer="wother")).write_bytes(
        spill_line(records[0].id, {"t": "a", "n": 0}, eid="a-0"))
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not tmp.exists() and not pending_spill_files(spill_dir), 1.5,
                 what="the empty dead tmp to be removed at once")
        assert q.flush(FLUSH_S)
    finally:
        stop_quietly(q, 2)
    assert not failed_files(spill_dir), [p.name for p in failed_files(spill_dir)]
    assert q.stats().quarantined_files == 0
    assert cli.main(["spill", "status", "--check", "--dir", str(spill_dir)]) == 0, capsys.readouterr().err
    assert [e["n"] for e in store.get(records[0].id).provenance] == [0]


@pytest.mark.timeout(30)
def test_item18_dead_writer_with_this_processs_pid_is_still_dead(store, records, spill_dir):
    # A container restarts its server with the same pid: a dead writer's name then carries our pid.
    # Only writer names this process made count as ours, so its tmp is recovered and replayed.
    spill_dir.mkdir(parents=True)
    writer = f"w{os.getpid()}xdeadbeef"
    tmp = spill_dir / ("." + orphan_name(store.path, 1, writer=writer) + ".tmp")
    tmp.write_bytes(spill_line(records[0].id, {"n": 0}, eid="reused-0") + spill_line(records[0].id, {"n": 1}, eid="reused-1"))
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not tmp.exists() and not pending_spill_files(spill_dir), 5,
                 what="the dead writer's tmp to be recovered and replayed")
        q.enqueue([(records[0].id, {"n": 2})])
        assert q.flush(FLUSH_S)
    finally:
        stop_quietly(q, 2)
    assert [e["n"] for e in store.get(records[0].id).provenance] == [0, 1, 2]
    assert store.provenance_rows() == 3


# -- item 19: quarantine files carry the store tag ------------------------------------------------------------

@pytest.mark.timeout(40)
@pytest.mark.parametrize("kind", ["poison", "unencodable"])
def test_item19_requeued_file_replays_only_into_its_store(store, records, spill_dir, tmp_path, capsys, kind):
    from iai_queue import MemoryStore

    rid = records[0].id
    real = store.append_provenance_batch

    def picky(pairs, records_cache=None):
        if any(e.get("poison") for _, e in pairs):
            raise ValueError("poison pill rejected by the store")
        return real(pairs, records_cache=records_cache)

    if kind == "poison":
        store.append_provenance_batch = picky
        bad = {"t": "bad", "n": 1, "poison": True}
    else:
        bad = {"t": "bad", "n": 1, "v": {"a set"}}
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        q.enqueue([(rid, {"t": "g", "n": 0}), (rid, bad), (rid, {"t": "g", "n": 2})])
        wait_for(lambda: failed_files(spill_dir), 5, what="the quarantine")
        assert q.flush(FLUSH_S)
    finally:
        stop_quietly(q, 2)
        store.append_provenance_batch = real
    (quarantined,) = failed_files(spill_dir)
    tag = store_tag(store.path)
    quarantined_name = quarantined.name

    args = ["spill", "requeue", quarantined.name, "--dir", str(spill_dir)] + (["--force"] if kind != "poison" else [])
    assert cli.main(args) == 0, capsys.readouterr().err
    (requeued,) = pending_spill_files(spill_dir)
    assert tag in requeued, requeued

    other = MemoryStore(tmp_path / "other-db", dim=8)  # another store sharing the spill directory
    q_other = ProvenanceWriteQueue(other, spill_dir=spill_dir, **FAST).start()
    try:
        assert _holds_for(lambda: (spill_dir / requeued).exists(), 1.0), "another store's queue took the file"
    finally:
        stop_quietly(q_other, 2)
    q_own = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not (spill_dir / requeued).exists(), SOON_S, what="its own store's queue to replay it")
        assert q_own.flush(FLUSH_S)
    finally:
        stop_quietly(q_own, 2)
    if kind == "poison":
        assert [e["n"] for e in store.get(rid).provenance] == [0, 2, 1]
    assert tag in quarantined_name, f"{quarantined_name} does not name its store ({tag})"


# -- item 20: drops on a full disk are rate-limited ------------------------------------------------------------

@pytest.mark.timeout(40)
@pytest.mark.parametrize("how", ["full_tmpfs", "injected_enospc"])
def test_item20_drop_errors_on_a_full_disk_are_rate_limited(store, records, tmp_path, caplog, monkeypatch, how):
    caplog.set_level(logging.ERROR, logger="iai_queue")
    if how == "full_tmpfs":
        ctx = small_tmpfs(tmp_path / "small")
    else:
        from contextlib import nullcontext

        ctx = nullcontext(tmp_path / "disk")
        (tmp_path / "disk").mkdir()
    with ctx as root:
        spill_dir = root / "spill"
        spill_dir.mkdir()
        if how == "full_tmpfs":
            fill_filesystem(root)
        else:
            real_open = os.open

            def full_open(path, flags, *a, **kw):
                if str(path).endswith(".jsonl.tmp"):
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                return real_open(path, flags, *a, **kw)

            monkeypatch.setattr(os, "open", full_open)
        gate = Gate(store)
        q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=2, max_memory_pairs=4, **FAST).start()
        try:
            q.enqueue([(records[0].id, {"n": -1})])
            assert gate.entered.wait(5)
            calls = [[(records[k % 20].id, {"n": k})] for k in range(400)]
            TimedEnqueuer(q.enqueue, calls).start().wait(20)
            dropped = q.stats().dropped
            assert dropped >= 350, q.stats()
            drops = events(caplog, "drop")
            assert 1 <= len(drops) <= 5, f"{len(drops)} drop ERROR lines for {dropped} dropped entries"
            assert sum(getattr(r, "count", 0) + getattr(r, "suppressed", 0) for r in drops) <= dropped
        finally:
            gate.open()
            if how != "full_tmpfs":
                monkeypatch.setattr(os, "open", real_open)
            stop_quietly(q)


# -- item 21: stale writer locks, line numbers, counts ----------------------------------------------------------

@pytest.mark.timeout(40)
def test_item21_stale_writer_locks_do_not_pile_up(store, records, spill_dir):
    fail = FailWhile(store)
    ledger = Ledger()
    k = 0
    for _ in range(5):
        q = ProvenanceWriteQueue(store, spill_dir=spill_dir, max_queue_size=2, spill_file_pairs=4, **FAST).start()
        for _ in range(8):
            pairs = [(records[k % 4].id, {"t": "e", "n": k})]
            q.enqueue(pairs)
            ledger.accept(pairs)
            k += 1
        wait_for(lambda: q.stats().spill_buffered == 0, 10, what="the spill")
        q.stop(timeout=0.2)
    fail.failing.clear()
    drain(store, spill_dir)
    cli.main(["spill", "status", "--json", "--dir", str(spill_dir)])
    locks = [n for n in os.listdir(spill_dir) if n.startswith(".writer-") and n.endswith(".lock")]
    assert len(locks) <= 1, locks
    assert_verdict(judge(store, [r.id for r in records[:4]], ledger))


@pytest.mark.timeout(30)
def test_item21_inspect_and_reason_file_number_lines_the_same(store, records, spill_dir):
    rid = records[0].id
    spill_dir.mkdir(parents=True)
    bad_a = b"{not json at all\n"
    bad_b = b'{"id": "nope", "entry": {}}\n'
    data = (spill_line(rid, {"n": 0}, eid="g-0") + b"\n" + bad_a + spill_line(rid, {"n": 1}, eid="g-1")
            + b"\n\n" + bad_b + spill_line(rid, {"n": 2}, eid="g-2"))
    (spill_dir / orphan_name(store.path, 1)).write_bytes(data)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), 10, what="the replay")
    finally:
        stop_quietly(q, 2)
    assert [e["n"] for e in store.get(rid).provenance] == [0, 1, 2]
    (quarantined,) = failed_files(spill_dir)
    reason_text = quarantined.with_suffix(".reason").read_text()
    reason_lines = {int(m.group(1)) for m in re.finditer(r"^line (\d+):", reason_text, re.M)}
    inspected = {r.lineno for r in inspect_file(quarantined) if r.problem}
    assert reason_lines == inspected, f".reason says lines {sorted(reason_lines)}, inspect {sorted(inspected)}"
    lines = quarantined.read_bytes().split(b"\n")
    assert {lines[n - 1] + b"\n" for n in inspected} == {bad_a, bad_b}


@pytest.mark.timeout(40)
def test_item21_replay_and_status_count_quarantined_lines_the_same(store, records, spill_dir, capsys):
    rid = records[0].id
    spill_dir.mkdir(parents=True)
    files = [
        b"",  # empty
        b"\n\n\n",  # blank lines only
        b"garbage one\n\ngarbage two\n",  # all bad, with a blank line
        spill_line(rid, {"n": 0}, eid="g-0") + b"{torn",  # one good line, one cut short
        bytes(range(256)) * 4,  # binary
    ]
    for i, data in enumerate(files):
        (spill_dir / orphan_name(store.path, i + 1)).write_bytes(data)
    code = cli.main(["spill", "replay", "--store", str(store.path), "--dir", str(spill_dir), "--timeout", "10"])
    err = capsys.readouterr().err
    assert code == 1, err  # lines were quarantined
    m = re.search(r"(\d+) lines? quarantined", err)
    replay_count = int(m.group(1)) if m else 0
    assert cli.main(["spill", "status", "--json", "--dir", str(spill_dir)]) == 0
    status_count = json.loads(capsys.readouterr().out)["quarantined_lines"]
    assert replay_count == status_count, f"replay said {replay_count} quarantined lines, status {status_count}"
