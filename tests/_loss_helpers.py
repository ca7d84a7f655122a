"""Shared pieces of the silent-loss tests (issue 9): fault seams, a ledger of accepted entries, mounts.

Fault injection stays on the sanctioned seams: a wrapper installed on the store
instance's ``append_provenance_batch``, ``os`` functions monkeypatched to raise
the error a broken filesystem raises, and real small filesystems (tmpfs, a
read-only bind mount) where this machine lets the test mount them.

``known_bug(item, symptom)`` marks a test that fails on the code it was written
against: a strict xfail, so the suite stays green until the fix lands and turns
red (XPASS) the moment it does — then delete the marker. ``pytest --runxfail``
runs them as plain tests.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional
from uuid import UUID

import pytest

from _proc_helpers import ROOT, pending_spill_files, wait_for
from iai_queue import ProvenanceWriteQueue

FAST = dict(coalesce_ms=5, retry_initial_s=0.01, retry_max_s=0.05, idle_replay_s=0.2)
ENQUEUE_BOUND_S = 2.0  # no enqueue call may take longer than this
SOON_S = 3.0  # what a healthy queue does within a few replay cycles (FAST: idle_replay_s=0.2); seconds
FLUSH_S = 3.0  # a flush of a few entries on a healthy store; seconds (the bugs under test make it time out)


def known_bug(item: int, symptom: str, strict: bool = True):
    """This test fails on the code it was written against (issue 9, ``item``); remove once fixed."""
    return pytest.mark.xfail(reason=f"issue 9 item {item}: {symptom}", strict=strict)


def stop_quietly(q, timeout: float = 0.5) -> None:
    """Test cleanup: stop a queue that may be wedged by the bug under test, without waiting long."""
    try:
        q.stop(timeout=timeout)
    except Exception:
        pass


def events(caplog, name: str) -> list:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def stat_field(stats, name: str):
    """A QueueStats field the fix adds; a clear failure (not AttributeError) while it is missing."""
    assert hasattr(stats, name), f"QueueStats has no field {name!r} (fields: {sorted(vars(stats))})"
    return getattr(stats, name)


# -- store wrappers (the sanctioned seam) -------------------------------------------------------

class ThreadGate:
    """Blocks store writes until opened, except writes made on threads in ``allow``."""

    def __init__(self, store):
        self.real = store.append_provenance_batch
        self.open_event = threading.Event()
        self.entered = threading.Event()
        self.allow: set[int] = set()
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        if threading.get_ident() not in self.allow:
            self.entered.set()
            self.open_event.wait(30)
        return self.real(pairs, records_cache=records_cache)

    def open(self):
        self.open_event.set()


class FailWhile:
    """Raises while ``failing`` is set: a store outage."""

    def __init__(self, store, exc: Exception = RuntimeError("store is down")):
        self.real = store.append_provenance_batch
        self.failing = threading.Event()
        self.failing.set()
        self.exc = exc
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        if self.failing.is_set():
            raise self.exc
        return self.real(pairs, records_cache=records_cache)


class Flaky:
    """Fails about ``rate`` of the calls; half of those fail after the real write (an ambiguous failure)."""

    def __init__(self, store, rate: float = 0.10, seed: int = 0):
        self.real = store.append_provenance_batch
        self.rate = rate
        self.rnd = random.Random(seed)
        self.lock = threading.Lock()
        self.calls = self.failed = self.ambiguous = 0
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        with self.lock:
            self.calls += 1
            roll = self.rnd.random()
        if roll < self.rate / 2:
            with self.lock:
                self.failed += 1
            raise ConnectionError("flaky store: write refused")
        self.real(pairs, records_cache=records_cache)
        if roll < self.rate:
            with self.lock:
                self.ambiguous += 1
            raise TimeoutError("flaky store: connection reset after commit")


# -- a ledger of what was accepted, and the check against the store ------------------------------

@dataclass
class Ledger:
    """Entries ``{"t": tag, "n": k}`` accepted per record, in acceptance order (one list per tag).

    ``uncertain``: entries of calls that raised (a synchronous write whose store
    call failed after the commit may or may not be there); they may appear at
    most once and are left out of the order check.
    """

    accepted: dict = field(default_factory=lambda: defaultdict(list))  # (rid str, tag) -> [n]
    uncertain: set = field(default_factory=set)  # (tag, n)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accept(self, pairs) -> None:
        with self.lock:
            for rid, e in pairs:
                self.accepted[(str(rid), e["t"])].append(e["n"])

    def doubt(self, pairs) -> None:
        with self.lock:
            self.uncertain.update((e["t"], e["n"]) for _, e in pairs)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.accepted.values())


@dataclass
class Verdict:
    accepted: int
    landed: int  # accepted entries found in the store
    lost: int
    doubled: int  # entries get() shows more than once
    duplicate_rows: int  # provenance rows beyond the distinct entries (hidden by get()'s first-wins)
    out_of_order: int  # entries behind a later-accepted one of the same tag and record
    unexpected: int  # entries in the store that were never accepted
    examples: list

    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.duplicate_rows or self.out_of_order or self.unexpected)


def judge(store, record_ids: Iterable, ledger: Ledger) -> Verdict:
    """Compare the store with the ledger: every row counted, each record read through get()."""
    lost = doubled = out_of_order = unexpected = landed = distinct = 0
    examples: list = []
    by_record: dict = defaultdict(dict)
    for (rid, tag), ns in ledger.accepted.items():
        by_record[rid][tag] = ns
    for rid in {str(r) for r in record_ids} | set(by_record):
        shown = [(e.get("t"), e.get("n")) for e in store.get(UUID(rid)).provenance]
        distinct += len(set(shown))
        counts: dict = defaultdict(int)
        for key in shown:
            counts[key] += 1
        for key, c in counts.items():
            if c > 1:
                doubled += c - 1
                examples.append(f"{rid}: {key} shown {c} times")
        tags = by_record.get(rid, {})
        for key in counts:
            if key[0] not in tags and key not in ledger.uncertain:
                unexpected += 1
                examples.append(f"{rid}: {key} never accepted")
        for tag, want in tags.items():
            got = [n for t, n in shown if t == tag and (t, n) not in ledger.uncertain]
            got_once = list(dict.fromkeys(got))
            missing = set(want) - set(got_once)
            extra = set(got_once) - set(want)
            lost += len(missing)
            unexpected += len(extra)
            landed += len(want) - len(missing)
            if missing:
                examples.append(f"{rid} {tag}: lost {sorted(missing)[:8]}")
            kept = [n for n in got_once if n in set(want)]
            high = None
            first_bad = None
            for i, n in enumerate(kept):
                if high is not None and n < high:
                    out_of_order += 1
                    first_bad = i if first_bad is None else first_bad
                high = n if high is None else max(high, n)
            if first_bad is not None:
                lo = max(0, first_bad - 6)
                examples.append(f"{rid} {tag}: order broken at [{lo}:]: {kept[lo:lo + 12]}")
    duplicate_rows = store.provenance_rows() - distinct
    return Verdict(ledger.total, landed, lost, doubled, duplicate_rows, out_of_order, unexpected, examples[:12])


def assert_verdict(v: Verdict) -> None:
    assert v.ok(), (f"accepted {v.accepted}, landed {v.landed}, lost {v.lost}, doubled {v.doubled}, "
                    f"duplicate rows {v.duplicate_rows}, out of order {v.out_of_order}, "
                    f"unexpected {v.unexpected}; e.g. {v.examples}")


def drain(store, spill_dir, timeout: float = 15.0) -> None:
    """A fresh, healthy queue replays what is left in ``spill_dir``; raises if it cannot in ``timeout``."""
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, **FAST).start()
    try:
        wait_for(lambda: not pending_spill_files(spill_dir), timeout, what=f"the drain of {spill_dir}")
        assert q.flush(5), "the draining queue could not flush"
    finally:
        q.stop(timeout=2)


# -- timed enqueues ------------------------------------------------------------------------------

class TimedEnqueuer:
    """Runs enqueue calls on a thread and tells a test when one of them is stuck past a bound."""

    def __init__(self, enqueue, calls: list):
        self.enqueue = enqueue
        self.calls = calls
        self.done = threading.Event()
        self.in_call_since: Optional[float] = None
        self.longest = 0.0
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="test-enqueuer")

    def _run(self):
        try:
            for pairs in self.calls:
                t0 = time.monotonic()
                self.in_call_since = t0
                self.enqueue(pairs)
                self.in_call_since = None
                self.longest = max(self.longest, time.monotonic() - t0)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def start(self) -> "TimedEnqueuer":
        self.thread.start()
        return self

    def wait(self, timeout: float, bound: float = ENQUEUE_BOUND_S) -> None:
        """Until every call returned; fails as soon as one call has taken longer than ``bound``."""
        deadline = time.monotonic() + timeout
        while not self.done.wait(0.02):
            since = self.in_call_since
            if since is not None and time.monotonic() - since > bound:
                raise AssertionError(f"an enqueue call blocked for more than {bound}s")
            if time.monotonic() > deadline:
                raise AssertionError(f"enqueue calls did not finish in {timeout}s")
        if self.error is not None:
            raise self.error
        assert self.longest <= bound, f"an enqueue call took {self.longest:.2f}s"


# -- filesystems --------------------------------------------------------------------------------

def _mount(*args: str) -> bool:
    if os.geteuid() != 0:
        return False
    try:
        r = subprocess.run(["mount", *args], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


@contextmanager
def small_tmpfs(path: Path, size: str = "512k"):
    """A real tmpfs of ``size`` at ``path``; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)):
        pytest.skip("cannot mount a tmpfs here (needs root): the injected-OSError variant covers this")
    try:
        yield path
    finally:
        _umount(path)


