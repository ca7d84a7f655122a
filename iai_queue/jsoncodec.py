"""One JSON codec for provenance entries, on every path: store rows, spill lines, replay, synchronous writes.

Encoding (orjson; the same bytes whichever path an entry took):

- ``str``, ``int``, ``float``, ``bool``, ``None``, ``dict``, ``list``, ``tuple`` (as a list);
- ``datetime``, ``date``, ``time`` as ISO 8601 strings (``datetime`` with its offset, if any);
- ``UUID`` as its canonical string; dataclasses as objects; numpy scalars and arrays as numbers and lists;
- dict keys that are ``int``/``float``/``bool``/``None`` as strings (as ``json.dumps`` does);
- ``NaN`` and ``±Infinity`` as ``null`` (as JavaScript's ``JSON.stringify`` does: standard JSON has no NaN).

An :class:`EncodedEntry` — one entry's JSON exactly as this codec wrote it,
read back from a journal by recovery — is stored as it is and embedded as it is
in spill and quarantine lines (no decode to a dict and encode again). Only
recovery makes them; an entry a caller hands over is always a dict.

Anything else — a ``set``, ``bytes``, an object of another class, a circular
dict, nesting deeper than 254 levels — cannot be stored. That is decided by the
entry, never by the store's health: the queue quarantines such an entry at
once (with the reason) and writes its neighbours; it is never retried as an outage.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["EncodedEntry", "UnencodableEntries", "decode", "encode", "encode_entries"]

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
# The codec is orjson.dumps(obj, option=OPTIONS). Those options cost about 0.1 µs per
# entry even when nothing needs them (OPT_NON_STR_KEYS takes a slower path for every
# dict), so each encode tries plain orjson.dumps first: it gives the same bytes when it
# succeeds, and raises TypeError for exactly what needs the options (a non-str key, a
# numpy value) — then the options are used. A hot path that calls orjson itself does
# the same, with OPTIONS.
OPTIONS = _OPTIONS

decode = orjson.loads  # bytes or str; raises orjson.JSONDecodeError (a ValueError)


class EncodedEntry(bytes):
    """One entry's JSON as this codec wrote it (read back from a journal): stored and embedded as it is.

    ``json.loads(e)`` reads it; ``orjson.loads`` takes no ``bytes`` subclass: ``orjson.loads(bytes(e))``.
    """

    __slots__ = ()


def _embed(obj: Any) -> Any:
    if type(obj) is EncodedEntry:
        return orjson.Fragment(bytes(obj))
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")  # orjson's own words


def encode(obj: Any) -> bytes:
    """Compact JSON bytes; raises TypeError (orjson.JSONEncodeError) for what cannot be encoded."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return orjson.dumps(obj, option=_OPTIONS, default=_embed)


class UnencodableEntries(ValueError):
    """Some entries of a batch cannot be stored. ``bad`` maps their index in the batch to the reason.

    Raised by the store before it writes anything; the queue sets those pairs
    aside and writes the rest.
    """

    def __init__(self, bad: dict[int, str]):
        self.bad = bad
        first = min(bad)
        super().__init__(f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} cannot be stored as JSON, "
                         f"first at index {first}: {bad[first]}")


def encode_entries(entries: list) -> list[bytes]:
    """Each entry encoded; raises :class:`UnencodableEntries` naming every entry that cannot be."""
    dumps, options, encoded = orjson.dumps, _OPTIONS, EncodedEntry
    if not entries or type(entries[0]) is not encoded:
        try:
            return [dumps(e) for e in entries]
        except TypeError:
            pass
    try:
        return [e if type(e) is encoded else dumps(e, option=options) for e in entries]
    except TypeError:
        pass
    out, bad = [], {}
    for i, e in enumerate(entries):
        try:
            out.append(e if type(e) is encoded else dumps(e, option=options))
        except TypeError as exc:
            bad[i] = f"entry cannot be written as JSON: {exc}"
    raise UnencodableEntries(bad)
