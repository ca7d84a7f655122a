"""Which store a spill file belongs to: a map of store tag → store location, kept in the spill directory.

Spill file names carry an 8-hex store tag (a hash of the store path, see
``names.store_tag``), which says nothing to an operator. Every store that
uses a spill directory leaves one small file there, ``.store-<tag>.json``::

    {"tag": "1cffd24b", "location": "/var/lib/memory/lancedb"}

One file per tag, written whole under a temporary name and renamed into
place: processes sharing the directory never read-modify-write a common file,
so no lock is needed and no entry is lost to a race. A location is the store's
resolved path; for a URL, user info (``user:secret@``), query and fragment are
removed — never a credential. Writing the map is best effort: a failure is
logged at DEBUG and never affects spilling.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from .names import store_tag

__all__ = ["MAP_PREFIX", "redact_location", "record_store_location", "store_locations"]

log = logging.getLogger("iai_queue.spill")

MAP_PREFIX = ".store-"
_MAP_NAME = re.compile(r"^\.store-([0-9a-f]{8})\.json$")
_MAX_MAP_BYTES = 4096


def redact_location(location: os.PathLike[str] | str) -> str:
    """A store location fit to write down: a resolved path, or a URL without credentials or query."""
    text = os.fspath(location)
    if "://" in text:
        parts = urlsplit(text)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return str(Path(text).resolve())


def record_store_location(spill_dir: os.PathLike[str] | str, store_path: os.PathLike[str] | str | None) -> Optional[Path]:
    """Write ``.store-<tag>.json`` for ``store_path`` into an existing ``spill_dir``; its path, or None.

    Never creates the directory (a run that spills nothing leaves no trace),
    never rewrites a map file that already says the same, never raises OSError.
    """
    if store_path is None:
        return None
    directory = Path(spill_dir)
    tag = store_tag(store_path)
    target = directory / f"{MAP_PREFIX}{tag}.json"
    data = json.dumps({"tag": tag, "location": redact_location(store_path)}) + "\n"
    try:
        st = os.stat(directory) if directory.is_dir() else None
        if st is None or (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
            return None  # missing, or not ours alone: never write there (spill refuses or tightens it)
        try:
            if target.read_text() == data:
                return target
        except FileNotFoundError:
            pass
        tmp = directory / f"{MAP_PREFIX}{tag}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, target)
        return target
    except OSError as exc:
        log.debug("store map not written: %s", exc)
        return None


def store_locations(spill_dir: os.PathLike[str] | str) -> dict[str, str]:
    """``{tag: location}`` of every store that left a map file in ``spill_dir`` (unreadable ones skipped)."""
    out: dict[str, str] = {}
    try:
        names = os.listdir(spill_dir)
    except OSError:
        return out
    for name in names:
        m = _MAP_NAME.match(name)
        if not m:
            continue
        try:
            with open(Path(spill_dir) / name, "rb") as f:
                doc = json.loads(f.read(_MAX_MAP_BYTES))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("location"), str):
            out[m.group(1)] = doc["location"]
    return out
