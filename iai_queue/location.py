"""Where a memory store lives: a local directory or an object-store URI.

Guarantee: nothing derived here for names or logs — :attr:`StoreLocation.display`
and :attr:`StoreLocation.identity` — ever contains credentials. A URI's user
info (``user:secret@``), query string (``?sas-token``) and fragment are
dropped before either is built; only :attr:`StoreLocation.uri`, which goes to
LanceDB and nowhere else, keeps the text as given.

``identity`` is eight hex digits naming one store: for a local directory the
SHA-1 of its resolved absolute path (what spill file names have always
carried), for a URI the SHA-1 of its redacted form, so every host that opens
``s3://bucket/prefix`` names it alike and a host serving two stores never
mixes their spill files.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlsplit

__all__ = ["StoreLocation", "OBJECT_STORE_SCHEMES", "is_uri", "parse_storage_options"]

# Schemes LanceDB's object store understands (passed through as given).
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3+ddb", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure"})
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(location: object) -> bool:
    """True for ``scheme://...`` text (any scheme); False for paths."""
    return isinstance(location, str) and _SCHEME.match(location) is not None


def _redact(uri: str) -> str:
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]  # user info may hold a key
    path = parts.path.rstrip("/")
    return f"{parts.scheme.lower()}://{host}{path}"


@dataclass(frozen=True)
class StoreLocation:
    """A parsed store location. Build it with :meth:`parse`."""

    uri: str  # what LanceDB connects to; may hold credentials: never log it
    local_path: Optional[Path]  # the directory, for a local store; None for object storage
    display: str  # safe to log and show
    identity: str  # 8 hex digits, stable across hosts and restarts

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    @classmethod
    def parse(cls, location: "str | os.PathLike[str]") -> "StoreLocation":
        """A local path (``str``/``PathLike``, or ``file://``) or an object-store URI.

        Raises ``ValueError`` naming the (redacted) location for an unknown
        scheme or a URI without a bucket; ``TypeError`` for anything else.
        """
        if isinstance(location, os.PathLike):
            location = os.fspath(location)
        if not isinstance(location, str):
            raise TypeError(f"store location must be a path or a URI string, got {type(location).__name__}")
        if not location:
            raise ValueError("store location is empty")
        m = _SCHEME.match(location)
        if m is None:
            return cls._local(Path(location))
        scheme = m["scheme"].lower()
        if scheme == "file":
            return cls._local(Path(urlsplit(location).path))
        display = _redact(location)
        if scheme not in OBJECT_STORE_SCHEMES:
            raise ValueError(f"store URI {display!r}: unsupported scheme {scheme!r} "
                             f"(use a local path or one of {', '.join(sorted(OBJECT_STORE_SCHEMES))})")
        if not urlsplit(location).netloc.rsplit("@", 1)[-1]:
            raise ValueError(f"store URI {display!r} names no bucket or container")
        return cls(uri=location, local_path=None, display=display,
                   identity=hashlib.sha1(display.encode()).hexdigest()[:8])

    @classmethod
    def _local(cls, path: Path) -> "StoreLocation":
        path = path.expanduser()
        resolved = str(path.resolve())
        return cls(uri=str(path), local_path=path, display=str(path),
                   identity=hashlib.sha1(resolved.encode()).hexdigest()[:8])


def parse_storage_options(options: Optional[Mapping[str, str]]) -> Optional[dict[str, str]]:
    """``storage_options`` checked at the boundary: a mapping of non-empty str keys to str values.

    The error names the bad key, never a value (values are often secrets).
    """
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise TypeError(f"storage_options must be a mapping of str to str, got {type(options).__name__}")
    out: dict[str, str] = {}
    for key, value in options.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"storage_options key {key!r} is not a non-empty str")
        if isinstance(value, bool):
            value = "true" if value else "false"  # the usual spelling of allow_http=True
        if not isinstance(value, str):
            raise TypeError(f"storage_options[{key!r}] must be a str, got {type(value).__name__}")
        out[key] = value
    return out
