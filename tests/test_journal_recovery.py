"""Recovery of dead writers' journals (issue 11): by a memory-mode queue, by ``iai-queue spill replay``, with the
store already holding part of them; real subprocesses, real SIGKILL, real LanceDB, provenance rows counted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from iai_queue.journal.reader import data_end
from iai_queue import ProvenanceWriteQueue
from iai_queue.cli import main
from iai_queue.journal.bulk import entry_id_ranges
from iai_queue.writebehind.journal_replay import JournalReplayer
from iai_queue.writebehind.lifecycle import StopSignal

from conftest import make_records
from test_journal import check_landed, entries, spawn, wait_until

WRITER = str(Path(__file__).resolve().parent / "_journal_writer.py")


@pytest.fixture
def ids(store):
    recs = make_records(6)
    store.insert_many(recs)
    return [r.id for r in recs]


def journals(spill_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(spill_dir) if n.endswith(".wal") and ".failed-" not in n)


def killed_writer(store, ids, spill_dir: Path, tag: int, n: int) -> int:
    """A journal-mode child whose store takes nothing, SIGKILLed once it has enqueued ``n`` calls: its whole
    journal is left for recovery. Returns the last acked call (``n - 1``)."""
    r = spawn(db=str(store.path), spill_dir=str(spill_dir), ids=[str(i) for i in ids], tag=tag, n=n,
              block_store=True, opts={"durability": "process"})
    r.wait_event("enqueued", 30)
    r.proc.send_signal(signal.SIGKILL)
    r.finish(10)
    assert journals(spill_dir)
    return n - 1


def write_journal_elsewhere(store, spill_dir: Path, ids, seqs: list[int], land: list[int], checkpoint: int,
                            spill_runs: tuple = ()) -> str:
    """Another process journals one call per seq in ``seqs`` and exits; the store gets the calls in ``land``
    (as the dead writer's worker would have written them), and the checkpoint says ``checkpoint``."""
    args = dict(db=str(store.path), spill_dir=str(spill_dir), ids=[str(i) for i in ids], seqs=seqs, land=land,
                checkpoint=checkpoint, spill_runs=list(spill_runs))
    out = subprocess.run([sys.executable, WRITER, json.dumps(args)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["prefix"]


# -- the range lookup that verifies a dead writer's ids ----------------------------------------------------


def test_entry_id_ranges_cover_every_id_of_the_seqs():
    rnd = random.Random(3)
    for _ in range(300):
        lo = rnd.choice([1, rnd.randrange(1, 300), rnd.randrange(1, 1 << 20)])
        hi = lo + rnd.choice([0, 1, 15, rnd.randrange(0, 5000)])
        ranges = entry_id_ranges("qx-", lo, hi)
        for seq in {lo, hi, rnd.randint(lo, hi), *(s for s in (15, 16, 255, 256, 4095, 4096) if lo <= s <= hi)}:
            for i in (0, 9, 10, 123):
                eid = f"qx-{seq:x}.{i}"
                assert any(a <= eid < b for a, b in ranges), (lo, hi, eid, ranges)
        outside = [f"qx-{s:x}.0" for s in (lo - 1, hi + 1) if s > 0]
        for eid in outside:  # an id of the same length outside [lo, hi] is never in a range of its length
            same = [(a, b) for a, b in ranges if len(a) == len(eid) - 1]
            assert not any(a <= eid < b for a, b in same), (lo, hi, eid, ranges)


@pytest.mark.timeout(90)
def test_replay_skips_what_the_dead_writer_wrote_after_its_checkpoint(store, ids, tmp_path):
    """Seqs cross hex lengths (1 to 4 digits); the store has calls above the checkpoint already (here also out
    of order, to hit every range): a replay writes every other call exactly once."""
    spill_dir = tmp_path / "spill"
    seqs = list(range(1, 301)) + list(range(4090, 4110))
    land = list(range(1, 21)) + [25, 26, 40, 255, 256, 257, 4095]  # up to 20 checkpointed; the rest had landed too
    write_journal_elsewhere(store, spill_dir, ids, seqs, land, checkpoint=20)
    assert store.provenance_rows() == len(land)
    replayer = JournalReplayer.for_store(store, spill_dir)
    assert replayer.replay_all(StopSignal()) == 1
    assert replayer.ledger.n["replayed"] == len(seqs) - len(land)
    assert store.provenance_rows() == len(seqs)
    got = entries(store, ids)
    for rid, lst in got.items():
        ns = [n for _, n in lst]
        assert len(ns) == len(set(ns)), f"{rid}: duplicates"
    every = sorted(n for lst in got.values() for _, n in lst)
    assert every == sorted(seqs)
    assert not journals(spill_dir)


# -- a memory-mode queue recovers a dead writer's journal -------------------------------------------------


@pytest.mark.timeout(120)
def test_memory_mode_queue_replays_a_killed_writers_journal_once_and_keeps_order(store, ids, spill_dir):
    acked = killed_writer(store, ids, spill_dir, tag=0, n=300)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir).start()  # the default: durability="memory"
    try:
        # New calls go behind the dead writer's journal, per record.
        for n in range(50):
            q.enqueue([(ids[n % len(ids)], {"c": 1, "n": n})])
        wait_until(lambda: not journals(spill_dir) and q.flush(1.0), 60, "the journal to be replayed")
        s = q.stats()
        assert s.replayed == acked + 1 + s.spilled_pairs  # the journal's, and our own calls that waited behind it
    finally:
        q.stop(5)
    check_landed(store, ids, {0: acked, 1: 49})  # across children: c=0 entirely before c=1, per record
    # A second queue finds nothing left to replay: nothing doubles.
    q2 = ProvenanceWriteQueue(store, spill_dir=spill_dir).start()
    try:
        assert q2.flush(5)
    finally:
        q2.stop(5)
    assert store.provenance_rows() == acked + 1 + 50


# -- iai-queue spill replay / status ------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cli_replays_dead_writers_journals_and_leaves_a_live_ones(store, ids, tmp_path, capsys):
    spill_dir = tmp_path / "spill"
    acked = killed_writer(store, ids, spill_dir, tag=0, n=120)
    dead = set(journals(spill_dir))
    # A live writer: its journal is held under its lock (a queue would replay the dead one itself).
    args = dict(db=str(store.path), spill_dir=str(spill_dir), ids=[str(i) for i in ids], seqs=list(range(1, 41)),
                land=[], checkpoint=0, hold=True)
    live = subprocess.Popen([sys.executable, WRITER, json.dumps(args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert "prefix" in live.stdout.readline()
        live_segments = set(journals(spill_dir)) - dead
        assert live_segments
        live_bytes = {n: (spill_dir / n).read_bytes() for n in live_segments}

        code = main(["spill", "status", "--dir", str(spill_dir), "--json"])
        st = json.loads(capsys.readouterr().out)
        assert code == 0
        assert st["journal_segments"] == len(dead) + len(live_segments)
        assert st["journal_segments_live"] == len(live_segments)
        assert st["journal_entries"] == acked + 1 + 40
        code = main(["spill", "status", "--dir", str(spill_dir)])
        out = capsys.readouterr().out
        assert code == 0 and "journal " in out and f"{len(live_segments)} of live writers" in out

        code = main(["spill", "replay", "--store", str(store.path), "--dir", str(spill_dir)])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "Traceback" not in err
        assert f"replayed {acked + 1} entries" in err
        assert f"live writer (pid {live.pid})" in err and "left to it" in err
        assert not dead & set(journals(spill_dir))
        for n, data in live_bytes.items():  # never touched
            assert (spill_dir / n).read_bytes() == data
        check_landed(store, ids, {0: acked})
        code = main(["spill", "replay", "--store", str(store.path), "--dir", str(spill_dir)])
        err = capsys.readouterr().err
        assert code == 0 and "nothing to replay" in err
        assert store.provenance_rows() == acked + 1
    finally:
        live.stdin.close()
        live.wait(10)


@pytest.mark.timeout(60)
def test_cli_replay_of_a_damaged_journal_sets_the_damage_aside_and_exits_1(store, ids, tmp_path, capsys):
    spill_dir = tmp_path / "spill"
    write_journal_elsewhere(store, spill_dir, ids, list(range(1, 41)), [], checkpoint=0)
    (seg,) = journals(spill_dir)
    path = spill_dir / seg
    data = path.read_bytes()
    data = data[:data_end(data)]  # a live segment ends in zeros (format 2): cut the data, not the zeros
    path.write_bytes(data[:-7])  # a torn tail: the last record is cut
    code = main(["spill", "replay", "--store", str(store.path), "--dir", str(spill_dir)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "replayed 39 entries" in err and "damaged journal span" in err
    assert store.provenance_rows() == 39
    (failed,) = spill_dir.glob("*.failed-*.wal")
    assert failed.read_bytes() and "torn" in failed.with_suffix(".reason").read_text()


# -- a dead writer's journal and its spill files, merged by seq -----------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("by", ["memory-mode queue", "journal-mode queue", "cli"])
def test_a_dead_writers_journal_and_spill_files_land_in_seq_order(store, ids, tmp_path, capsys, by):
    """A write-ahead writer whose journal failed for a while (disk full) spilled those calls as memory mode
    does, then journaled again, then died: its calls are in two places, interleaved by seq. Whoever replays
    them writes them in seq order per record, each once."""
    spill_dir = tmp_path / "spill"
    journaled = list(range(1, 41)) + list(range(61, 81)) + list(range(101, 121))
    spilled = (list(range(41, 51)), list(range(51, 61)), list(range(81, 101)))
    write_journal_elsewhere(store, spill_dir, ids, journaled, land=[], checkpoint=0, spill_runs=spilled)
    assert journals(spill_dir) and len(list(spill_dir.glob("*.jsonl"))) == 3
    if by == "cli":
        code = main(["spill", "replay", "--store", str(store.path), "--dir", str(spill_dir)])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "replayed 120 entries" in err
    else:
        mode = "memory" if by.startswith("memory") else "process"
        q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability=mode).start()
        try:
            wait_until(lambda: not [n for n in journals(spill_dir) if q.spill_directory.writer not in n]
                       and not list(spill_dir.glob("*.jsonl")) and not list(spill_dir.glob("*.claimed"))
                       and q.flush(1.0), 60, "the replay")
        finally:
            q.stop(5)
    got = entries(store, ids)
    for rid, lst in got.items():
        ns = [n for _, n in lst]
        assert ns == sorted(ns), f"record {rid}: not in seq order: {ns}"
    assert sorted(n for lst in got.values() for _, n in lst) == list(range(1, 121))
    assert store.provenance_rows() == 120
    assert not list(spill_dir.glob("*.failed-*"))


# -- a segment that cannot be read now holds back the younger ones ------------------------------------------


def refuse_reads(monkeypatch, segment: str, times: int) -> list:
    """Replay's reads of ``segment`` fail (EIO) ``times`` times, then work; returns the list of refusals."""
    import errno

    from iai_queue.writebehind import journal_replay

    real_read = journal_replay.read_segment_bytes
    refused: list = []

    def read_segment_bytes(path):
        if path.name == segment and len(refused) < times:
            refused.append(path.name)
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_read(path)

    monkeypatch.setattr(journal_replay, "read_segment_bytes", read_segment_bytes)
    return refused


@pytest.mark.timeout(120)
def test_a_segment_that_cannot_be_read_holds_back_younger_segments(store, ids, tmp_path, monkeypatch):
    spill_dir = tmp_path / "spill"
    write_journal_elsewhere(store, spill_dir, ids, list(range(1, 31)), land=[], checkpoint=0)   # older writer
    write_journal_elsewhere(store, spill_dir, ids, list(range(31, 61)), land=[], checkpoint=0)  # younger writer
    older, younger = journals(spill_dir)
    refused = refuse_reads(monkeypatch, older, times=2)
    replayer = JournalReplayer.for_store(store, spill_dir, retry_max_s=0.2)  # a failed segment waits 0.2 s
    assert replayer.replay_all(StopSignal()) == 0  # tried the older one only; it failed, so it stopped there
    assert journals(spill_dir) == [older, younger] and store.provenance_rows() == 0, "the younger one overtook"
    assert replayer.ledger.n["spill_errors"] == 1
    assert replayer.orphans() == [older, younger] and replayer.ready_orphans() == []  # both wait, in order
    wait_until(lambda: replayer.replay_all(StopSignal()) >= 0 and not journals(spill_dir), 30, "both replayed")
    assert len(refused) == 2
    assert store.provenance_rows() == 60
    for rid, lst in entries(store, ids).items():
        ns = [n for _, n in lst]
        assert ns == sorted(ns), f"{rid}: order broken: {ns}"


@pytest.mark.timeout(120)
def test_new_calls_wait_behind_a_dead_writers_journal_that_cannot_be_read_yet(store, ids, spill_dir, monkeypatch):
    write_journal_elsewhere(store, spill_dir, ids, list(range(1, 41)), land=[], checkpoint=0)
    (segment,) = journals(spill_dir)
    refused = refuse_reads(monkeypatch, segment, times=3)
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, idle_replay_s=0.1, coalesce_ms=5).start()
    try:
        wait_until(lambda: refused, 10, "the first read to fail")
        for n in range(50):  # while the journal waits for its retry: these go behind it, per record
            q.enqueue([(ids[n % len(ids)], {"c": 1, "n": n})])
        wait_until(lambda: not journals(spill_dir) and q.flush(1.0), 60, "the journal, then the new calls")
        assert len(refused) == 3 and q.stats().spill_errors >= 3
    finally:
        q.stop(5)
    check_landed(store, ids, {1: 49})
    assert sorted(n for lst in entries(store, ids).values() for c, n in lst if c == 0) == list(range(1, 41))
