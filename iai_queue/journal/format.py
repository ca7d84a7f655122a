"""The journal's bytes.

A segment file is::

    MAGIC (8 bytes: b"IAIQWAL" + version byte)
    header record        payload: JSON {"writer", "prefix", "store", "created_ns"}
    record, record, ...  payload: JSON [seq, [[record_id, entry], ...]]   (one enqueue call)
    zeros ...            (version 2 only: the unused, preallocated rest of the segment)

and every record is framed as ``[u32 length][u32 crc32(payload)]`` (little
endian) followed by ``length`` payload bytes — the framing LevelDB and Kafka
use to tell a complete record from a torn one. The checksum is zlib's CRC-32
(:func:`crc32`): computed by zlib-ng's implementation (the ``zlib-ng``
package; about 60 ns instead of 200 ns for a 110-byte record, which is a tenth
of a journaled enqueue), the same function and values as the standard
library's ``zlib.crc32``, which is used when zlib-ng is not installed.

Versions:

- **1** — the file ends after its last record; a length of 0 is damage.
- **2** (written now) — a segment may be preallocated and zero-filled to its
  size bound. A zero length *at a record boundary, with only zero bytes after
  it*, is the end of the data. A zero length followed by any nonzero byte is
  damage (a flipped length must not hide the records after it), and a torn
  record is a nonzero length with a bad checksum or a short payload, as in
  version 1. A payload is JSON and never ends with a zero byte, so the last
  nonzero byte of a segment is never inside the unused tail.

Readers read both versions.

Within a segment ``seq`` strictly increases: the writer draws the number and
writes the record in one locked step. Entry ids are not stored: they are
``<prefix><seq:x>.<index>`` (:class:`iai_queue.pairs.EntryIds`), rebuilt from
the header's prefix, so a replay carries the ids the memory path would have used.
Payloads are encoded with the package's one codec (:mod:`iai_queue.jsoncodec`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..jsoncodec import decode, encode

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # the same CRC-32, slower on short records
    from zlib import crc32

__all__ = ["FRAME", "HEADER_MAX", "MAGIC", "RECORD_MAX", "VERSION", "VERSIONS", "JournalHeader", "crc32",
           "decode_header", "encode_record", "frame", "magic", "segment_start"]

VERSION = 2  # what this library writes
VERSIONS = (1, 2)  # what it reads
MAGIC_STEM = b"IAIQWAL"


def magic(version: int) -> bytes:
    return MAGIC_STEM + bytes([version])


MAGIC = magic(VERSION)
FRAME = struct.Struct("<II")  # length, crc32(payload)
RECORD_MAX = 1 << 30  # a length above this is damage, not a record
HEADER_MAX = 4096


def frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload), crc32(payload)) + payload


def encode_record(seq: int, items: Any) -> bytes:
    """One enqueue call as a framed record; raises TypeError for an entry JSON cannot hold."""
    return frame(encode((seq, items)))


@dataclass(frozen=True)
class JournalHeader:
    writer: str
    prefix: str  # the entry-id prefix of the queue that wrote the segment
    store: str  # the store tag (see iai_queue.spill.store_tag)
    created_ns: int
    version: int = VERSION  # the segment's format version (read from its magic)


def segment_start(header: JournalHeader) -> bytes:
    """The magic plus the framed header record: the first bytes of every segment."""
    return magic(header.version) + frame(encode({"writer": header.writer, "prefix": header.prefix,
                                                 "store": header.store, "created_ns": header.created_ns}))


def decode_header(data: bytes) -> tuple[JournalHeader, int] | str:
    """``(header, offset of the first record)``, or the reason the segment's start is not a header."""
    n_magic = len(MAGIC)
    if len(data) < n_magic:
        return f"torn segment header: {len(data)} bytes, fewer than the {n_magic}-byte magic"
    if data[:n_magic - 1] != MAGIC_STEM:
        return f"not a journal segment: magic {bytes(data[:n_magic])!r}"
    version = data[n_magic - 1]
    if version not in VERSIONS:
        return f"journal version {version} is not supported (this library reads {', '.join(map(str, VERSIONS))})"
    pos = n_magic
    if len(data) < pos + FRAME.size:
        return "torn segment header: no complete header frame"
    length, crc = FRAME.unpack_from(data, pos)
    if length > HEADER_MAX or len(data) < pos + FRAME.size + length:
        return f"torn segment header: header length {length}, {len(data) - pos - FRAME.size} bytes present"
    payload = data[pos + FRAME.size: pos + FRAME.size + length]
    if crc32(payload) != crc:
        return "segment header checksum mismatch"
    try:
        obj = decode(payload)
        header = JournalHeader(str(obj["writer"]), str(obj["prefix"]), str(obj["store"]), int(obj["created_ns"]),
                               version)
    except (ValueError, KeyError, TypeError) as exc:
        return f"segment header unreadable: {exc}"
    return header, pos + FRAME.size + length
