"""The store's layout in LanceDB: two tables, their schemas, how they are opened and how ids are looked up.

Layout (one LanceDB database, two tables):

``records``
    ``id`` (canonical UUID string), ``text``, ``embedding`` (fixed-size float32
    list of ``dim``), ``created_at`` (UTC timestamp).
``provenance``
    one row per provenance entry: ``record_id``, ``entry_id``, ``seq`` (int64,
    the order of appends), ``entry`` (the entry dict as JSON text).

Why provenance is a table of its own and not a JSON column on ``records``: an
append is a LanceDB ``add``, which never conflicts with another ``add`` — so
threads and processes appending at once cannot clobber each other, as a
read-modify-write of a column would.

Guarantee: opening is safe from two processes creating the same store at once
(both succeed, one set of tables); a lookup by many ids is split into bounded
``IN (...)`` filters with every value quoted.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

__all__ = ["RECORDS", "PROVENANCE", "records_schema", "provenance_schema", "open_or_create", "select_between", "select_in"]

RECORDS = "records"
PROVENANCE = "provenance"
_IN_LIST_CHUNK = 1000  # ids per "IN (...)" filter: keeps the SQL text small


def records_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ])


def provenance_schema() -> pa.Schema:
    return pa.schema([
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("entry_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("entry", pa.string(), nullable=False),
    ])


def open_or_create(db, name: str, schema: pa.Schema):
    try:
        return db.open_table(name)
    except (ValueError, FileNotFoundError):
        # exist_ok: two processes creating the same store at once both succeed.
        return db.create_table(name, schema=schema, exist_ok=True)


def _sql_str_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def select_in(table, column: str, values: Iterable[str]) -> set[str]:
    """Those of ``values`` found in ``column`` of ``table``."""
    values = list(values)
    found: set[str] = set()
    for start in range(0, len(values), _IN_LIST_CHUNK):
        chunk = values[start:start + _IN_LIST_CHUNK]
        rows = (table.search().where(f"{column} IN ({_sql_str_list(chunk)})")
                .select([column]).limit(None).to_arrow())
        found.update(rows.column(column).to_pylist())
    return found


def select_between(table, column: str, low: str, high: str) -> set[str]:
    """Values ``low <= v < high`` of ``column`` in ``table``, in one range scan."""
    rows = (table.search().where(f"{column} >= {_sql_str_list([low])} AND {column} < {_sql_str_list([high])}")
            .select([column]).limit(None).to_arrow())
    return set(rows.column(column).to_pylist())
