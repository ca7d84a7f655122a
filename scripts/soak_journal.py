"""Soak: SIGKILL a journaling child at random moments, N times, with store outages and overflow.

    python scripts/soak_journal.py --kills 50 [--seed 1]

Each child opens the same store and spill directory (durability="process",
max_queue_size=16, a store that fails for random stretches) and enqueues
numbered entries; after each kill a new child goes on (and recovers the dead
one's journal). At the end a queue of this process replays what is left, and
every entry whose enqueue had returned must be in the store exactly once
(provenance rows counted), in order per record. Exits 1 on any loss,
duplicate or reorder. The test suite runs the same check with 8 kills.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import make_records  # noqa: E402
from test_journal import check_landed, drain, kill_run  # noqa: E402

from iai_queue import MemoryStore  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = MemoryStore(Path(d) / "db", dim=8)
        recs = make_records(6)
        store.insert_many(recs)
        ids = [r.id for r in recs]
        spill_dir = Path(d) / "spill"
        t0 = time.monotonic()
        acked = kill_run(store, ids, spill_dir, kills=args.kills, seed=args.seed)
        drain(store, spill_dir, timeout=120)
        try:
            rows = check_landed(store, ids, acked)
        except AssertionError as exc:
            print(f"FAIL after {args.kills} kills: {exc}")
            return 1
        finally:
            store.close()  # its background maintenance stops before the directory goes
        print(f"OK: {args.kills} SIGKILLs, {sum(v + 1 for v in acked.values())} acked entries, {rows} rows, "
              f"no loss, no duplicate, order kept ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
