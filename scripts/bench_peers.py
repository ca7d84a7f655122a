"""Issue 10: enqueue latency of iai_queue against the real peers, in one process and one run.

Each queue takes 1-pair provenance calls (``[(record_id, entry)]``) and its
worker writes them into its OWN real LanceDB store (a ``MemoryStore`` seeded
the same way) through ``store.append_provenance_batch``. The method is
``bench_enqueue.py``'s: calls in bursts (``--burst`` calls, then a
``--pause-ms`` sleep) so the worker writes while the caller enqueues; the
queues take turns in ``--rounds`` interleaved segments (the order shuffled each
round by ``--order-seed``, random unless given and reported in the output, so no
queue always follows the same one, in one run or across runs), each
written and settled before the next queue is measured — a persist-queue consumer
has also acknowledged what it wrote — so machine drift hits all alike and only
one worker works at a time. Only the enqueue call is
timed. The queues and the exact call measured:

``iai``        ``ProvenanceWriteQueue(store).enqueue(pairs)``, record ids as ``UUID``
``iai_str``    the same, record ids as canonical UUID strings
``iai_journal`` the same, UUID ids, ``durability="process"``: each call is a record in the
               write-ahead journal before ``enqueue`` returns (issue 11)
``otel``       OpenTelemetry SDK ``opentelemetry.sdk._shared_internal.BatchProcessor.emit(pairs)``
               (the core of ``BatchLogRecordProcessor``/``BatchSpanProcessor``; >= 1.34) with an
               exporter that writes each exported batch
``simplequeue`` ``queue.SimpleQueue.put(pairs)`` + a listener thread in the ``logging.QueueListener``
               pattern: block on ``get``, drain what is there (up to the batch size), write
``sentry``     sentry-sdk ``sentry_sdk.worker.BackgroundWorker.submit(callback)``; the callback adds
               the pairs to a batch written when it is full (see ``SentryWorker``)
``pq_file``    persist-queue ``persistqueue.Queue.put(pairs)`` + a consumer thread: ``get``, drain,
               write, ``task_done()`` per item
``pq_sqlite``  persist-queue ``persistqueue.SQLiteAckQueue.put(pairs)`` + a consumer thread:
               ``get(raw=True)``, drain, write, ``ack(id=...)`` per item

The peers get the caller's list as their item, unchecked and uncopied; iai_queue
copies and validates it. Every queue batches alike: at most ``--batch`` (256)
pairs per write, a 50 ms linger where the design has one, a bound of 4096
queued items where it has one. A peer whose package is missing is reported
``skipped: not installed`` (``pip install -e ".[bench]"`` installs them all).
After the run the provenance rows of every store are counted against what was
enqueued. Figures: p50/p99/p99.9/max (µs) per queue, iai_queue's p50 and p99
over each peer's, the p50 of the first call after each pause (a recall server
whose calls are spaced out sees this one: cold caches, or a CPU waking from idle),
the string/UUID ratio, the journal's speed-up over persist-queue (both write to
disk before the call returns; all consumers run), and the issues' targets.

    python scripts/bench_peers.py [--calls 20000] [--peers iai,otel,...] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_enqueue import measure  # noqa: E402  (the same paced bursts as the enqueue benchmark)

from iai_queue import MemoryStore, ProvenanceWriteQueue  # noqa: E402
from iai_queue.bench import (UsageError, check_output_file, percentiles, print_table,  # noqa: E402
                             report_targets, seed_store)
from iai_queue.cli import positive_int  # noqa: E402

BATCH = 256          # pairs per write, every queue
LINGER_MS = 50       # iai_queue's coalesce_ms, OTel's schedule delay
QUEUE_BOUND = 4096   # iai_queue's max_queue_size, OTel's max_queue_size, sentry's queue_size
POLL_S = 0.05        # how often an idle consumer thread checks for stop
ENTRY_TS = "2025-01-01T00:00:00+00:00"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


# -- the sink every worker writes through --------------------------------------------------


class Meter:
    """Wraps ``store.append_provenance_batch`` on the instance: time spent writing, pairs written.

    The queues look the method up at call time, so all of them write through
    it. ``wait_for(n, timeout)`` blocks until ``n`` pairs have been written.
    A write that raises is recorded in ``errors`` and re-raised.
    """

    def __init__(self, store: MemoryStore):
        self.real = store.append_provenance_batch
        self.busy_ns = 0
        self.calls = 0
        self.pairs = 0
        self.errors: list[str] = []
        self._written = threading.Condition()
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        t0 = time.perf_counter_ns()
        try:
            result = self.real(pairs, records_cache=records_cache)
        except Exception as exc:
            self.errors.append(repr(exc)[:300])
            raise
        finally:
            self.busy_ns += time.perf_counter_ns() - t0
        with self._written:
            self.calls += 1
            self.pairs += len(pairs)
            self._written.notify_all()
        return result

    def wait_for(self, pairs: int, timeout: float) -> bool:
        with self._written:
            return self._written.wait_for(lambda: self.pairs >= pairs, timeout)


def guarded(name: str, errors: list[str], work: Callable[[], None]) -> Callable[[], None]:
    """A thread target that records and prints what kills it: no harness thread dies silently."""

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(f"{name} thread died: {exc!r:.300}")
            traceback.print_exc()

    return run


def write_guarded(store: MemoryStore, errors: list[str], batch: list) -> None:
    """A peer's write: one ``append_provenance_batch``; a failure is recorded (the batch is lost, as in the peer)."""
    try:
        store.append_provenance_batch(batch)
    except Exception as exc:
        errors.append(f"write failed: {exc!r:.300}")


