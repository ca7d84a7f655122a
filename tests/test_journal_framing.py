"""Journal format version 2: mapped, preallocated segments whose unused rest is zeros.

What is checked here, with real files, a real subprocess killed with SIGKILL and a real small tmpfs:
a torn record inside a zero-filled segment at every byte of the last records; a zero length that is not the end;
SIGKILL in the middle of appends through the mapping; a version-1 segment written by the previous
release (``fixtures/journal-v1-torn-tail.wal``) read and replayed; a segment cut to its used size when it rolls
and when it closes; a full disk while reserving an extent.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from iai_queue import MemoryRecord
from iai_queue.journal import Durability, JournalWriter, scan_segment
from iai_queue.journal.format import FRAME, MAGIC, VERSION
from iai_queue.journal.reader import data_end
from iai_queue.spill import SpillDirectory
from iai_queue.spill.names import file_stem
from iai_queue.writebehind.journal_replay import JournalReplayer
from iai_queue.writebehind.lifecycle import StopSignal

from conftest import make_records

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_V1 = Path(__file__).resolve().parent / "fixtures" / "journal-v1-torn-tail.wal"
PREFIX = "qframe-"


@pytest.fixture
def ids(store):
    recs = make_records(6)
    store.insert_many(recs)
    return [r.id for r in recs]


def live_writer(spill_dir: Path, store, **kw) -> JournalWriter:
    w = JournalWriter(SpillDirectory(spill_dir, store_path=store.path), PREFIX, Durability.PROCESS, **kw)
    w.open()
    return w


def die(w: JournalWriter) -> None:
    """What a killed writer leaves: the files as they are (no cut, no retire), its lock released."""
    for s in w.segments:
        os.close(s.fd)
    w.directory.release()


def append(w: JournalWriter, n: int, ids, start: int = 0, pad: str = "") -> list[int]:
    offsets = []
    with w.lock:
        for k in range(start, start + n):
            _, off = w.append_locked(k + 1, ((ids[k % len(ids)], {"c": 0, "n": k, "pad": pad}),))
            offsets.append(off)
    return offsets


def dead_segment(spill_dir: Path, store, ids, n: int) -> tuple[Path, list[int], bytearray]:
    """``n`` records in one segment of a writer that then died: its path, the records' bounds (the
    last is where the data ends) and its bytes, to damage."""
    w = live_writer(spill_dir, store, segment_bytes=64 << 10)
    bounds = append(w, n, ids) + [w.current.size]
    path = w.current.path
    die(w)
    return path, bounds, bytearray(path.read_bytes())


def ns(scan) -> list[int]:
    return [r.items[0][1]["n"] for r in scan.records]


# -- the framing --------------------------------------------------------------------------------

def test_a_live_segment_is_preallocated_and_its_zero_tail_is_the_end(store, ids, tmp_path):
    w = live_writer(tmp_path / "s", store, segment_bytes=1 << 20)
    append(w, 50, ids)
    seg = w.current
    st = os.stat(seg.path)
    assert seg.map is not None and st.st_size == 1 << 20 > seg.size  # mapped, zero tail on disk
    assert st.st_blocks * 512 >= seg.reserved >= seg.size  # blocks reserved for what was written (and more)
    data = seg.path.read_bytes()
    assert data[:len(MAGIC)] == MAGIC and MAGIC[-1] == VERSION == 2
    assert data_end(data) == seg.size and not any(data[seg.size:])
    scan = scan_segment(seg.path, data)
    assert ns(scan) == list(range(50)) and not scan.damage and scan.header.version == 2
    w.close(0)


@pytest.mark.timeout(120)
def test_torn_record_in_a_zero_filled_segment_at_every_byte_of_the_last_records(store, ids, tmp_path):
    spill_dir = tmp_path / "torn"
    w = live_writer(spill_dir, store, segment_bytes=64 << 10)
    bounds = append(w, 12, ids) + [w.current.size]
    path, capacity = w.current.path, os.stat(w.current.path).st_size
    die(w)
    whole = path.read_bytes()
    assert len(whole) == capacity > bounds[-1]
    for cut in range(bounds[-4], bounds[-1] + 1):
        # The writer died after storing the first bytes of a record: the rest of the segment is still zeros.
        data = whole[:cut] + bytes(len(whole) - cut)
        scan = scan_segment(path, data)
        complete = sum(1 for b in bounds[1:] if b <= cut)
        assert ns(scan) == list(range(complete)), cut
        if cut in bounds:
            assert not scan.damage, cut
        else:  # exactly the torn record's claimed bytes are damage; the zeros after it are unused space
            (d,) = scan.damage
            assert (d.offset, d.end) == (bounds[complete], bounds[complete + 1]), (cut, d)
            assert "checksum mismatch" in d.reason or "torn" in d.reason, d
    # Replayed for real: at a record boundary, in a frame, in a payload.
    for cut in (bounds[-2], bounds[-2] + 3, bounds[-2] + 20):
        data = whole[:cut] + bytes(len(whole) - cut)
        path.write_bytes(data)
        before = store.provenance_rows()
        assert JournalReplayer.for_store(store, spill_dir).replay_all(StopSignal()) == 1
        complete = sum(1 for b in bounds[1:] if b <= cut)
        assert store.provenance_rows() == max(before, complete)
        failed = sorted(spill_dir.glob("*.failed-*.wal"))
        if cut in bounds:
            assert not failed
        else:
            (f,) = failed
            assert f.read_bytes() == data[bounds[-2]:bounds[-1]]  # the torn record's bytes, not 64 KiB of zeros
            f.unlink()
            f.with_suffix(".reason").unlink()
        assert not list(spill_dir.glob("*.wal"))
    assert store.provenance_rows() == 11


def test_a_zero_length_followed_by_data_is_damage_not_the_end(store, ids, tmp_path):
    path, bounds, data = dead_segment(tmp_path / "z", store, ids, 10)
    data[bounds[4]:bounds[4] + 4] = bytes(4)  # record 4's length flipped to 0 (by the disk, say)
    scan = scan_segment(path, bytes(data))
    assert ns(scan) == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # the records after it are not hidden
    (d,) = scan.damage
    assert (d.offset, d.end) == (bounds[4], bounds[5]) and "length 0" in d.reason


def test_garbage_after_a_torn_record_is_set_aside_with_it(store, ids, tmp_path):
    path, bounds, data = dead_segment(tmp_path / "g", store, ids, 5)
    end = bounds[-1]
    data[end:end + 8] = FRAME.pack(40, 0)  # a frame whose record never came
    data[end + 200] = 7  # and a stray byte past its claimed end
    (d,) = scan_segment(path, bytes(data)).damage
    assert (d.offset, d.end) == (end, end + 201)


# -- rolling and closing -------------------------------------------------------------------------

def test_roll_and_close_cut_the_zero_tail(store, ids, tmp_path):
    w = live_writer(tmp_path / "r", store, segment_bytes=16 << 10, extent_bytes=4 << 10)
    append(w, 400, ids, pad="x" * 60)  # ~60 KiB: several rolls, several extents per segment
    segs = list(w.segments)
    assert len(segs) >= 4
    got = []
    for s in segs[:-1]:
        assert s.map is None and os.stat(s.path).st_size == s.size <= 16 << 10  # cut at the roll
        scan = scan_segment(s.path)
        assert not scan.damage
        got += ns(scan)
    live = segs[-1]
    assert os.stat(live.path).st_size == 16 << 10 > live.size
    got += ns(scan_segment(live.path))
    assert got == list(range(400))
    path, used = live.path, live.size
    w.close(0)  # nothing is in the store: the segments stay, cut to their used size
    assert w.remaining_after_close and os.stat(path).st_size == used
    assert not scan_segment(path).damage


def test_a_record_larger_than_a_segment_gets_a_segment_of_its_own(store, ids, tmp_path):
    w = live_writer(tmp_path / "big", store, segment_bytes=16 << 10, extent_bytes=4 << 10)
    append(w, 3, ids)
    append(w, 1, ids, start=3, pad="y" * (40 << 10))
    append(w, 3, ids, start=4)
    got = []
    for s in w.segments:
        got += ns(scan_segment(s.path))
    assert got == list(range(7))
    w.close(0)


def test_the_pwrite_path_writes_the_same_format(store, ids, tmp_path):
    w = live_writer(tmp_path / "pw", store, mapped=False, segment_bytes=16 << 10)
    append(w, 200, ids, pad="z" * 30)
    assert all(s.map is None for s in w.segments)
    assert all(os.stat(s.path).st_size == s.size for s in w.segments)  # no zero tail on this path
    got = []
    for s in w.segments:
        scan = scan_segment(s.path)
        assert not scan.damage and scan.header.version == 2
        got += ns(scan)
    assert got == list(range(200))
    w.close(0)


# -- version 1 -----------------------------------------------------------------------------------

def test_version_1_segment_of_the_previous_release_is_read_and_replayed(store, tmp_path):
    """The fixture was written by the previous release's JournalWriter (format version 1): ten records
    ``{"c": 0, "n": k}`` over three record ids ``UUID(int=0x1000 + i)``, then half of an eleventh
    (the writer died inside its write)."""
    data = FIXTURE_V1.read_bytes()
    assert data[len(MAGIC) - 1] == 1
    scan = scan_segment(FIXTURE_V1)
    assert scan.header.version == 1 and scan.header.prefix == "qv1-"
    assert ns(scan) == list(range(10)) and [r.seq for r in scan.records] == list(range(1, 11))
    (d,) = scan.damage
    assert (d.offset, d.end) == (scan.records[-1].end, len(data)) and "torn" in d.reason
    # Replayed into a store that has the three records, as a dead writer's segment of this store.
    rids = [uuid.UUID(int=0x1000 + i) for i in range(3)]
    store.insert_many([MemoryRecord(id=r, text="t", embedding=[0.1] * store.dim) for r in rids])
    spill_dir = tmp_path / "v1"
    directory = SpillDirectory(spill_dir, store_path=store.path)
    directory.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = file_stem(time.time_ns(), directory.store, "wv1fixture", 1) + ".wal"  # a dead writer's, of this store
    shutil.copy(FIXTURE_V1, spill_dir / name)
    assert JournalReplayer.for_store(store, spill_dir).replay_all(StopSignal()) == 1
    assert store.provenance_rows() == 10
    got = sorted(e["n"] for r in rids for e in store.get(r).provenance)
    assert got == list(range(10))
    (failed,) = spill_dir.glob("*.failed-*.wal")
    assert failed.read_bytes() == data[d.offset:]


# -- SIGKILL in the middle of appends --------------------------------------------------------------

CHILD = r"""
import json, os, sys, uuid
sys.path.insert(0, sys.argv[1])
from iai_queue.journal import Durability, JournalWriter
from iai_queue.spill import SpillDirectory
a = json.loads(sys.argv[2])
w = JournalWriter(SpillDirectory(a["spill_dir"], store_path=a["db"]), "qkill%d-" % a["tag"], Durability.PROCESS,
                  segment_bytes=a["segment_bytes"], extent_bytes=a["extent_bytes"])
