"""Quarantine files: what could not be written, set aside for an operator with the reasons beside it.

Guarantee: lines that cannot be parsed or that the store rejects go to
``<stem>.failed-<unix_ts>.jsonl`` (the raw lines, so an operator can repair
them and ``iai-queue spill requeue`` the file), with the reasons in
``<stem>.failed-<unix_ts>.reason``; a damaged journal's bytes go, byte for
byte, to ``<stem>.failed-<unix_ts>.wal``. Each is written durably
(:mod:`.durable`) under a name no other quarantine file has. Nothing is ever
deleted unread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Optional

from .codec import BadLine
from .durable import atomic_write, ensure_private_dir, fsync_dir

__all__ = ["quarantine_lines", "quarantine_bytes", "quarantine_whole"]


def _free_target(path: Path, stem: str, suffix: str) -> Path:
    """``<stem>.failed-<unix_ts><suffix>`` that no quarantine file has yet (the directory made if need be)."""
    ensure_private_dir(path)
    ts = int(time.time())
    while (path / f"{stem}.failed-{ts}{suffix}").exists():
        ts += 1
    return path / f"{stem}.failed-{ts}{suffix}"


def quarantine_lines(path: Path, stem: str, bad: Iterable[BadLine], whole: Optional[Path] = None) -> Path:
    """Set bad lines aside as ``<stem>.failed-<unix_ts>.jsonl`` plus a ``.reason`` file.

    ``whole``: move that file there as it is (nothing in it was good).
    """
    bad = list(bad)
    target = _free_target(path, stem, ".jsonl")  # a poison pair may come before any spill
    # Numbered as in the quarantine file (as ``iai-queue spill inspect`` numbers it), with the
    # line's number in the file it came from.
    reasons = "".join(
        f"line {i}: {b.reason}" + (f" (line {b.lineno} of {stem})" if b.lineno else "") + "\n"
        if whole is None else (f"line {b.lineno}: {b.reason}\n" if b.lineno else f"file: {b.reason}\n")
        for i, b in enumerate(bad, 1))
    atomic_write(target.with_suffix(".reason"), reasons.encode())
    if whole is not None:
        os.rename(whole, target)
    else:
        atomic_write(target, b"".join(b.raw for b in bad))
    fsync_dir(path)
    return target


def quarantine_whole(path: Path, stem: str, src: Path, reason: str, suffix: str) -> Path:
    """Move ``src`` aside, unread, as ``<stem>.failed-<unix_ts><suffix>`` plus a ``.reason`` file."""
    target = _free_target(path, stem, suffix)
    atomic_write(target.with_suffix(".reason"), f"file: {reason}\n".encode())
    os.rename(src, target)
    fsync_dir(path)
    return target


def quarantine_bytes(path: Path, stem: str, data: bytes, reasons: str, suffix: str = ".wal") -> Path:
    """Set raw bytes aside, byte for byte, as ``<stem>.failed-<unix_ts><suffix>`` plus a ``.reason`` file."""
    target = _free_target(path, stem, suffix)
    atomic_write(target.with_suffix(".reason"), reasons.encode())
    atomic_write(target, data)
    fsync_dir(path)
    return target