# -- the queues ------------------------------------------------------------------------------


class Contender:
    """One queue under test. ``enqueue`` is the callable timed; ``push`` makes it write what it holds."""

    key = ""
    label = ""
    package: Optional[str] = None  # the distribution whose version is reported
    enqueue: Callable[[list], None]

    def __init__(self, store: MemoryStore, work: Path):
        self.store = store
        self.work = work
        self.errors: list[str] = []
        self.drops = 0  # pairs the queue reported dropping (full); the harness does not wait for them

    def dropped(self) -> int:
        return self.drops

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this queue cannot run here, or None."""
        return None

    def push(self) -> None:
        """Have the worker write what it holds now (a queue with a linger writes it by itself)."""

    def settle(self, pairs: int, timeout: float) -> bool:
        """Block until the worker has finished with the first ``pairs`` pairs it wrote (work it does after
        the write, such as acknowledging), or ``timeout``; False on timeout. Work a queue does on a timer
        whatever it wrote goes on (idle consumers polling every 50 ms, the journal's checkpoint every
        second), as it would beside a host's other work."""
        return True

    def close(self, timeout: float) -> None:
        raise NotImplementedError


def _missing(module: str) -> Optional[str]:
    try:
        __import__(module)
    except ImportError:
        return "not installed"
    return None


class IaiQueue(Contender):
    key, label, package = "iai", "iai_queue ProvenanceWriteQueue.enqueue (UUID ids)", "iai_queue"
    string_ids = False
    durability = "memory"

    def __init__(self, store, work):
        super().__init__(store, work)
        self.q = ProvenanceWriteQueue(store, spill_dir=work / "spill", coalesce_ms=LINGER_MS,
                                      max_batch_pairs=BATCH, max_queue_size=QUEUE_BOUND,
                                      durability=self.durability).start()
        self.enqueue = self.q.enqueue

    def push(self) -> None:
        self.q.flush(timeout=0)  # cuts the coalescing window short; the harness waits on the rows

    def dropped(self) -> int:
        return self.q.stats().dropped

    def close(self, timeout: float) -> None:
        if not self.q.stop(timeout):
            self.errors.append(f"stop() left entries unwritten: {self.q.stats()}")


