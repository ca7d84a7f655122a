"""Which spill directory and which file the operator means (``--dir``, ``FILE``).

Guarantee: ``--dir`` defaults to ``$IAI_QUEUE_SPILL_DIR``, else
``~/.iai-mcp/.provenance-overflow``; a path in the way that is not a directory,
or a ``FILE`` that does not exist or is not a file, is a one-line error naming it.
A bare file name is looked up in the spill directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .output import Fail

__all__ = ["spill_dir_of", "find_file"]


def spill_dir_of(args: argparse.Namespace) -> Path:
    from ..spill import default_spill_dir

    path = args.dir if args.dir is not None else default_spill_dir()
    if path.exists() and not path.is_dir():
        raise Fail(f"spill directory {str(path)!r} is not a directory")
    return path


def find_file(args: argparse.Namespace) -> Path:
    path: Path = args.file
    if not path.exists() and path.parent == Path("."):
        candidate = spill_dir_of(args) / path
        if candidate.exists():
            path = candidate
    if not path.exists():
        raise Fail(f"no such file: {str(args.file)!r}")
    if not path.is_file():
        raise Fail(f"{str(path)!r} is not a file")
    return path
