"""Spill file names: where the directory is, what state a name says, which store and writer it belongs to.

The name on disk is the state (forward only)::

    .<name>.tmp  ->  <ts_ns>-<store>-<writer>-<n>.jsonl  ->  <stem>.claimed  ->  removed
       TMP              PENDING                              CLAIMED
                                  (bad lines)  ->  <stem>.failed-<unix_ts>.jsonl   QUARANTINED

Journal segments (write-ahead mode, :mod:`iai_queue.journal`) live here too,
named ``<ts>-<store>-<writer>-<n>.wal`` (JOURNAL) under the same writer lock;
their damaged spans are set aside as ``<stem>.failed-<unix_ts>.wal`` (QUARANTINED).

``<ts_ns>`` orders files oldest first; ``<store>`` is a hash of the store path,
so processes of one user with different stores can share the directory;
``<writer>`` names one live queue. Quarantined pairs of a queue (poison,
unencodable) are named ``<ts>-<store>-<writer>-<n>-<kind>.failed-<unix_ts>.jsonl``,
so a repaired file requeues into its own store only. Every other ``*.jsonl`` (an older writer's,
a hand-made one) is PENDING too, for any store.
"""

from __future__ import annotations

import hashlib
import os
import re
from enum import Enum
from pathlib import Path
import secrets
from typing import NamedTuple, Optional

from ..location import StoreLocation

__all__ = ["FileState", "is_writer_of_this_process", "new_writer_name", "SpillName", "default_spill_dir", "file_state", "is_journal_name", "is_pending_name", "is_quarantined_name",
           "parse_name", "stem_of", "store_tag"]

_FAILED = re.compile(r"\.failed-\d+\.(?:jsonl|wal)$")
_OURS = re.compile(r"^(?P<ts>\d{19})-(?P<store>[0-9a-f]{8})-(?P<writer>w[0-9a-z]+)-(?P<n>\d+)(?:-(?P<kind>[a-z]+))?$")
TMP_SUFFIX = ".jsonl.tmp"
JOURNAL_SUFFIX = ".wal"


class FileState(Enum):
    TMP = "tmp"  # being written (or its writer died mid-write)
    PENDING = "pending"  # waiting for replay
    CLAIMED = "claimed"  # being replayed (or its replayer died)
    QUARANTINED = "quarantined"  # set aside for an operator
    JOURNAL = "journal"  # a write-ahead journal segment (replayed once its writer is gone)


class SpillName(NamedTuple):
    """The parts of a name this library wrote."""

    ts: int
    store: str
    writer: str
    n: int
    kind: Optional[str] = None  # quarantined pairs: "poison" or "unencodable"


def default_spill_dir() -> Path:
    env = os.environ.get("IAI_QUEUE_SPILL_DIR")
    return Path(env) if env else Path.home() / ".iai-mcp" / ".provenance-overflow"


def store_tag(store_path: os.PathLike[str] | str | None) -> str:
    """Eight hex digits naming a store, for spill file names: its
    :attr:`StoreLocation.identity <iai_queue.location.StoreLocation.identity>` (of the resolved path, or of
    an object-store URI without its credentials), the tag a queue of that store writes."""
    if store_path is None:
        return "00000000"
    try:
        return StoreLocation.parse(store_path).identity
    except ValueError:  # not a location a store could have (an unknown scheme): a tag all the same
        return hashlib.sha1(str(Path(store_path).resolve()).encode()).hexdigest()[:8]


def is_pending_name(name: str) -> bool:
    return name.endswith(".jsonl") and not name.startswith(".") and not _FAILED.search(name)


def is_journal_name(name: str) -> bool:
    return name.endswith(JOURNAL_SUFFIX) and not name.startswith(".") and not _FAILED.search(name)


def is_quarantined_name(name: str) -> bool:
    return not name.startswith(".") and bool(_FAILED.search(name))


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def stem_of(name: str) -> str:
    """``name`` without ``.jsonl`` / ``.claimed``."""
    for suffix in (".jsonl", ".claimed", JOURNAL_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def quarantined_stem(name: str) -> str:
    """The stem of a quarantined file's name (before ``.failed-<ts>.jsonl``)."""
    m = _FAILED.search(name)
    return name[: m.start()] if m else stem_of(name)


def parse_name(stem: str) -> Optional[SpillName]:
    """The parts of a stem this library wrote, or None for anyone else's."""
    m = _OURS.match(stem)
    return None if m is None else SpillName(int(m["ts"]), m["store"], m["writer"], int(m["n"]), m["kind"])


def file_state(name: str) -> Optional[tuple[FileState, str]]:
    """``(state, stem)`` for a spill directory entry; None for anything else (locks, reasons, parts)."""
    if is_tmp_name(name):
        return FileState.TMP, stem_of(name[1:-len(".tmp")])
    if is_quarantined_name(name):
        return FileState.QUARANTINED, quarantined_stem(name)
    if name.endswith(".claimed") and not name.startswith("."):
        return FileState.CLAIMED, stem_of(name)
    if is_pending_name(name):
        return FileState.PENDING, stem_of(name)
    if is_journal_name(name):
        return FileState.JOURNAL, stem_of(name)
    return None


def file_stem(ts: int, store: str, writer: str, n: int, kind: Optional[str] = None) -> str:
    return f"{ts:019d}-{store}-{writer}-{n:06d}" + (f"-{kind}" if kind else "")


def file_name(ts: int, store: str, writer: str, n: int) -> str:
    return file_stem(ts, store, writer, n) + ".jsonl"


def writer_lock_name(writer: str) -> str:
    return f".writer-{writer}.lock"


REPLAY_LOCK = ".replay.lock"


# Writer names this process made. A pid is no test: containers restart a server with the same
# pid, and a dead writer's files would then pass for this process's and wait forever.
_WRITERS_OF_THIS_PROCESS: set[str] = set()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WRITERS_OF_THIS_PROCESS.clear)


def new_writer_name() -> str:
    """A fresh writer name (``w<pid>x<random>``), remembered as one of this process's."""
    name = f"w{os.getpid()}x{secrets.token_hex(4)}"
    _WRITERS_OF_THIS_PROCESS.add(name)
    return name


def is_writer_of_this_process(writer: str) -> bool:
    """Whether a queue of this process wrote under ``writer`` (alive whatever its lock says: a
    stopped queue releases its lock, yet may still be writing a late spill)."""
    return writer in _WRITERS_OF_THIS_PROCESS
