"""What the operator reads: one-line errors on stderr, results on stdout, and figures in human units.

Guarantee: an error is one line on stderr (:class:`Fail` carries it; exit 1),
never a traceback; results go to stdout only.
"""

from __future__ import annotations

import sys
from typing import Optional

__all__ = ["Fail", "out", "err", "age", "size", "plural", "store_label"]


class Fail(Exception):
    """A one-line error for stderr; exit code 1."""


def out(text: str = "") -> None:
    print(text, file=sys.stdout)


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def store_label(tag: Optional[str], locations: dict[str, str]) -> str:
    if tag is None:
        return "any store (file not named by this library)"
    return f"{locations[tag]} ({tag})" if tag in locations else f"store {tag} (location not recorded)"
