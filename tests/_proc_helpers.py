"""Helpers for the guarantee and crash tests, and the child process they run.

As a module: spill-file writers in the documented format and exactly-once
checks. As a script (``python tests/_proc_helpers.py <mode> <json args>``): a
child that opens its own MemoryStore and queue (never ``fork``: LanceDB hangs in
a forked child) and reports progress as JSON lines on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from uuid import UUID

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from iai_queue.spill import store_tag  # noqa: E402

CHILD = str(Path(__file__).resolve())
DIM = 8


# -- spill files written by hand, in the format spill.py documents --------------------

def orphan_name(store_path, n: int, writer: str = "wdead", ts: int | None = None, suffix: str = ".jsonl") -> str:
    """A spill file name of a writer that holds no lock (dead): any queue of the store may replay it."""
    ts = time.time_ns() - 10**12 + n if ts is None else ts
    return f"{ts:019d}-{store_tag(store_path)}-{writer}-{n:06d}{suffix}"


def spill_line(rid, entry: dict, eid: str | None = None, seen: bool = False) -> bytes:
    obj = {"id": str(rid), "entry": entry}
    if eid is not None:
        obj["eid"] = eid
    if seen:
        obj["seen"] = 1
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def write_orphans(spill_dir: Path, store_path, record_ids: list, files: int, per_file: int,
                  tag: str = "o", writer: str = "wdead") -> dict:
    """``files`` orphan spill files, oldest first; entries ``{"t": tag, "n": k}`` round-robin over records.

    Returns {record id str: [n, ...]} in the order they must land.
    """
    spill_dir.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list[int]] = defaultdict(list)
    k = 0
    base = time.time_ns() - 10**12
    for f in range(files):
        lines = []
        for _ in range(per_file):
            rid = record_ids[k % len(record_ids)]
            lines.append(spill_line(rid, {"t": tag, "n": k}, eid=f"{writer}-{tag}-{k}"))
            expected[str(rid)].append(k)
            k += 1
        (spill_dir / orphan_name(store_path, f + 1, writer=writer, ts=base + f)).write_bytes(b"".join(lines))
    return dict(expected)


def pending_spill_files(spill_dir: Path) -> list[str]:
    """Files still waiting to be replayed: pending, claimed or temporary (quarantined ones excluded)."""
    try:
        names = os.listdir(spill_dir)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if ".failed-" in n or n.endswith(".lock"):
            continue
        if n.endswith((".jsonl", ".claimed")) or n.endswith(".jsonl.tmp"):
            out.append(n)
    return out


def failed_files(spill_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(spill_dir).iterdir() if ".failed-" in p.name and p.name.endswith(".jsonl"))
    except FileNotFoundError:
        return []


def wait_for(cond, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``cond`` until truthy or ``timeout``; returns its value or raises AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- exactly-once checks -----------------------------------------------------------------

def provenance_by_record(store, record_ids) -> dict[str, list[dict]]:
    return {str(r): store.get(r).provenance for r in record_ids}


def assert_exactly_once(store, expected: dict, key: str = "n", tag_key: str | None = None,
                        check_rows: bool = True, ordered: bool = True) -> None:
    """Every record's provenance equals ``expected[rid]`` (the ``key`` values), each once, in order.

    ``expected``: {record id str: [value, ...]}. With ``check_rows`` the raw
    provenance table must hold no duplicate rows either.
    """
    total = 0
    for rid, want in expected.items():
        got = [e[key] for e in store.get(UUID(rid)).provenance]
        assert len(got) == len(set(got)), f"record {rid}: duplicates {len(got) - len(set(got))}"
        missing = set(want) - set(got)
        extra = set(got) - set(want)
        assert not missing, f"record {rid}: {len(missing)} missing, e.g. {sorted(missing)[:10]}"
        assert not extra, f"record {rid}: {len(extra)} unexpected, e.g. {sorted(extra)[:10]}"
        if ordered:
            assert got == list(want), f"record {rid}: order broken: {got[:30]} vs {list(want)[:30]}"
        total += len(want)
    if check_rows:
        assert store.provenance_rows() == total, f"{store.provenance_rows()} rows for {total} entries"


# -- subprocesses ------------------------------------------------------------------------

def spawn(mode: str, **args) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, CHILD, mode, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, env=env)


class Reader:
    """Reads a child's JSON-lines stdout on a thread; ``last`` and ``events`` for the test."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.events: list[dict] = []
        self.cond = threading.Condition()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                self.events.append(ev)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_event(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.events:
                    if ev.get("ev") == kind:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.t.is_alive()):
                    raise AssertionError(f"child never reported {kind!r}; events: {self.events[-5:]}; "
                                         f"stderr: {self._stderr()}")
                self.cond.wait(min(left, 0.1))

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return (self.proc.stderr.read() or "")[-3000:]

    def of(self, kind: str) -> list[dict]:
        with self.cond:
            return [ev for ev in self.events if ev.get("ev") == kind]

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"child did not finish in {timeout}s; events: {self.events[-5:]}")
        self.t.join(5)
        return rc

    def stderr(self) -> str:
        return self._stderr()


