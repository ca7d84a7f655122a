"""Reading a segment back: every complete record in order, and every damaged span with its reason.

Torn-record policy (what "after the damage" means)
    A record is good when its frame is complete, its CRC-32 matches, and its
    payload is ``[seq, [[record_id, entry], ...]]`` with ``seq`` above the
    previous good record's. At the first record that is not, the reader
    reports :class:`Damage` from that offset and *resynchronises* as LevelDB's
    log reader does after a bad block: it looks at every later byte offset for
    the next good record (complete frame, matching checksum, valid payload,
    larger seq) and goes on from there. The damaged span — the bytes between
    the two — is reported byte for byte for quarantine; records after it are
    read as usual. With no good record after it, the damage runs to the end
    of the file (a torn tail: the writer died inside a write, or the machine
    lost power before the page cache reached the disk).

Version 2 segments end in zeros (the preallocated, unused rest, see
:mod:`.format`): the data ends at a zero length whose every following byte is
zero. A torn record there spans what its frame claims (``8 + length`` bytes,
cut at the file's end); the zeros after it are unused space, not damage, so
only the record's own bytes are set aside. Resynchronising never looks past
the last nonzero byte.

Nothing here writes or deletes; the caller decides (see the journal replayer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

from ..jsoncodec import decode
from .format import FRAME, RECORD_MAX, VERSION, JournalHeader, crc32, decode_header

__all__ = ["Damage", "Record", "SegmentScan", "data_end", "good_frames", "read_segment_bytes", "scan_records",
           "scan_segment"]

_FRAME = FRAME.size
_unpack = FRAME.unpack_from
_crc = crc32


class Record(NamedTuple):  # a tuple: made per record on the drain and recovery paths, so cheap to make
    offset: int
    end: int
    seq: int
    items: list  # [[record_id str, entry dict], ...]


@dataclass(frozen=True)
class Damage:
    offset: int
    end: int  # exclusive: the next good record starts here, or the end of the file
    reason: str


@dataclass
class SegmentScan:
    """What a segment holds: its header (None when the start itself is damaged), records and damage."""

    header: Optional[JournalHeader]
    records: list[Record] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    size: int = 0


def _payload_problem(obj, last_seq: int) -> Optional[str]:
    if type(obj) is not list or len(obj) != 2:
        return "payload is not [seq, items]"
    seq, items = obj
    if type(seq) is not int or seq <= last_seq:
        return f"seq {seq!r} does not follow {last_seq}"
    if type(items) is not list or not items:
        return "items missing or empty"
    for it in items:
        if type(it) is not list or len(it) != 2 or type(it[0]) is not str or len(it[0]) != 36 \
                or type(it[1]) is not dict:
            return f"item is not [canonical uuid, entry]: {str(it)[:120]}"
    return None


def data_end(data) -> int:
    """The offset after the last nonzero byte (0 for all zeros): where a version-2 segment's data ends at the latest."""
    n = len(data)
    step = 1 << 16
    while n > 0:
        lo = max(0, n - step)
        kept = len(bytes(data[lo:n]).rstrip(b"\0"))
        if kept:
            return lo + kept
        n = lo
        step = min(step * 4, 1 << 24)
    return 0


def _record_at(data, pos: int, last_seq: int, base: int = 0, check_payload: bool = True) -> Record | str:
    n = len(data)
    if n - pos < _FRAME:
        return f"torn frame: {n - pos} bytes at the end, fewer than the {_FRAME}-byte frame"
    length, crc = _unpack(data, pos)
    if length == 0 or length > RECORD_MAX:
        return f"bad record length {length}"
    end = pos + _FRAME + length
    if end > n:
        return f"torn record: length {length}, only {n - pos - _FRAME} bytes follow"
    payload = data[pos + _FRAME:end]
    if _crc(payload) != crc:
        return "checksum mismatch"
    try:
        obj = decode(payload)
    except ValueError as exc:
        return f"payload is not JSON: {exc}"
    if check_payload:
        problem = _payload_problem(obj, last_seq)
        if problem is not None:
            return problem
    return Record(base + pos, base + end, obj[0], obj[1])