class IaiQueueStringIds(IaiQueue):
    key, label = "iai_str", "iai_queue ProvenanceWriteQueue.enqueue (str ids)"
    string_ids = True


class IaiQueueJournal(IaiQueue):
    key, label = "iai_journal", "iai_queue enqueue, durability=\"process\" (journal)"
    durability = "process"


class OtelBatchProcessor(Contender):
    key, label, package = "otel", "OpenTelemetry SDK BatchProcessor.emit", "opentelemetry-sdk"

    class Exporter:
        """OTel's Exporter protocol: ``export(batch)`` gets the oldest items first; each item is a pair list."""

        def __init__(self, write: Callable[[list], None]):
            self.write = write

        def export(self, batch: list, /):
            self.write([p for item in batch for p in item])

        def shutdown(self, timeout_millis: float = 30_000):
            pass

    class DropCounter:
        """OTel's ProcessorMetricsT: counts what ``emit`` drops (a full queue drops its oldest item)."""

        def __init__(self, owner: "OtelBatchProcessor"):
            self.owner = owner

        def register_queue_size(self, get_queue_size) -> None:
            pass

        def drop_items(self, count: int, error_type: str = "queue_full") -> None:
            self.owner.drops += count  # items are 1-pair calls here

        def finish_items(self, count: int) -> None:
            pass

    @classmethod
    def unavailable(cls) -> Optional[str]:
        if _missing("opentelemetry.sdk"):
            return "not installed"
        try:
            from opentelemetry.sdk._shared_internal import BatchProcessor  # noqa: F401
        except ImportError:
            return f"opentelemetry-sdk {metadata.version('opentelemetry-sdk')} has no BatchProcessor (needs >= 1.34)"
        return None

    def __init__(self, store, work):
        import inspect

        from opentelemetry.sdk._shared_internal import BatchProcessor

        super().__init__(store, work)
        kwargs = {}
        if "metrics" in inspect.signature(BatchProcessor).parameters:  # added after 1.34; before, drops show in rows
            kwargs["metrics"] = self.DropCounter(self)
        self.bp = BatchProcessor(self.Exporter(partial(write_guarded, store, self.errors)),
                                 schedule_delay_millis=LINGER_MS, max_export_batch_size=BATCH,
                                 export_timeout_millis=30_000, max_queue_size=QUEUE_BOUND,
                                 exporting="Provenance", **kwargs)
        self.enqueue = self.bp.emit

    def close(self, timeout: float) -> None:
        self.bp.shutdown(timeout_millis=int(timeout * 1000))


