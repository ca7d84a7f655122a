"""Bulk reading of journal segments, for recovery: payloads decoded in runs, checked as the reader checks them.

Recovery reads whole segments of records nobody has looked at yet; the
per-record reader (:func:`iai_queue.journal.reader.scan_records`) is the policy,
these are its fast path for the common case. A caller frames a segment with
:func:`~iai_queue.journal.reader.good_frames`, decodes runs with
:func:`decode_run`, finds the first payload the reader would reject with
:func:`first_bad`, and from there hands the rest to ``scan_records`` — so a
damaged segment is judged exactly as the reader judges it. For a store that
takes entries as their JSON, :func:`decode_run_encoded` decodes and checks a
run in one step and leaves each entry undecoded; a run it refuses goes the
way above.
"""

from __future__ import annotations

import gc
from itertools import islice, repeat
from operator import itemgetter, lt
from typing import Annotated, Optional

import msgspec
import numpy as np

from ..jsoncodec import EncodedEntry, decode
from .format import FRAME

__all__ = ["decode_run", "decode_run_encoded", "entry_id_ranges", "first_after", "first_bad", "seq_at"]

# A run of records, the reader's shape checks done while decoding: [seq, [[record id, entry], ...]] each,
# the id 36 characters, at least one pair; each entry kept as its JSON text (msgspec.Raw).
_RecordId = Annotated[str, msgspec.Meta(min_length=36, max_length=36)]
_Pairs = Annotated[list[tuple[_RecordId, msgspec.Raw]], msgspec.Meta(min_length=1)]
_RUN = msgspec.json.Decoder(list[tuple[int, _Pairs]])
_first, _second = itemgetter(0), itemgetter(1)


def entry_id_ranges(prefix: str, lo: int, hi: int) -> list[tuple[str, str]]:
    """``[low, high)`` string ranges holding every entry id ``<prefix><seq:x>.<i>`` with ``lo <= seq <= hi``.

    One range per hex length (ids of one length sort like their numbers). A
    range may hold ids of other lengths too (``"1f."`` lies between ``"100."``
    and ``"1ff/"``): harmless, the caller only asks whether its ids are in the set.
    """
    out = []
    length = len(f"{lo:x}")
    while True:
        a = max(lo, 16 ** (length - 1) if length > 1 else 0)
        b = min(hi, 16 ** length - 1)
        out.append((f"{prefix}{a:x}.", f"{prefix}{b:x}/"))  # "/" sorts right after ".", before the digits
        if b >= hi:
            return out
        length += 1


def _payload(data, bounds: list[int], k: int):
    return memoryview(data)[bounds[k] + FRAME.size:bounds[k + 1]]


def seq_at(data, bounds: list[int], k: int) -> Optional[int]:
    try:
        obj = decode(_payload(data, bounds, k))
    except ValueError:
        return None
    return obj[0] if type(obj) is list and obj and type(obj[0]) is int else None