# -- the child ---------------------------------------------------------------------------

def _say(**ev) -> None:
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def _child_drain(a: dict) -> None:
    """Open the store and a queue on the spill dir; replay until nothing is left (or ``deadline_s``)."""
    from iai_queue import MemoryStore, ProvenanceWriteQueue

    store = MemoryStore(a["db"], dim=DIM)
    if a.get("linger_ms"):  # each write lands, then lingers: widens the crash window before the unlink
        real = store.append_provenance_batch

        def lingering(pairs, records_cache=None):
            real(pairs, records_cache=records_cache)
            time.sleep(a["linger_ms"] / 1000)

        store.append_provenance_batch = lingering
    q = ProvenanceWriteQueue(store, spill_dir=a["spill_dir"], **a.get("opts", {})).start()
    _say(ev="started", pid=os.getpid())
    deadline = time.monotonic() + a.get("deadline_s", 20)
    spill_dir = Path(a["spill_dir"])
    last = -1
    while time.monotonic() < deadline:
        s = q.stats()
        if s.replayed != last:
            last = s.replayed
            _say(ev="progress", replayed=s.replayed)
        if not pending_spill_files(spill_dir) and not s.pending:
            break
        time.sleep(0.02)
    s = q.stats()
    q.stop()
    _say(ev="done", replayed=s.replayed, quarantined=s.quarantined_lines, dropped=s.dropped)


def _child_write(a: dict) -> None:
    """Enqueue ``n`` entries ``{"t": tag, "n": k}`` round-robin over ``ids`` through the store's queue."""
    from iai_queue import MemoryStore

    store = MemoryStore(a["db"], dim=DIM)
    ids = [UUID(x) for x in a["ids"]]
    store.enable_provenance_queue(spill_dir=a["spill_dir"], coalesce_ms=5)
    _say(ev="started", pid=os.getpid())
    per_call = a.get("per_call", 4)
    k = 0
    while k < a["n"]:
        pairs = []
        for _ in range(min(per_call, a["n"] - k)):
            pairs.append((ids[k % len(ids)], {"t": a["tag"], "n": k}))
            k += 1
        store.queue_provenance_batch(pairs)
    ok = store._provenance_queue.flush(20)
    store.disable_provenance_queue()
    _say(ev="done", flushed=ok)


def _child_exit_slow(a: dict) -> None:
    """Enable the queue with a store that takes 10 s per write, enqueue, and exit normally."""
    from iai_queue import MemoryStore

    store = MemoryStore(a["db"], dim=DIM)
    real = store.append_provenance_batch

    def slow(pairs, records_cache=None):
        time.sleep(10)
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = slow
    q = store.enable_provenance_queue(spill_dir=a["spill_dir"], exit_timeout=a["exit_timeout"], coalesce_ms=5)
    ids = [UUID(x) for x in a["ids"]]
    for k in range(a["n"]):
        store.queue_provenance_batch([(ids[k % len(ids)], {"t": "exit", "n": k})])
    assert q.stats().accepted == a["n"]
    _say(ev="exiting", t=time.time())
    # falls off the end: the atexit handler must stop the queue within exit_timeout


def _child_spill_forever(a: dict) -> None:
    """A store that never returns, a small queue, continuous enqueues; reports what the spill completed."""
    from iai_queue import MemoryStore, ProvenanceWriteQueue

    store = MemoryStore(a["db"], dim=DIM)
    never = threading.Event()

    def blocked(pairs, records_cache=None):
        never.wait()

    store.append_provenance_batch = blocked
    q = ProvenanceWriteQueue(store, spill_dir=a["spill_dir"], **a["opts"]).start()
    real_write = q.spill_directory.write

    def observed_write(lines, **kw):
        path = real_write(lines, **kw)  # durable once this returns
        ns = [json.loads(x)["entry"]["n"] for x in lines]
        _say(ev="spilled", ns=ns)
        return path

    q.spill_directory.write = observed_write
    ids = [UUID(x) for x in a["ids"]]
    _say(ev="started", pid=os.getpid())
    k = 0
    while True:
        q.enqueue([(ids[k % len(ids)], {"t": "kill", "n": k})])
        if k % 50 == 0:
            _say(ev="enqueued", upto=k)
        k += 1
        if k % 20 == 0:
            time.sleep(0.001)


MODES = {"drain": _child_drain, "write": _child_write, "exit_slow": _child_exit_slow,
         "spill_forever": _child_spill_forever}

if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    MODES[sys.argv[1]](json.loads(sys.argv[2]))