class ReadOnlyBind:
    """Makes ``path`` read-only for new path lookups (a read-only bind mount over itself): real EROFS."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = False

    @staticmethod
    def available(probe: Path) -> bool:
        probe.mkdir(parents=True, exist_ok=True)
        if not _mount("--bind", str(probe), str(probe)):
            return False
        _umount(probe)
        return True

    def set_read_only(self) -> None:
        assert _mount("--bind", str(self.path), str(self.path)), "bind mount failed"
        self.mounted = True
        assert _mount("-o", "remount,bind,ro", str(self.path)), "read-only remount failed"

    def set_writable(self) -> None:
        if self.mounted:
            _umount(self.path)
            self.mounted = False


def fill_filesystem(path: Path) -> None:
    """Write ``path/filler`` until the filesystem is full."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * 4096
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def file_mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def unblock_fifos(directory: Path) -> None:
    """Open every FIFO in ``directory`` for writing and close it: a reader stuck in open() gets EOF."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for n in names:
        p = directory / n
        try:
            if not stat.S_ISFIFO(os.lstat(p).st_mode):
                continue
            fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue  # no reader waiting (ENXIO) or gone
        os.close(fd)


# -- the command line ---------------------------------------------------------------------------

def run_cli(*args: str, env_home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m iai_queue ARGS`` as an operator runs it, HOME pointed into the test's tmp dir."""
    env = dict(os.environ)
    env["HOME"] = str(env_home)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("IAI_QUEUE_SPILL_DIR", None)
    return subprocess.run([sys.executable, "-m", "iai_queue", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- a process started with multiprocessing's spawn (item 22) ---------------------------------------

def spawned_writer(db: str, spill_dir: str, ids: list, n: int, result) -> None:
    """Runs in a child started with the ``spawn`` method: its own store and queue."""
    from iai_queue import MemoryStore

    try:
        store = MemoryStore(db, dim=8)
        q = store.enable_provenance_queue(spill_dir=spill_dir, coalesce_ms=5)
        for k in range(n):
            store.queue_provenance_batch([(UUID(ids[k % len(ids)]), {"t": "spawned", "n": k})])
        flushed = q.flush(20)
        store.disable_provenance_queue()
        result.put({"flushed": flushed, "accepted": q.stats().accepted, "written": q.stats().written})
    except BaseException as exc:  # reported to the parent
        result.put({"error": repr(exc)})