w.open()
ids = [uuid.UUID(x) for x in a["ids"]]
pad = "p" * a["pad"]
k = 0
while True:
    with w.lock:
        w.append_locked(k + 1, ((ids[k % len(ids)], {"c": a["tag"], "n": k, "pad": pad[: k % a["pad"]]}),))
    if k % 97 == 0:
        sys.stdout.write(f"{k}\n")  # acked: append_locked for k has returned
        sys.stdout.flush()
    k += 1
"""


@pytest.mark.timeout(120)
def test_sigkill_in_the_middle_of_mapped_appends_keeps_every_acked_record(store, ids, tmp_path):
    rnd = random.Random(3)
    spill_dir = tmp_path / "kill"
    acked = {}
    for tag in range(4):
        args = dict(spill_dir=str(spill_dir), db=str(store.path), ids=[str(i) for i in ids], tag=tag,
                    segment_bytes=256 << 10, extent_bytes=16 << 10, pad=300)
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), json.dumps(args)], stdout=subprocess.PIPE,
                                text=True)
        first = proc.stdout.readline()
        assert first.strip() == "0", first
        deadline_lines = rnd.randint(5, 400)  # SIGKILL after a random number of acks (several segments for some)
        last = 0
        for _ in range(deadline_lines):
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for line in proc.stdout.read().split():
            last = int(line)  # acks already written before the kill
        acked[tag] = last
    # Every segment: records in order, damage at most one torn record at its end.
    got: dict[int, list[int]] = {}
    for p in sorted(spill_dir.glob("*.wal")):
        scan = scan_segment(p)
        assert scan.header is not None and scan.header.version == 2
        for r in scan.records:
            (rid, e), = r.items
            got.setdefault(e["c"], []).append(e["n"])
        if scan.damage:
            (d,) = scan.damage
            assert d.end <= os.stat(p).st_size and scan.records and d.offset == scan.records[-1].end, (p.name, d)
    for tag, last in acked.items():
        assert got[tag] == list(range(len(got[tag]))), tag  # in order, nothing missing in between
        assert len(got[tag]) >= last + 1, (tag, len(got[tag]), last)
    # And a queue on the store replays all of it once.
    assert JournalReplayer.for_store(store, spill_dir).replay_all(StopSignal()) >= 4
    assert store.provenance_rows() == sum(len(v) for v in got.values())


# -- a full disk while reserving ------------------------------------------------------------------

def test_full_disk_shows_as_enospc_when_reserving_never_as_sigbus(store, ids, small_fs):
    w = live_writer(small_fs / "spill", store, segment_bytes=1 << 20, extent_bytes=32 << 10)
    assert w.current.map is not None and os.stat(w.current.path).st_size == 1 << 20  # larger than the disk
    written = 0
    with pytest.raises(OSError) as err:
        for k in range(100000):
            append(w, 1, ids, start=k, pad="q" * 200)
            written += 1
    assert err.value.errno == errno.ENOSPC
    assert 200 < written < 2000  # the disk's ~256 KiB, not the segment's 1 MiB
    # Every record append_locked returned for is in the segment, whole; the failure left nothing half-written.
    seg = w.segments[-1]
    scan = scan_segment(seg.path)
    assert ns(scan) == list(range(written)) and not scan.damage
    assert os.stat(seg.path).st_size == seg.size  # cut to its used size when it failed
    w.close(0)


# -- the backlog ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_backlog_refill_decodes_each_record_once(store, ids, spill_dir, gate):
    from iai_queue import ProvenanceWriteQueue

    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, durability="process", max_queue_size=8,
                             coalesce_ms=1).start()
    decoded = []
    try:
        writer = q._journal.writer
        real = writer.read_records

        def counted(*a, **kw):
            records, end = real(*a, **kw)
            decoded.extend(r.seq for r in records)
            return records, end

        writer.read_records = counted
        for n in range(600):
            q.enqueue([(ids[n % len(ids)], {"c": 0, "n": n})])
        assert q.stats().journal_backlog > 500
        gate.open()
        assert q.flush(30)
    finally:
        q.stop(5)
    assert len(decoded) == len(set(decoded)) > 500  # every backlog record decoded once, none twice
    assert store.provenance_rows() == 600
    got = sorted(e["n"] for rid in ids for e in store.get(rid).provenance)
    assert got == list(range(600))


def test_the_frame_checksum_is_zlibs_crc32_whichever_implementation_computes_it():
    """The format's checksum is zlib's CRC-32; zlib-ng (a dependency) computes it faster. Same values on
    bytes and on the memoryview slices the reader passes, at every length around the usual record sizes."""
    import importlib.util
    import zlib

    from iai_queue.journal.format import crc32

    rnd = random.Random(7)
    for n in list(range(0, 300)) + [1000, 4095, 4096, 65537]:
        data = rnd.randbytes(n + 16)
        assert crc32(data[8:8 + n]) == zlib.crc32(data[8:8 + n]), n
        assert crc32(memoryview(data)[8:8 + n]) == zlib.crc32(data[8:8 + n]), n
    if importlib.util.find_spec("zlib_ng") is not None:
        assert crc32.__module__.startswith("zlib_ng"), crc32.__module__  # the fast one is in use
