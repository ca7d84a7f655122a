"""Benchmark the provenance queue against synchronous and no-op writes, in one run.

(Placeholder: being written.)
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--records", type=int, default=10_000, metavar="N", help="records to seed (default 10000)")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("iai-queue bench: not written yet")
