#!/usr/bin/env python3
"""Soak the provenance queue under chaos, then count what was lost, doubled or reordered.

For ``--seconds``, against a real LanceDB store in a temporary directory:

* ``--threads`` enqueuing threads call ``store.queue_provenance_batch`` with 1-4
  pairs per call over shared records; every entry is numbered per thread, so
  per record the entries of one thread must land in the order they were accepted;
* a toggler enables and disables the store's queue every ~``--toggle-ms``;
* a flusher calls ``flush()`` on the live queue every ~10 ms;
* a restarter calls ``stop()`` then ``start()`` on the live queue every ~``--restart-ms``;
* the store fails ``--fail-rate`` of its calls (a wrapper on the instance's
  ``append_provenance_batch``), half of those after the real write: an ambiguous failure;
* small bounds, so memory overflows into the spill directory all the time.

Then everything is stopped, the real store put back, a fresh queue replays
whatever is left on disk, and the store is read: every record through ``get()``
and the provenance table's row count.

A call that raised (the queue off and the synchronous write failing) was not
accepted: its entries may be absent, or present once (the ambiguous failure);
they are "refused" and left out of the loss and order counts, not the duplicate count.

Prints accepted / written / dropped / duplicated / out-of-order (and more with
``--json``) and exits 1 on any loss, duplicate, reorder or unexpected entry, 0
otherwise. ``--seconds 5`` takes about 15 s. Each out-of-order pair is named (record,
thread, both entries' numbers); ``--trace`` adds, for those and for lost entries, every
store write, spill file and closed-route write that held them: path (memory write, replay,
closed route, stop's spill, bisect), queue, run, outcome and times — enough to tell the
mechanism from the first violation (slower: a stack walk per store write).

    python scripts/soak.py --seconds 600
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from iai_queue import MemoryRecord, MemoryStore, ProvenanceWriteQueue  # noqa: E402
from iai_queue.spill import SpillDirectory  # noqa: E402

DIM = 8


class FlakyStore:
    """Wraps the store's append: fails ``rate`` of the calls, half of them after the real write."""

    def __init__(self, store: MemoryStore, rate: float, seed: int, trace: "Trace | None" = None):
        self.real = store.append_provenance_batch
        self.trace = trace
        self.rate = rate
        self.rnd = random.Random(seed)
        self.lock = threading.Lock()
        self.calls = self.refused = self.ambiguous = 0
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        with self.lock:
            self.calls += 1
            roll = self.rnd.random()
        if self.trace is not None:
            return self.trace.store_write(pairs, lambda: self._write(roll, pairs, records_cache))
        return self._write(roll, pairs, records_cache)

    def _write(self, roll: float, pairs, records_cache):
        if roll < self.rate / 2:
            with self.lock:
                self.refused += 1
            raise ConnectionError("soak: write refused")
        result = self.real(pairs, records_cache=records_cache)
        if roll < self.rate:
            with self.lock:
                self.ambiguous += 1
            raise TimeoutError("soak: connection reset after commit")
        return result


