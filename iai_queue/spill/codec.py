"""The spill line format: one provenance pair per line.

::

    {"id": "<canonical uuid>", "entry": {...}, "eid": "<entry id>", "seen": 1}

``id`` and ``entry`` are required. ``eid`` (the entry id the store dedupes on)
and ``seen`` (1: the pair may already be in the store, verify before applying)
are ours; a line from an older writer without ``eid`` gets the stable identity
``<original stem>:<line number>`` and is always verified. A line that cannot be
parsed is a :class:`BadLine`, kept whole, byte for byte, with its reason.

Lines have no size limit: any entry the queue accepted survives a spill and its
replay byte for byte (the directory is private to its user, see
:func:`iai_queue.spill.directory.ensure_private_dir`). Entries are encoded with
the package's one codec (:mod:`iai_queue.jsoncodec`), as the store encodes them.
Line numbers are 1-based and count every line, blank ones included, everywhere
(replay, ``.reason`` files, ``iai-queue spill inspect``).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional
from uuid import UUID

from ..jsoncodec import decode, encode

__all__ = ["BadLine", "ParsedSpill", "SpillLine", "encode_line", "parse_file", "parse_line",
           "read_lines"]



class SpillLine(NamedTuple):
    """A good spill line. A NamedTuple: a replay builds one per line."""

    record_id: UUID
    entry: dict
    entry_id: str
    seen: bool
    raw: bytes


@dataclass(frozen=True)
class BadLine:
    lineno: int  # 1-based; 0 for the whole file
    raw: bytes
    reason: str


@dataclass
class ParsedSpill:
    """A spill file's good lines as parallel lists (no object per line: replay is bulk work)."""

    pairs: list[tuple[UUID, dict]] = field(default_factory=list)
    entry_ids: list[str] = field(default_factory=list)
    seen: bool = False  # some good line may already be in the store
    bad: list[BadLine] = field(default_factory=list)


def encode_line(record_id: UUID, entry: dict, entry_id: str, seen: bool) -> bytes:
    """One spill line; raises TypeError for an entry JSON cannot hold."""
    obj = {"id": str(record_id), "entry": entry, "eid": entry_id}
    if seen:
        obj["seen"] = 1
    return encode(obj) + b"\n"


def unencodable_line(record_id: UUID, entry: dict, entry_id: str) -> bytes:
    """A pair the codec cannot hold, for its quarantine file (one line): JSON where the
    standard library can still write it (nesting the codec refuses), else a readable stand-in."""
    obj = {"id": str(record_id), "entry": entry, "eid": entry_id}
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError, RecursionError):
        pass
    try:
        text = repr(obj)
    except RecursionError:
        text = repr({"id": str(record_id), "entry": "<nested too deep to show>", "eid": entry_id})
    return text.replace("\n", "\\n").encode("utf-8", "backslashreplace") + b"\n"


def parse_line(raw: bytes, identity: Optional[str] = None, *, stem: str = "", lineno: int = 0) -> SpillLine | str:
    """A parsed line, or the reason it is bad.

    ``identity`` (else ``"<stem>:<lineno>"``) is the entry id of a line that has none.
    """
    parsed = _parse(raw, identity, stem, lineno)
    return parsed if parsed.__class__ is str else SpillLine(*parsed, raw)


def _parse(raw: bytes, identity: Optional[str], stem: str, lineno: int) -> tuple[UUID, dict, str, bool] | str:
    try:
        obj = decode(raw)
    except ValueError as exc:
        try:  # an older writer's NaN/Infinity (not standard JSON): read, and stored as null by the codec
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return f"not JSON: {exc}"
    if not isinstance(obj, dict):
        return f"not an object: {type(obj).__name__}"
    rid, entry = obj.get("id"), obj.get("entry")
    if not isinstance(rid, str):
        return f"'id' missing or not a string: {rid!r}"[:200]
    # UUID() also takes braces, "urn:uuid:" and no hyphens: only the canonical form is a spill id.
    if len(rid) != 36 or rid[8] != "-" or rid[13] != "-" or rid[18] != "-" or rid[23] != "-":
        return f"'id' is not a UUID in canonical form: {rid!r}"[:200]
    try:
        uid = UUID(rid)
    except ValueError:
        return f"'id' is not a UUID in canonical form: {rid!r}"[:200]
    if not isinstance(entry, dict):
        return f"'entry' missing or not an object: {type(entry).__name__}"
    eid = obj.get("eid")
    if eid is not None and not isinstance(eid, str):
        return f"'eid' is not a string: {eid!r}"[:200]
    # No eid (an older writer): nothing tells whether the line landed before, so verify it.
    if not eid:
        eid = identity if identity is not None else f"{stem}:{lineno}"
        return uid, entry, eid, True
    return uid, entry, eid, "seen" in obj and bool(obj["seen"])


def read_lines(f) -> Iterator[tuple[int, bytes]]:
    """``(lineno, raw)`` per line, whole, 1-based."""
    for lineno, raw in enumerate(f, 1):
        yield lineno, raw


def open_regular(path: Path):
    """``path`` opened for reading, binary, only if it is a regular file: never follows a symlink,
    never blocks on a FIFO. Raises OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path.name} is not a regular file (mode {stat.filemode(mode)}): not read")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def parse_file(path: Path, original_stem: str) -> ParsedSpill:
    """Every line of a spill file, good ones as pairs, bad ones kept whole with their reason."""
    out = ParsedSpill()
    pairs, entry_ids, bad = out.pairs, out.entry_ids, out.bad
    seen = False
    with open_regular(path) as f:
        for lineno, raw in read_lines(f):
            if raw.isspace():
                continue
            parsed = _parse(raw, None, original_stem, lineno)
            if parsed.__class__ is str:
                bad.append(BadLine(lineno, raw if raw.endswith(b"\n") else raw + b"\n", parsed))
            else:
                uid, entry, eid, line_seen = parsed
                pairs.append((uid, entry))
                entry_ids.append(eid)
                seen = seen or line_seen
    out.seen = seen
    if not pairs and not bad:
        bad.append(BadLine(0, b"", "empty file"))
    return out
