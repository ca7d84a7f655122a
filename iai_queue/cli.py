"""The ``iai-queue`` command: ``bench`` (the main job) and ``spill`` (operator tools).

Exit codes: 0 ok, 1 something needs attention, 2 usage error. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(prog="iai-queue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.add_arguments(sub.add_parser("bench", help="benchmark enqueue and recall latency",
                                       description=bench.__doc__.splitlines()[0]))
    spill = sub.add_parser("spill", help="inspect and repair the spill directory")
    spill.add_subparsers(dest="spill_command", required=True, metavar="SUBCOMMAND")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from . import bench

        return bench.run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
