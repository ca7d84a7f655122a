"""A writer's high-water mark: every enqueue call numbered up to it is done (in the store,
quarantined, or counted dropped) — the ledger's done-watermark (``written_seq``).

Stored as ``.wal-<writer>.checkpoint`` in the journal's directory, written
atomically (temporary file, rename). Recovery skips records at or below it,
so it replays only the suffix; what follows it is replayed with every entry
id verified against the store, so a stale or missing checkpoint costs time,
never a duplicate. A checkpoint that cannot be read counts as 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..jsoncodec import decode, encode

__all__ = ["checkpoint_name", "read_checkpoint", "remove_checkpoint", "write_checkpoint"]


def checkpoint_name(writer: str) -> str:
    return f".wal-{writer}.checkpoint"


def write_checkpoint(directory: Path, writer: str, done_seq: int) -> None:
    path = directory / checkpoint_name(writer)
    tmp = directory / f".{path.name}.{os.getpid()}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, encode({"writer": writer, "done_seq": done_seq}))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_checkpoint(directory: Path, writer: str) -> int:
    try:
        obj = decode((directory / checkpoint_name(writer)).read_bytes())
        value = obj["done_seq"]
        return value if type(value) is int and value >= 0 else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def remove_checkpoint(directory: Path, writer: str) -> None:
    try:
        os.unlink(directory / checkpoint_name(writer))
    except OSError:
        pass