def good_frames(data, pos: int) -> list[int]:
    """Bounds of the run of whole frames with matching checksums from ``pos``, payloads not decoded.

    Record ``i`` of the run is ``data[b[i]:b[i + 1]]``, its payload
    ``data[b[i] + FRAME.size:b[i + 1]]``; ``b[-1]`` is where the run stops (the
    end of ``data``, or a frame that is torn, empty, too long or fails its
    checksum). For bulk readers (recovery): they decode the payloads in one
    call, and go on with :func:`scan_records` from ``b[i]`` wherever a payload
    is not a good record, so damage is judged by the policy above.
    """
    data = memoryview(data)
    n = len(data)
    bounds = [pos]
    append = bounds.append
    while n - pos >= _FRAME:
        length, crc = _unpack(data, pos)
        end = pos + _FRAME + length
        if length == 0 or length > RECORD_MAX or end > n or _crc(data[pos + _FRAME:end]) != crc:
            break
        append(end)
        pos = end
    return bounds


def _resync(data, start: int, last_seq: int, limit: Optional[int] = None) -> Optional[Record]:
    """The first good record at an offset in ``[start, limit)``, or None."""
    n = len(data)
    for p in range(start, min(n - _FRAME, n if limit is None else limit)):
        length = _unpack(data, p)[0]
        if length == 0 or p + _FRAME + length > n:
            continue  # cheap filter: most offsets fail here
        rec = _record_at(data, p, last_seq)
        if rec.__class__ is Record:
            return rec
    return None


def scan_records(data, pos: int, last_seq: int = 0, resync: bool = True, *, version: int = VERSION,
                 limit: Optional[int] = None, base: int = 0,
                 check_payload: bool = True) -> tuple[list[Record], list[Damage]]:
    """Records from ``pos`` to the end of ``data``, and the damaged spans between them.

    ``resync=False``: stop at the first damage (reading a live segment in bounded pieces).
    ``version``: the segment's format version (2: a zero tail ends the data, see the module doc).
    ``limit``: stop after this many records (no damage is judged past them).
    ``base``: added to every offset reported (``data`` holds a file's bytes from ``base`` on).
    ``check_payload=False``: the payload's shape is not checked (this process wrote and checksummed it).
    """
    data = memoryview(data)
    records: list[Record] = []
    damage: list[Damage] = []
    n = len(data)
    zero_tail = version >= 2
    end_of_data = -1  # computed when first needed: data_end(data)
    while pos < n:
        if limit is not None and len(records) >= limit:
            break
        rec = _record_at(data, pos, last_seq, base, check_payload)
        if rec.__class__ is Record:
            records.append(rec)
            pos, last_seq = rec.end - base, rec.seq
            continue
        if not resync:
            damage.append(Damage(base + pos, base + n, f"{rec} at offset {base + pos}"))
            break
        if not zero_tail:
            nxt = _resync(data, pos + 1, last_seq)
            end = n if nxt is None else nxt.offset
        else:
            if end_of_data < 0:
                end_of_data = data_end(data)
            if pos >= end_of_data:
                break  # only zeros from here: the unused rest of a preallocated segment
            nxt = _resync(data, pos + 1, last_seq, end_of_data)
            if nxt is not None:
                end = nxt.offset
            else:  # a torn record: its claimed bytes (cut at the file's end) and any nonzero byte after them
                claimed = n
                if n - pos >= _FRAME:
                    length = _unpack(data, pos)[0]
                    claimed = min(n, pos + _FRAME + length) if 0 < length <= RECORD_MAX else end_of_data
                end = max(claimed, end_of_data)
        damage.append(Damage(base + pos, base + end, f"{rec} at offset {base + pos}"
                             + ("" if nxt is None else f"; next good record at offset {base + end}")))
        pos = end
    return records, damage


def read_segment_bytes(path: Path) -> bytes:
    """A segment's bytes: regular files only, never following a symlink, never blocking on a FIFO."""
    from ..spill.codec import open_regular

    with open_regular(path) as f:
        return f.read()


def scan_segment(path: os.PathLike[str] | str, data: Optional[bytes] = None, after_seq: int = 0) -> SegmentScan:
    """The whole segment judged as recovery would; ``data``: its bytes, if already read."""
    data = read_segment_bytes(Path(path)) if data is None else data
    head = decode_header(data)
    if isinstance(head, str):
        return SegmentScan(None, [], [Damage(0, len(data), head)], len(data))
    header, pos = head
    records, damage = scan_records(data, pos, 0, version=header.version)
    del after_seq  # records at or below a checkpoint are the caller's to skip
    return SegmentScan(header, records, damage, len(data))
