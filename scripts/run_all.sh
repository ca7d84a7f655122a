#!/bin/sh
# Every benchmark of BENCHMARKS.md, one after the other (never in parallel: 2 cores). JSON into ${OUT:-bench-results}/.
set -e
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
iai-queue bench --json "$OUT/recall.json"
$PY scripts/bench_enqueue.py --json "$OUT/enqueue.json"
$PY scripts/bench_drain.py --json "$OUT/drain.json"
$PY scripts/bench_overflow.py --json "$OUT/overflow.json"
$PY scripts/bench_get.py --json "$OUT/get.json"
$PY scripts/bench_memory.py --seconds "${SECONDS_MEM:-60}" --json "$OUT/memory.json"
# Issue 10; the peers come from the bench extra (pip install -e ".[bench]"), a missing one is skipped.
$PY scripts/bench_peers.py --json "$OUT/peers.json"
$PY scripts/bench_tail.py --json "$OUT/tail.json"
$PY scripts/bench_alloc.py --json "$OUT/alloc.json"
$PY scripts/bench_drain_backlog.py --json "$OUT/drain-backlog.json"
