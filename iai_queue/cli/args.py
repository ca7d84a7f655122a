"""Argument types and the parser class of the ``iai-queue`` command, shared by its subcommands and the scripts.

Guarantee: a bad argument is a usage error found while parsing — one line on
stderr naming the bad value, exit 2 — before any long work begins; a
``--storage-option`` value (maybe a secret) is never echoed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import NoReturn, Optional

__all__ = ["Parser", "plain_text", "nonempty_text", "positive_int", "nonempty_path", "add_storage_option_argument",
           "storage_option", "storage_options_of"]

_REST_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`~?([^`]+)`")


def plain_text(doc: str) -> str:
    """reStructuredText markup (``literal``, :role:`target`) as plain text, for --help."""
    return _REST_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], doc).replace("``", "")


def nonempty_text(text: str) -> str:
    """An argparse type: any non-empty string (a path or a URI)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonempty_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (an empty path would mean the current directory)")
    return Path(text).expanduser()


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2 (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_storage_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        type=storage_option, metavar="KEY=VALUE",
                        help="an object-store setting passed to LanceDB (repeatable), e.g. endpoint=http://host:9000")


def storage_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        # never echo the text: the value may be a secret
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {key.strip()[:40]!r}"
                                         f"{'' if sep else ' with no ='}")
    return key.strip(), value


def storage_options_of(args: argparse.Namespace) -> Optional[dict[str, str]]:
    """``--storage-option`` pairs as a dict (a later key wins); None when none were given."""
    pairs = getattr(args, "storage_options", None) or []
    return dict(pairs) if pairs else None
