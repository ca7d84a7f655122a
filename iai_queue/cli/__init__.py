"""The ``iai-queue`` command: ``bench`` (the main job), ``serve`` (an MCP memory server) and ``spill`` (operator tools).

Exit codes: 0 ok, 1 something needs attention, 2 usage error. Errors are one
line on stderr, never a traceback; usage errors are found before any long work.

The parts: :mod:`.args` (argument types, the one-line-error parser),
:mod:`.output` (what the operator reads), :mod:`.spill_paths` (``--dir``, ``FILE``),
:mod:`.spill_commands` (``spill status``, ``inspect``, ``requeue``), :mod:`.spill_replay`
(``spill replay``);
``bench`` and ``serve`` live in :mod:`iai_queue.bench` and :mod:`iai_queue.server`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .args import (Parser, add_storage_option_argument, nonempty_path, nonempty_text, plain_text, positive_int,
                   storage_options_of)
from .spill_commands import SPILL_DOC, add_spill_commands, run_spill

__all__ = ["main", "build_parser", "plain_text", "positive_int", "nonempty_path", "nonempty_text",
           "add_storage_option_argument", "storage_options_of"]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("iai_queue")
    except Exception:  # not installed (run from a checkout): the package's own number
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from .. import bench, server

    parser = Parser(prog="iai-queue", description=plain_text(__doc__.split("\n\n")[0]))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.add_arguments(sub.add_parser("bench", help="benchmark enqueue and recall latency",
                                       description=plain_text(bench.__doc__.split("\n\n")[0])))
    serve = sub.add_parser("serve", help="run the reference MCP memory server (stdio by default)",
                           description=plain_text(server.__doc__.split("\n\n")[0]))
    server.add_arguments(serve)
    add_storage_option_argument(serve)  # a store on object storage (--store s3://…)
    spill = sub.add_parser("spill", help="inspect and repair the spill directory", description=SPILL_DOC,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spill_commands(spill)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .. import bench

        return bench.run(args)
    if args.command == "serve":
        from .. import server

        return server.run(args)
    if args.command == "spill":
        return run_spill(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