class SimpleQueueListener(Contender):
    """``queue.SimpleQueue`` + a coalescing listener, as ``logging.handlers.QueueListener`` runs one."""

    key, label, package = "simplequeue", "queue.SimpleQueue.put + coalescing listener", None
    _STOP = object()

    def __init__(self, store, work):
        super().__init__(store, work)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.enqueue = self.q.put
        self.thread = threading.Thread(target=guarded("listener", self.errors, self._listen),
                                       name="simplequeue-listener", daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        get, get_nowait, stop = self.q.get, self.q.get_nowait, self._STOP
        write = partial(write_guarded, self.store, self.errors)
        while True:
            try:
                item = get(timeout=POLL_S)  # QueueListener blocks on get(); a bounded wait, same effect
            except queue.Empty:
                continue
            if item is stop:
                return
            batch = list(item)
            while len(batch) < BATCH:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is stop:
                    write(batch)
                    return
                batch.extend(item)
            write(batch)

    def close(self, timeout: float) -> None:
        self.q.put(self._STOP)
        self.thread.join(timeout)


class SentryWorker(Contender):
    """sentry-sdk's ``BackgroundWorker``: one callback per submit, run in order on one thread.

    Sentry submits one callback per envelope, and that callback does one HTTP
    request. One LanceDB commit per call (~3 ms) would make this a queue of
    20 000 commits that drops whatever exceeds its bound, so the callback here
    adds its pairs to a batch and writes the batch when it holds ``BATCH``
    pairs (how sentry batches logs and metrics before submitting). The worker
    has no timer, so a partial batch is written by a callback the harness
    submits at the end of each segment (``push``). ``queue_size`` is raised
    from sentry's default 100 to the bound every queue here gets.
    """

    key, label, package = "sentry", "sentry-sdk BackgroundWorker.submit", "sentry-sdk"

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return _missing("sentry_sdk.worker")

    def __init__(self, store, work):
        from sentry_sdk.worker import BackgroundWorker

        super().__init__(store, work)
        self.worker = BackgroundWorker(queue_size=QUEUE_BOUND)
        self.batch: list = []  # touched by the worker thread only
        submit, add = self.worker.submit, self._add

        def enqueue(pairs: list) -> None:
            if not submit(partial(add, pairs)):
                self.drops += len(pairs)

        self.enqueue = enqueue

    def _add(self, pairs: list) -> None:
        self.batch.extend(pairs)
        if len(self.batch) >= BATCH:
            self._write()

    def _write(self) -> None:
        batch, self.batch = self.batch, []
        if batch:
            write_guarded(self.store, self.errors, batch)

    def push(self) -> None:
        if not self.worker.submit(self._write):
            self.errors.append("push: the worker's queue is full")

    def close(self, timeout: float) -> None:
        self.push()
        self.worker.flush(timeout)
        self.worker.kill()


class PersistQueueConsumer(Contender):
    """A persist-queue queue + a consumer thread: get one (waiting), drain what is there, write, acknowledge."""

    package = "persist-queue"

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return _missing("persistqueue")

    def __init__(self, store, work):
        super().__init__(store, work)
        self.q = self.open_queue(work)
        self.enqueue = self.q.put
        self.stop = threading.Event()
        self.acknowledged_pairs = 0
        self._acknowledged = threading.Condition()
        self.thread = threading.Thread(target=guarded(self.key, self.errors, self._consume),
                                       name=f"{self.key}-consumer", daemon=True)
        self.thread.start()

    def open_queue(self, work: Path):
        raise NotImplementedError

    def get(self, block: bool):
        """The next item (``Empty`` when there is none within ``POLL_S``)."""
        raise NotImplementedError

    def acknowledge(self, items: list) -> None:
        raise NotImplementedError

    def _consume(self) -> None:
        from persistqueue import Empty

        write = partial(write_guarded, self.store, self.errors)
        while not self.stop.is_set():
            try:
                items = [self.get(block=True)]
            except Empty:
                continue
            pairs = list(self.pairs_of(items[0]))
            while len(pairs) < BATCH:
                try:
                    item = self.get(block=False)
                except Empty:
                    break
                items.append(item)
                pairs.extend(self.pairs_of(item))
            write(pairs)
            self.acknowledge(items)
            with self._acknowledged:
                self.acknowledged_pairs += len(pairs)
                self._acknowledged.notify_all()

    @staticmethod
    def pairs_of(item) -> list:
        return item

    def settle(self, pairs: int, timeout: float) -> bool:
        with self._acknowledged:  # per-item acknowledgements trail each write by milliseconds
            return self._acknowledged.wait_for(lambda: self.acknowledged_pairs >= pairs, timeout)

    def close(self, timeout: float) -> None:
        self.stop.set()
        self.thread.join(timeout)


class PersistQueueFile(PersistQueueConsumer):
    key, label = "pq_file", "persist-queue Queue.put (file)"

    def open_queue(self, work: Path):
        import persistqueue

        tmp = work / "pq-tmp"
        tmp.mkdir()
        return persistqueue.Queue(str(work / "pq"), tempdir=str(tmp))  # tempdir: same filesystem, atomic rename

    def get(self, block: bool):
        return self.q.get(block=block, timeout=POLL_S if block else None)

    def acknowledge(self, items: list) -> None:
        for _ in items:
            self.q.task_done()


class PersistQueueSQLiteAck(PersistQueueConsumer):
    key, label = "pq_sqlite", "persist-queue SQLiteAckQueue.put"

    def open_queue(self, work: Path):
        import persistqueue

        return persistqueue.SQLiteAckQueue(str(work / "pq"), multithreading=True)  # put and get on two threads

    def get(self, block: bool):
        return self.q.get(block=block, timeout=POLL_S if block else None, raw=True)

    @staticmethod
    def pairs_of(item) -> list:
        return item["data"]

    def acknowledge(self, items: list) -> None:
        for item in items:  # persist-queue has no bulk ack
            self.q.ack(id=item["pqid"])

    def close(self, timeout: float) -> None:
        super().close(timeout)
        self.q.close()


CONTENDERS: dict[str, type[Contender]] = {c.key: c for c in (
    IaiQueue, IaiQueueStringIds, IaiQueueJournal, OtelBatchProcessor, SimpleQueueListener, SentryWorker,
    PersistQueueFile, PersistQueueSQLiteAck)}


def version_of(package: Optional[str]) -> str:
    if package is None:
        return f"python {sys.version.split()[0]}"
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


# -- the run -----------------------------------------------------------------------------


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_args(argv) -> argparse.Namespace:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=positive_int, default=20_000, help="enqueue calls per queue (default 20000)")
    ap.add_argument("--burst", type=positive_int, default=64, help="calls per burst (default 64)")
    ap.add_argument("--pause-ms", type=nonnegative_float, default=1.0, help="pause between bursts (default 1 ms)")
    ap.add_argument("--rounds", type=positive_int, default=4, help="interleaved segments per queue (default 4)")
    ap.add_argument("--records", type=positive_int, default=1000, help="records in each store (default 1000)")
    ap.add_argument("--dim", type=positive_int, default=384)
    ap.add_argument("--seed", type=int, default=0, help="seeds the stores' records (default 0)")
    ap.add_argument("--order-seed", type=int, default=None,
                    help="seeds the queues' order in each round (default: random, reported)")
    ap.add_argument("--peers", default=",".join(CONTENDERS),
                    help=f"comma-separated queues to run (default all: {','.join(CONTENDERS)})")
    ap.add_argument("--drain-timeout", type=nonnegative_float, default=300.0,
                    help="seconds to wait for a queue to write a segment (default 300)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.peers.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONTENDERS]
    if unknown or not keys:
        raise UsageError(f"--peers {args.peers!r}: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(CONTENDERS)}")
    args.peers = list(dict.fromkeys(keys))
    if args.order_seed is None:
        args.order_seed = random.SystemRandom().randrange(1 << 32)
    if args.rounds > args.calls:
        raise UsageError(f"--rounds {args.rounds} is more than --calls {args.calls}")
    if args.json:
        check_output_file(Path(args.json).resolve(), "--json")
    return args


def run(args: argparse.Namespace, work: Path) -> dict:
    skipped = {k: why for k in args.peers if (why := CONTENDERS[k].unavailable())}
    keys = [k for k in args.peers if k not in skipped]
    stores: dict[str, MemoryStore] = {}
    ids = None
    for k in keys:
        stores[k] = MemoryStore(work / k / "db", dim=args.dim, maintenance="never")
        ids = seed_store(stores[k], args.records, seed=args.seed, progress=False)
    meters = {k: Meter(stores[k]) for k in keys}
    queues: dict[str, Contender] = {k: CONTENDERS[k](stores[k], work / k) for k in keys}

    def make(n: int, tag: str, string_ids: bool) -> list:
        rid = [str(i) for i in ids] if string_ids else ids
        return [[(rid[i % len(rid)], {"ts": ENTRY_TS, "cue": f"{tag}{i}", "session_id": "b"})] for i in range(n)]

    enqueued = dict.fromkeys(keys, 0)
    incomplete: dict[str, str] = {}

    def segment(k: str, n: int, tag: str, out: list) -> tuple[int, int]:
        """Measure ``n`` calls into ``k``, then wait until they are written; (busy ns, wall ns) while measured."""
        lists = make(n, tag, getattr(queues[k], "string_ids", False))
        m = meters[k]
        b0, t0 = m.busy_ns, time.perf_counter_ns()
        measure(queues[k].enqueue, lists, args.burst, args.pause_ms / 1000, out)
        wall = time.perf_counter_ns() - t0
        busy = m.busy_ns - b0  # includes a write that straddles the end
        enqueued[k] += n
        queues[k].push()
        target = enqueued[k] - queues[k].dropped()
        if not m.wait_for(target, args.drain_timeout):
            incomplete.setdefault(k, f"{m.pairs} of {target} written after a {args.drain_timeout} s wait")
        elif not queues[k].settle(target, args.drain_timeout):
            incomplete.setdefault(k, f"its worker had not settled {args.drain_timeout} s after writing")
        return busy, wall

    lat: dict[str, list[int]] = {k: [] for k in keys}
    after_pause: dict[str, list[int]] = {k: [] for k in keys}  # each burst's first call
    busy = dict.fromkeys(keys, 0)
    wall = dict.fromkeys(keys, 0)
    for k in keys:  # warm-up, untimed
        segment(k, args.burst * 4, "w", [])
    per = args.calls // args.rounds
    sizes = [per + (1 if r < args.calls % args.rounds else 0) for r in range(args.rounds)]
    order = random.Random(args.order_seed)
    t_run = time.perf_counter()
    for r, n in enumerate(sizes):
        for k in order.sample(keys, len(keys)):
            seg_lat: list[int] = []
            b, w = segment(k, n, f"r{r}", seg_lat)
            lat[k] += seg_lat
            after_pause[k] += seg_lat[::args.burst]
            busy[k] += b
            wall[k] += w
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    run_s = time.perf_counter() - t_run
    for k in keys:
        queues[k].close(timeout=60)

    result: dict = {"benchmark": "peers", "config": {
        "calls": args.calls, "burst": args.burst, "pause_ms": args.pause_ms, "rounds": args.rounds,
        "records": args.records, "dim": args.dim, "seed": args.seed, "order_seed": args.order_seed,
        "batch_pairs": BATCH, "linger_ms": LINGER_MS,
        "queue_bound": QUEUE_BOUND, "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "run_s": round(run_s, 1), "queues": {}, "skipped": skipped}
    for k in keys:
        c = queues[k]
        rows = stores[k].provenance_rows()
        errors = meters[k].errors + c.errors + ([incomplete[k]] if k in incomplete else [])
        fig = percentiles(lat[k])
        fig["after_pause_p50"] = percentiles(after_pause[k]).get("p50")
        fig.update(label=c.label, version=version_of(c.package),
                   worker_busy_pct=round(100.0 * busy[k] / max(1, wall[k]), 1), writes=meters[k].calls,
                   enqueued=enqueued[k], dropped=c.dropped(), written=meters[k].pairs, rows=rows, errors=errors)
        fig["ok"] = enqueued[k] == meters[k].pairs == rows and not errors
        result["queues"][k] = fig
    qs = result["queues"]
    base = qs.get("iai")
    if base and base["n"]:
        result["iai_over"] = {k: {q: round(base[q] / v[q], 3) for q in ("p50", "p99", "p99.9", "max") if v.get(q)}
                              for k, v in qs.items() if v["n"]}
    targets = {}
    if base and base["n"]:
        if "otel" in qs:
            targets["p50_le_1.0x_otel_emit"] = result["iai_over"]["otel"]["p50"] <= 1.0
        if "simplequeue" in qs:
            targets["p50_le_1.5x_simplequeue_put"] = result["iai_over"]["simplequeue"]["p50"] <= 1.5
        targets["p99_le_5us"] = base["p99"] <= 5.0
        targets["p99.9_le_25us"] = base["p99.9"] <= 25.0
        if "iai_str" in qs:
            result["str_over_uuid"] = {q: round(qs["iai_str"][q] / base[q], 3) for q in ("p50", "p99", "p99.9")}
            targets["str_ids_le_1.5x_uuid"] = result["str_over_uuid"]["p50"] <= 1.5
    journal = qs.get("iai_journal")
    if journal and journal["n"]:
        # Issue 11: how many times faster the journal's enqueue is than persist-queue's put (p50), and
        # what the journal costs over memory mode.
        result["journal_speedup"] = {k: round(qs[k]["p50"] / journal["p50"], 1)
                                     for k in ("pq_file", "pq_sqlite") if k in qs and qs[k]["n"]}
        if base and base["n"]:
            result["journal_over_memory"] = round(journal["p50"] / base["p50"], 2)
        for k, x in result["journal_speedup"].items():
            targets[f"journal_p50_ge_100x_faster_than_{k}"] = x >= 100
        targets["journal_p50_le_2us"] = journal["p50"] <= 2.0
        targets["journal_p99_le_10us"] = journal["p99"] <= 10.0
    targets["every_queue_wrote_everything"] = all(v["ok"] for v in qs.values())
    result["targets"] = targets
    return result


def print_result(result: dict) -> None:
    cfg, qs = result["config"], result["queues"]
    print(f"enqueue of a 1-pair call: {cfg['calls']} calls per queue, bursts of {cfg['burst']} every "
          f"{cfg['pause_ms']} ms, {cfg['rounds']} interleaved rounds (order seed {cfg['order_seed']}); "
          f"each queue's worker writes into its own LanceDB store ({cfg['records']} records x {cfg['dim']}-d); "
          f"batches <= {cfg['batch_pairs']} pairs")
    over = result.get("iai_over", {})
    rows = []
    for k, v in qs.items():
        o = over.get(k, {})
        rows.append([v["label"], v["version"], v.get("p50"), v.get("p99"), v.get("p99.9"), v.get("max"),
                     v.get("after_pause_p50"), v["worker_busy_pct"], v["writes"], o.get("p50"), o.get("p99")])
    print_table(["queue", "version", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "after a pause p50 µs",
                 "worker busy %", "writes", "iai p50 / this", "iai p99 / this"], rows)
    for k, why in result["skipped"].items():
        print(f"{CONTENDERS[k].label}: skipped: {why}")
    if "str_over_uuid" in result:
        s = result["str_over_uuid"]
        print(f"string ids / UUID ids: p50 {s['p50']}x, p99 {s['p99']}x, p99.9 {s['p99.9']}x")
    if "journal_speedup" in result:
        print("journal (durability=\"process\") p50: "
              + ", ".join(f"{x}x faster than {CONTENDERS[k].label}" for k, x in result["journal_speedup"].items())
              + (f"; {result['journal_over_memory']}x memory mode" if "journal_over_memory" in result else ""))
    print("written (pairs enqueued / written by the worker / provenance rows in its store):")
    for k, v in qs.items():
        dropped = f" ({v['dropped']} dropped by the queue: full)" if v["dropped"] else ""
        print(f"  {k:12} {v['enqueued']} / {v['written']} / {v['rows']} -> {'OK' if v['ok'] else 'MISMATCH'}{dropped}"
              + "".join(f"\n    {e}" for e in v["errors"]))


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"bench_peers.py: error: {exc}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="iai-bench-peers-"))
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_result(result)
    report_targets(result, args.json)
    return 0 if result["targets"]["every_queue_wrote_everything"] else 1


if __name__ == "__main__":
    sys.exit(main())