class Trace:
    """``--trace``: what happened to every entry, keyed by ``(thread, n)``, to explain a violation.

    Events: ``accept`` (the enqueue call returned), ``store`` (a store write that
    held it: the path that wrote it, the queue, the run's abandoned flag, the
    outcome, start and end times), ``spill`` (a spill file it was written to,
    and by which path). Paths are read off the writing thread's stack, so the
    library needs no hooks for this.
    """

    # The innermost library function that names the path, first match wins.
    PATHS = (("_is_poison", "poison-retry"), ("_replay_here", "closed-replay"), ("_replay_files", "replay"),
             ("_write_behind", "closed-write"), ("stop", "stop-spill"), ("spill_or_drop", "late-spill"),
             ("_deliver", "memory-write"), ("run", "thread"))

    def __init__(self, soak: "Soak"):
        self.soak = soak
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.events: dict[tuple[int, int], list[str]] = defaultdict(list)

    def _queue_label(self, obj) -> str:
        for i, q in enumerate(list(self.soak.queues)):
            if obj in (q._delivery, q._closed, q._spiller, q._spill):
                return f"q{i}"
        return f"other@{id(obj) & 0xffff:04x}"  # a synchronous-path queue

    def path(self) -> str:
        """Where the current write comes from: the path, the queue, bisect/abandoned flags."""
        frame = inspect.currentframe()
        names, detail = [], []
        queue = None
        while frame is not None:
            code = frame.f_code
            if "iai_queue" in code.co_filename:
                names.append(code.co_name)
                me = frame.f_locals.get("self")
                if queue is None and me is not None and type(me).__name__ in ("Delivery", "ClosedRoute", "Spiller"):
                    queue = self._queue_label(me)
                if code.co_name == "_deliver":
                    stop, b = frame.f_locals.get("stop"), frame.f_locals.get("b")
                    if stop is not None:
                        detail.append(f"run@{id(stop) & 0xffff:04x}{' ABANDONED' if stop.abandoned else ''}")
                    if b is not None and me is not None and b is not me.current:
                        detail.append("bisect")
                if code.co_name == "run" and "worker" in code.co_filename:
                    detail.append("worker")
                if code.co_name == "run" and "spilling" in code.co_filename:
                    detail.append("spill-thread")
            frame = frame.f_back
        kind = next((label for fn, label in self.PATHS if fn in names), "?")
        return " ".join([kind, queue or "q?"] + detail)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def add(self, keys, text: str) -> None:
        with self.lock:
            for key in keys:
                self.events[key].append(text)

    @staticmethod
    def keys_of_pairs(pairs) -> list[tuple[int, int]]:
        return [(e["t"], e["n"]) for _, e in pairs if isinstance(e, dict) and "t" in e]

    def timed(self, keys, what: str, call, done, failed):
        """Run ``call()``, recording ``<start>-<end> <what> -> <done(result)>`` (or ``failed(exc)``) for ``keys``."""
        start = self.now()
        try:
            result = call()
        except BaseException as exc:
            self.add(keys, f"{start:.4f}-{self.now():.4f} {what} -> {failed(exc)}")
            raise
        self.add(keys, f"{start:.4f}-{self.now():.4f} {what} -> {done(result)}")
        return result

    def store_write(self, pairs, write):
        """Run ``write()`` (the store call for ``pairs``), recording it."""
        where = f"{self.path()} verify={int(bool(getattr(pairs, 'verify', False)))} size={len(pairs)}"
        return self.timed(self.keys_of_pairs(pairs), f"store {where} [{threading.current_thread().name}]", write,
                          done=lambda _: "ok", failed=lambda exc: f"{type(exc).__name__}: {exc}")

    def install_spill_hook(self) -> None:
        real = SpillDirectory.write
        trace = self

        def write(directory, lines, **kw):
            keys = []
            for raw in lines:
                try:
                    e = json.loads(raw)["entry"]
                    keys.append((e["t"], e["n"]))
                except (ValueError, KeyError, TypeError):
                    pass
            return trace.timed(keys, f"spill {trace.path()} [{threading.current_thread().name}]",
                               lambda: real(directory, lines, **kw),
                               done=lambda path: f"{path.name[:19]}..{path.name[-12:]} "
                                                 f"before_ts={kw.get('before_ts') is not None}",
                               failed=lambda exc: f"FAILED {exc!r}")

        SpillDirectory.write = write

        from iai_queue.writebehind.closed import ClosedRoute
        from iai_queue.writebehind.chunks import chunk_parts

        real_behind = ClosedRoute._write_behind

        def write_behind(route, chunk, state):
            pairs, _, _ = chunk_parts(chunk, route.ids)
            trace.timed(trace.keys_of_pairs(pairs), f"closed-route {trace._queue_label(route)} {state.name} "
                        f"successor={route.successor is not None}", lambda: real_behind(route, chunk, state),
                        done=lambda _: "returned", failed=repr)

        ClosedRoute._write_behind = write_behind

    def describe(self, key: tuple[int, int]) -> list[str]:
        with self.lock:
            return list(self.events.get(key, []))


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.store = MemoryStore(workdir / "db", dim=DIM)
        rnd = random.Random(args.seed)
        self.records = [MemoryRecord(id=uuid.UUID(int=rnd.getrandbits(128), version=4), text=f"r{i}",
                                     embedding=[rnd.random() for _ in range(DIM)]) for i in range(args.records)]
        self.store.insert_many(self.records)
        self.spill_dir = workdir / "spill"
        # Every path (the queues and the disabled store's synchronous path) spills here.
        os.environ["IAI_QUEUE_SPILL_DIR"] = str(self.spill_dir)
        self.opts = dict(spill_dir=self.spill_dir, coalesce_ms=2, max_queue_size=16, max_memory_pairs=32,
                         max_batch_pairs=8, spill_file_pairs=16, exit_timeout=0.5, retry_initial_s=0.005,
                         retry_max_s=0.05, idle_replay_s=0.2)
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.accepted: dict[tuple[str, int], list[int]] = defaultdict(list)  # (record, thread) -> [n]
        self.refused: set[tuple[int, int]] = set()  # (thread, n) of calls that raised
        self.refused_by: dict[str, int] = defaultdict(int)  # exception type -> calls
        self.calls = 0
        self.queues: list[ProvenanceWriteQueue] = []
        self.live: ProvenanceWriteQueue | None = None
        self.errors: list[str] = []
        self.trace = Trace(self) if args.trace else None
        if self.trace is not None:
            self.trace.install_spill_hook()
        self.toggles = self.restarts = self.flushes = 0

    # -- the actors ----------------------------------------------------------------------------

    def enqueuer(self, t: int) -> None:
        rnd = random.Random(self.args.seed * 1000 + t)
        n = 0
        mine: dict[tuple[str, int], list[int]] = defaultdict(list)
        refused: set[tuple[int, int]] = set()
        kinds: dict[str, int] = defaultdict(int)
        calls = 0
        try:
            while not self.halt.is_set():
                pairs = []
                for _ in range(rnd.randint(1, 4)):
                    rec = rnd.choice(self.records)
                    pairs.append((rec.id, {"t": t, "n": n}))
                    n += 1
                try:
                    if self.trace is not None:
                        begun = self.trace.now()
                        self.store.queue_provenance_batch(pairs)
                        self.trace.add(Trace.keys_of_pairs(pairs), f"{begun:.4f}-{self.trace.now():.4f} accept "
                                       f"live={self.trace._queue_label(getattr(self.live, '_delivery', None))}")
                    else:
                        self.store.queue_provenance_batch(pairs)
                except Exception as exc:  # a synchronous write failed, and the caller was told
                    refused.update((t, e["n"]) for _, e in pairs)
                    kinds[type(exc).__name__] += 1
                else:
                    for rid, e in pairs:
                        mine[(str(rid), t)].append(e["n"])
                calls += 1
        except BaseException as exc:
            self.errors.append(f"enqueuer {t}: {exc!r}")
        with self.lock:
            for key, ns in mine.items():
                self.accepted[key].extend(ns)
            self.refused |= refused
            self.calls += calls
            for k, v in kinds.items():
                self.refused_by[k] += v

    def _enable(self) -> None:
        q = self.store.enable_provenance_queue(**self.opts)
        with self.lock:
            if not self.queues or self.queues[-1] is not q:
                self.queues.append(q)
        self.live = q

    def toggler(self) -> None:
        try:
            while not self.halt.is_set():
                self._enable()
                self.halt.wait(self.args.toggle_ms / 1000)
                self.store.disable_provenance_queue()
                self.toggles += 1
                self.halt.wait(self.args.toggle_ms / 4000)
        except BaseException as exc:
            self.errors.append(f"toggler: {exc!r}")

    def flusher(self) -> None:
        try:
            while not self.halt.is_set():
                q = self.live
                if q is not None:
                    q.flush(0.05)
                    self.flushes += 1
                self.halt.wait(0.01)
        except BaseException as exc:
            self.errors.append(f"flusher: {exc!r}")

    def restarter(self) -> None:
        try:
            while not self.halt.wait(self.args.restart_ms / 1000):
                q = self.live
                if q is None:
                    continue
                q.stop(timeout=0.3)
                q.start()
                self.restarts += 1
        except BaseException as exc:
            self.errors.append(f"restarter: {exc!r}")

    # -- the run and the verdict -----------------------------------------------------------------

    def run(self) -> dict:
        flaky = FlakyStore(self.store, self.args.fail_rate, self.args.seed, self.trace)
        threads = [threading.Thread(target=self.enqueuer, args=(t,), name=f"soak-enqueuer-{t}")
                   for t in range(self.args.threads)]
        threads += [threading.Thread(target=f, name=f"soak-{f.__name__}")
                    for f in (self.toggler, self.flusher, self.restarter)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        self.halt.wait(self.args.seconds)
        self.halt.set()
        for th in threads:
            th.join(60)
            if th.is_alive():
                self.errors.append(f"{th.name} did not finish within 60 s of the end")
        ran = time.monotonic() - t0
        self.store.disable_provenance_queue()
        for q in self.queues:
            q.stop(timeout=5)
        dropped = sum(q.stats().dropped for q in self.queues)
        quarantined = sum(q.stats().quarantined_lines for q in self.queues)
        self.store.append_provenance_batch = flaky.real
        drained = self._drain()
        report = self._verdict()
        self.store.close()  # stop its background maintenance before the directory goes
        report.update(seconds=round(ran, 1), calls=self.calls, queues=len(self.queues), toggles=self.toggles,
                      restarts=self.restarts, flushes=self.flushes, store_calls=flaky.calls,
                      store_refused=flaky.refused, store_ambiguous=flaky.ambiguous, dropped_by_queues=dropped,
                      quarantined_by_queues=quarantined, refused_by=dict(self.refused_by), drained=drained,
                      errors=self.errors[:10])
        return report

    def _drain(self) -> bool:
        q = ProvenanceWriteQueue(self.store, spill_dir=self.spill_dir, coalesce_ms=2, idle_replay_s=0.1).start()
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if not [p for p in (self.spill_dir.iterdir() if self.spill_dir.exists() else [])
                        if p.name.endswith((".jsonl", ".claimed", ".jsonl.tmp")) and ".failed-" not in p.name]:
                    return q.flush(10)
                time.sleep(0.05)
            return False
        finally:
            q.stop(timeout=5)

    def _verdict(self) -> dict:
        accepted = sum(len(v) for v in self.accepted.values())
        written = lost = doubled = out_of_order = unexpected = distinct = refused_landed = 0
        examples: list[str] = []
        violations: list[dict] = []
        for rec in self.records:
            rid = str(rec.id)
            shown = [(e["t"], e["n"]) for e in self.store.get(rec.id).provenance]
            distinct += len(set(shown))
            seen: set = set()
            for key in shown:
                if key in seen:
                    doubled += 1
                seen.add(key)
            per_thread: dict[int, list[int]] = defaultdict(list)
            for t, n in dict.fromkeys(shown):
                if (t, n) in self.refused:
                    refused_landed += 1
                    continue
                per_thread[t].append(n)
            threads = {t for (r, t) in self.accepted if r == rid} | set(per_thread)
            for t in threads:
                want = self.accepted.get((rid, t), [])
                got = per_thread.get(t, [])
                want_set = set(want)
                missing = want_set - set(got)
                extra = [n for n in got if n not in want_set]
                lost += len(missing)
                unexpected += len(extra)
                written += len(want) - len(missing)
                high = -1
                for n in got:
                    if n in want_set:
                        if n < high:
                            out_of_order += 1
                            if len(violations) < self.args.show_violations:
                                violations.append(dict(record=rid, thread=t, landed_late=n, landed_before_it=high))
                        high = max(high, n)
                if missing and len(examples) < 8:
                    examples.append(f"record {rid[:8]} thread {t}: lost {sorted(missing)[:6]}")
                    if self.trace is not None:
                        for n in sorted(missing)[:2]:
                            examples += [f"  entry {n}:"] + [f"    {e}" for e in self.trace.describe((t, n))]
                if extra and len(examples) < 8:
                    examples.append(f"record {rid[:8]} thread {t}: never accepted {extra[:6]}")
        rows = self.store.provenance_rows()
        return dict(accepted=accepted, written=written, dropped=lost, duplicated=rows - distinct, shown_twice=doubled,
                    out_of_order=out_of_order, unexpected=unexpected, refused=len(self.refused),
                    refused_landed=refused_landed, rows=rows, examples=examples,
                    violations=[self._explain(v) for v in violations])

    def _explain(self, v: dict) -> dict:
        """One out-of-order pair: both entries' numbers, thread, record (and, with --trace, their paths)."""
        if self.trace is not None:
            v["trace"] = {str(v["landed_late"]): self.trace.describe((v["thread"], v["landed_late"])),
                          str(v["landed_before_it"]): self.trace.describe((v["thread"], v["landed_before_it"]))}
        return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run the chaos (default 60)")
    p.add_argument("--threads", type=int, default=8, help="enqueuing threads (default 8)")
    p.add_argument("--records", type=int, default=32, help="records the entries spread over (default 32)")
    p.add_argument("--fail-rate", type=float, default=0.10, help="share of store calls that fail (default 0.10)")
    p.add_argument("--toggle-ms", type=float, default=20.0, help="enable/disable period (default 20)")
    p.add_argument("--restart-ms", type=float, default=150.0, help="stop()/start() period (default 150)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, help="where to make the temporary work directory (removed after)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--trace", action="store_true",
                   help="record every entry's path (store writes, spills, the path and queue of each) and print it "
                        "for each out-of-order pair (slower: a stack walk per store write)")
    p.add_argument("--show-violations", type=int, default=5, metavar="N",
                   help="describe at most N out-of-order pairs (default 5)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.threads < 1 or args.records < 1 or not 0 <= args.fail_rate < 1 \
            or args.show_violations < 0:
        p.error("--seconds > 0, --threads >= 1, --records >= 1, 0 <= --fail-rate < 1 and --show-violations >= 0")
    logging.basicConfig(level=logging.CRITICAL)  # the chaos logs a lot on purpose; the verdict is below

    # The store's background maintenance may still be finishing a compaction as the
    # directory goes: a leftover file must not cost the report.
    with tempfile.TemporaryDirectory(dir=args.dir, ignore_cleanup_errors=True) as tmp:
        report = Soak(args, Path(tmp)).run()
    failed = any(report[k] for k in ("dropped", "duplicated", "out_of_order", "unexpected")) or report["errors"] \
        or not report["drained"]
    print(f"accepted {report['accepted']}  written {report['written']}  dropped {report['dropped']}  "
          f"duplicated {report['duplicated']}  out-of-order {report['out_of_order']}  "
          f"(queues' own counts: dropped {report['dropped_by_queues']}, quarantined "
          f"{report['quarantined_by_queues']}; unexpected {report['unexpected']}, refused {report['refused']}"
          f"{' ' + str(report['refused_by']) if report['refused_by'] else ''}, {report['seconds']} s, "
          f"{report['queues']} queues, {report['restarts']} restarts)")
    if args.json:
        print(json.dumps(report, indent=2))
    for v in report["violations"]:
        print(f"  out of order: record {v['record'][:8]} thread {v['thread']}: entry {v['landed_late']} landed "
              f"after entry {v['landed_before_it']}", file=sys.stderr)
        for n, events in v.get("trace", {}).items():
            print(f"    entry {n}:", file=sys.stderr)
            for e in events:
                print(f"      {e}", file=sys.stderr)
    for line in report["examples"] + report["errors"]:
        print(f"  {line}", file=sys.stderr)
    if not report["drained"]:
        print("  the spill directory did not drain", file=sys.stderr)
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
