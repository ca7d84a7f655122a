"""Recovery replay of a dead writer's journal: entries/s and the replaying process's peak RSS (issue 11).

    python scripts/bench_journal_recovery.py [--entries 1000000] [--repeat 3] [--pairs-per-call 1]
                                             [--checkpoint-fraction 0] [--profile]

A writer journals ``--entries`` one-pair enqueue calls (as ``durability="process"``
does) and goes away without its store having any of them. Then a spawned child
that does nothing but the replay (``JournalReplayer.for_store(...).replay_all``)
opens the store, replays, and reports its wall time and ``ru_maxrss`` — so the
peak RSS is the replay's, not the writer's. Every entry is then counted in the
provenance table (``store.provenance_rows()``). ``--checkpoint-fraction`` puts
the writer's checkpoint that far into the journal (the store is given those
entries first), as after a crash of a writer that had kept up. ``--profile``
runs one replay in this process under cProfile instead.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIM = 8
PREFIX = "qbench-"


def entry(k: int) -> dict:
    return {"tool": "memory_recall", "query": "what did we decide", "k": 10, "n": k}


def write_dead_journal(d: Path, entries: int, pairs_per_call: int, checkpoint_fraction: float) -> int:
    """A store with 16 records and a dead writer's journal of ``entries`` pairs; returns the checkpoint seq."""
    from iai_queue import MemoryRecord, MemoryStore
    from iai_queue.journal import Durability, JournalWriter, write_checkpoint
    from iai_queue.pairs import ProvenanceBatch
    from iai_queue.spill import SpillDirectory

    store = MemoryStore(d / "db", dim=DIM, maintenance="never")
    ids = [uuid.uuid4() for _ in range(16)]
    store.insert_many([MemoryRecord(id=i, text="r", embedding=[0.1] * DIM) for i in ids])
    sd = SpillDirectory(d / "spill", store_path=store.path, tag=store.identity)
    w = JournalWriter(sd, PREFIX, Durability.PROCESS)
    w.open()
    calls = entries // pairs_per_call
    done_calls = int(calls * checkpoint_fraction)
    landed_pairs, landed_ids = [], []
    k = 0
    with w.lock:
        for seq in range(1, calls + 1):
            items = tuple((ids[(k + i) % len(ids)], entry(k + i)) for i in range(pairs_per_call))
            w.append_locked(seq, items)
            if seq <= done_calls:
                landed_pairs.extend(items)
                landed_ids.extend(f"{PREFIX}{seq:x}.{i}" for i in range(pairs_per_call))
            k += pairs_per_call
    for start in range(0, len(landed_pairs), 50000):
        store.append_provenance_batch(ProvenanceBatch(landed_pairs[start:start + 50000],
                                                      landed_ids[start:start + 50000]))
    if done_calls:
        write_checkpoint(sd.path, sd.writer, done_calls)
    for s in w.segments:
        os.close(s.fd)
    sd.release()  # the writer is gone: its lock is free
    store.close()
    return done_calls


def replay_child(d: str, out) -> None:
    """Spawned: open the store, replay every orphan journal, report time and peak RSS."""
    from iai_queue import MemoryStore
    from iai_queue.writebehind.journal_replay import JournalReplayer
    from iai_queue.writebehind.lifecycle import StopSignal

    store = MemoryStore(Path(d) / "db", dim=DIM, maintenance="never")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    replayer = JournalReplayer.for_store(store, Path(d) / "spill")
    segments = replayer.replay_all(StopSignal())
    took = time.perf_counter() - t0
    out.send({"seconds": took, "segments": segments, "replayed": replayer.ledger.n["replayed"],
              "rss_before_mib": rss0 / 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def write_in_child(d: Path, entries: int, pairs_per_call: int, checkpoint_fraction: float) -> int:
    """The writer is another process (as after a crash): its pid is not the replayer's."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(write_dead_journal, (d, entries, pairs_per_call, checkpoint_fraction))


def one_run(entries: int, pairs_per_call: int, checkpoint_fraction: float) -> dict:
    from iai_queue import MemoryStore

    with tempfile.TemporaryDirectory() as d:
        done_calls = write_in_child(Path(d), entries, pairs_per_call, checkpoint_fraction)
        ctx = multiprocessing.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=replay_child, args=(d, send))
        p.start()
        send.close()
        r = recv.recv()
        p.join(60)
        rows = MemoryStore(Path(d) / "db", dim=DIM, maintenance="never").provenance_rows()
        assert rows == entries, f"{rows} provenance rows for {entries} journaled entries"
        suffix = entries - done_calls * pairs_per_call
        r["entries_per_s"] = suffix / r["seconds"]
        r["suffix_entries"] = suffix
        return r


def profile(entries: int, pairs_per_call: int, checkpoint_fraction: float) -> None:
    import cProfile
    import pstats

    from iai_queue import MemoryStore
    from iai_queue.writebehind.journal_replay import JournalReplayer
    from iai_queue.writebehind.lifecycle import StopSignal

    with tempfile.TemporaryDirectory() as d:
        write_in_child(Path(d), entries, pairs_per_call, checkpoint_fraction)
        store = MemoryStore(Path(d) / "db", dim=DIM, maintenance="never")
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        JournalReplayer.for_store(store, Path(d) / "spill").replay_all(StopSignal())
        prof.disable()
        took = time.perf_counter() - t0
        print(f"{entries} entries in {took:.2f} s (under cProfile): {entries / took:,.0f} entries/s")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=positive, default=1_000_000)
    ap.add_argument("--repeat", type=positive, default=3)
    ap.add_argument("--pairs-per-call", type=positive, default=1)
    ap.add_argument("--checkpoint-fraction", type=float, default=0.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not 0.0 <= args.checkpoint_fraction < 1.0:
        ap.error(f"--checkpoint-fraction must be in [0, 1), got {args.checkpoint_fraction}")
    if args.profile:
        profile(args.entries, args.pairs_per_call, args.checkpoint_fraction)
        return 0
    runs = [one_run(args.entries, args.pairs_per_call, args.checkpoint_fraction) for _ in range(args.repeat)]
    print(f"recovery replay of {args.entries:,} journaled entries ({args.pairs_per_call} per call, "
          f"checkpoint at {args.checkpoint_fraction:.0%}), {args.repeat} runs, median (min–max); every entry counted "
          f"in the provenance table")
    print(f"  entries/s      {spread([r['entries_per_s'] for r in runs])}  (target >= 300,000)")
    print(f"  seconds        {spread([r['seconds'] for r in runs], '.2f')}")
    print(f"  peak RSS MiB   {spread([r['peak_rss_mib'] for r in runs], '.0f')}  "
          f"(replaying child; {spread([r['rss_before_mib'] for r in runs], '.0f')} before the replay)")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