def first_after(data, bounds: list[int], done_up_to: int) -> int:
    """Index of the first record of the run with seq above ``done_up_to`` (seqs increase: a binary search);
    0 when a payload on the way cannot tell (the bulk check then judges every record)."""
    if not done_up_to:
        return 0
    lo, hi = 0, len(bounds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        seq = seq_at(data, bounds, mid)
        if seq is None:
            return 0
        if seq <= done_up_to:
            lo = mid + 1
        else:
            hi = mid
    return lo


def decode_run(data, bounds: list[int], i: int, j: int) -> list:
    """The payloads of records ``i..j-1`` decoded, up to the first that is not JSON (the list is shorter then).

    The cyclic garbage collector is paused meanwhile: decoding creates many
    containers and none of them can form a cycle, so its passes would only cost
    (about half the decode time on 100 000 records).
    """
    mv, f = memoryview(data), FRAME.size
    paused = gc.isenabled()
    gc.disable()
    try:
        try:
            return [decode(mv[a + f:b]) for a, b in zip(bounds[i:j], bounds[i + 1:j + 1])]
        except ValueError:
            objs = []
            for k in range(i, j):
                try:
                    objs.append(decode(mv[bounds[k] + f:bounds[k + 1]]))
                except ValueError:
                    break
            return objs
    finally:
        if paused:
            gc.enable()


def first_bad(objs: list, last_seq: int) -> int:
    """Index of the first decoded payload the reader would not take as a good record (the same checks as
    :mod:`iai_queue.journal.reader`), or ``len(objs)``."""
    for k, obj in enumerate(objs):
        if type(obj) is not list or len(obj) != 2:
            return k
        seq, items = obj
        if type(seq) is not int or seq <= last_seq or type(items) is not list or not items:
            return k
        if len(items) == 1:  # the common call: one pair, checked without an inner loop
            it = items[0]
            if type(it) is not list or len(it) != 2 or type(it[0]) is not str or len(it[0]) != 36 \
                    or type(it[1]) is not dict:
                return k
        else:
            for it in items:
                if type(it) is not list or len(it) != 2 or type(it[0]) is not str or len(it[0]) != 36 \
                        or type(it[1]) is not dict:
                    return k
        last_seq = seq
    return len(objs)


_SEPARATOR = np.frombuffer(b",".ljust(FRAME.size), np.uint8)  # where a frame was: a comma, then blanks
_FRAME_BYTES = np.arange(FRAME.size)


def _as_json_array(mv: memoryview, bounds: list[int], i: int, j: int) -> np.ndarray:
    """Records ``i..j-1`` as one JSON array (a copy): each frame overwritten by ``,`` and blanks, whole-run
    numpy operations instead of a slice per record."""
    start, end = bounds[i], bounds[j]
    out = np.empty(end - start + 1, np.uint8)
    out[:-1] = np.frombuffer(mv[start:end], np.uint8)
    frames = np.array(bounds[i:j], np.int64) - start
    out[(frames[:, None] + _FRAME_BYTES).ravel()] = np.tile(_SEPARATOR, j - i)
    out[0] = ord("[")
    out[-1] = ord("]")
    return out


def decode_run_encoded(data, bounds: list[int], i: int, j: int,
                       last_seq: int) -> Optional[tuple[list[int], list, Optional[list[int]]]]:
    """Records ``i..j-1`` with their entries left as JSON (:class:`~iai_queue.jsoncodec.EncodedEntry`):
    ``(seqs, pairs, counts)`` — ``pairs`` flat and in order, ``counts`` each record's number of pairs
    (None when every record has one) — when every record passes the checks of :func:`first_bad` and each
    entry is a JSON object; None when any does not (the caller then takes :func:`decode_run` for this
    run, which finds it). For a store that takes encoded entries: nothing is decoded to a dict and
    encoded again.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        try:
            objs = _RUN.decode(_as_json_array(memoryview(data), bounds, i, j))
        except msgspec.DecodeError:  # not JSON, or not a record's shape (ValidationError is one)
            return None
        if not objs:
            return None
        # Whole-list operations (map, zip, itemgetter) rather than a Python loop per record.
        seqs = list(map(_first, objs))
        if seqs[0] <= last_seq or not all(map(lt, seqs, islice(seqs, 1, None))):
            return None
        pairs_of = list(map(_second, objs))
        counts: Optional[list[int]] = list(map(len, pairs_of))
        if max(counts) == 1:  # one pair per call: the common case
            pairs_of = list(map(_first, pairs_of))
            counts = None
        else:
            pairs_of = [pair for pairs in pairs_of for pair in pairs]
        entries = list(map(EncodedEntry, map(_second, pairs_of)))
        if not all(map(bytes.startswith, entries, repeat(b"{"))):
            return None  # an entry that is not a JSON object
        pairs = list(zip(map(_first, pairs_of), entries))
        return seqs, pairs, counts
    finally:
        if paused:
            gc.enable()
