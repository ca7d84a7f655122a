"""The spill line format: one provenance pair per line.

::

    {"id": "<canonical uuid>", "entry": {...}, "eid": "<entry id>", "seen": 1}

``id`` and ``entry`` are required. ``eid`` (the entry id the store dedupes on)
and ``seen`` (1: the pair may already be in the store, verify before applying)
are ours; a line from an older writer without ``eid`` gets the stable identity
``<original stem>:<line number>`` and is always verified. A line that cannot be
parsed is a :class:`BadLine`, kept byte for byte with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional
from uuid import UUID

__all__ = ["MAX_LINE_BYTES", "BadLine", "ParsedSpill", "SpillLine", "encode_line", "parse_file", "parse_line",
           "read_lines"]

MAX_LINE_BYTES = 1 << 20  # a longer line is quarantined, not parsed


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
    """One spill line; raises TypeError/ValueError for an entry JSON cannot hold."""
    obj = {"id": str(record_id), "entry": entry, "eid": entry_id}
    if seen:
        obj["seen"] = 1
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def unencodable_line(record_id: UUID, entry: dict, entry_id: str) -> bytes:
    """A readable stand-in for a pair JSON cannot hold, for its quarantine file."""
    return (repr({"id": str(record_id), "entry": entry, "eid": entry_id}) + "\n").encode()


_decode_json = json.JSONDecoder().decode  # json.loads minus its per-call setup: replay parses every line


def parse_line(raw: bytes, identity: Optional[str] = None, *, stem: str = "", lineno: int = 0) -> SpillLine | str:
    """A parsed line, or the reason it is bad.

    ``identity`` (else ``"<stem>:<lineno>"``) is the entry id of a line that has none.
    """
    parsed = _parse(raw, identity, stem, lineno)
    return parsed if parsed.__class__ is str else SpillLine(*parsed, raw)


def _parse(raw: bytes, identity: Optional[str], stem: str, lineno: int) -> tuple[UUID, dict, str, bool] | str:
    if len(raw) > MAX_LINE_BYTES:
        return f"line of {len(raw)} bytes exceeds {MAX_LINE_BYTES}"
    try:
        obj = _decode_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
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


def read_lines(f) -> Iterator[tuple[int, bytes, int]]:
    """``(lineno, raw, length)`` per line. A line over MAX_LINE_BYTES comes back cut to
    its first MAX_LINE_BYTES + 1 bytes (the rest is skipped, not held in memory)."""
    lineno = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        length = len(raw)
        if length > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while True:
                chunk = f.readline(MAX_LINE_BYTES)
                length += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
        yield lineno, raw, length


def parse_file(path: Path, original_stem: str) -> ParsedSpill:
    """Every line of a spill file, good ones as pairs, bad ones kept with their reason."""
    out = ParsedSpill()
    pairs, entry_ids, bad = out.pairs, out.entry_ids, out.bad
    seen = False
    with open(path, "rb") as f:
        for lineno, raw, length in read_lines(f):
            if length > MAX_LINE_BYTES:
                bad.append(BadLine(lineno, raw[:4096] + b"\n", f"line of {length} bytes exceeds {MAX_LINE_BYTES} "
                                   "(only its first 4096 bytes are kept here)"))
                continue
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
