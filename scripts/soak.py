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
otherwise. ``--seconds 5`` takes about 15 s.

    python scripts/soak.py --seconds 600
"""

from __future__ import annotations

import argparse
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

DIM = 8


class FlakyStore:
    """Wraps the store's append: fails ``rate`` of the calls, half of them after the real write."""

    def __init__(self, store: MemoryStore, rate: float, seed: int):
        self.real = store.append_provenance_batch
        self.rate = rate
        self.rnd = random.Random(seed)
        self.lock = threading.Lock()
        self.calls = self.refused = self.ambiguous = 0
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        with self.lock:
            self.calls += 1
            roll = self.rnd.random()
        if roll < self.rate / 2:
            with self.lock:
                self.refused += 1
            raise ConnectionError("soak: write refused")
        self.real(pairs, records_cache=records_cache)
        if roll < self.rate:
            with self.lock:
                self.ambiguous += 1
            raise TimeoutError("soak: connection reset after commit")


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
        flaky = FlakyStore(self.store, self.args.fail_rate, self.args.seed)
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
                        high = max(high, n)
                if missing and len(examples) < 8:
                    examples.append(f"record {rid[:8]} thread {t}: lost {sorted(missing)[:6]}")
                if extra and len(examples) < 8:
                    examples.append(f"record {rid[:8]} thread {t}: never accepted {extra[:6]}")
        rows = self.store.provenance_rows()
        return dict(accepted=accepted, written=written, dropped=lost, duplicated=rows - distinct, shown_twice=doubled,
                    out_of_order=out_of_order, unexpected=unexpected, refused=len(self.refused),
                    refused_landed=refused_landed, rows=rows, examples=examples)


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
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.threads < 1 or args.records < 1 or not 0 <= args.fail_rate < 1:
        p.error("--seconds > 0, --threads >= 1, --records >= 1 and 0 <= --fail-rate < 1")
    logging.basicConfig(level=logging.CRITICAL)  # the chaos logs a lot on purpose; the verdict is below

    # The store's background maintenance may still be finishing a compaction as the
    # directory goes: a leftover file must not cost the report.
    with tempfile.TemporaryDirectory(dir=args.dir, ignore_cleanup_errors=True) as tmp:
        report = Soak(args, Path(tmp)).run()
    failed = any(report[k] for k in ("dropped", "duplicated", "out_of_order", "unexpected")) or report["errors"] \
        or not report["drained"]
    print(f"accepted {report['accepted']}  written {report['written']}  dropped {report['dropped']}  "
          f"duplicated {report['duplicated']}  out-of-order {report['out_of_order']}  "
          f"(unexpected {report['unexpected']}, refused {report['refused']}, {report['seconds']} s, "
          f"{report['queues']} queues, {report['restarts']} restarts)")
    if args.json:
        print(json.dumps(report, indent=2))
    for line in report["examples"] + report["errors"]:
        print(f"  {line}", file=sys.stderr)
    if not report["drained"]:
        print("  the spill directory did not drain", file=sys.stderr)
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
