"""The spill directory: provenance pairs that did not fit in memory, on disk.

Where: ``spill_dir``, else env ``IAI_QUEUE_SPILL_DIR``, else
``~/.iai-mcp/.provenance-overflow``. Created on the first spill only.

File format
    Every ``*.jsonl`` in the directory is a spill file, whoever wrote it, except
    quarantined ones (``*.failed-<unix_ts>.jsonl``). One pair per line::

        {"id": "<canonical uuid>", "entry": {...}, "eid": "<entry id>", "seen": 1}

    ``id`` and ``entry`` are required. ``eid`` (the entry id the store dedupes
    on) and ``seen`` (1: the pair may already be in the store, verify before
    applying) are ours; a line from an older writer without ``eid`` gets the
    stable identity ``<original stem>:<line number>``.

Names and lifecycle (forward only; the name on disk is the state)
    ``.<name>.tmp`` (being written) → ``<ts_ns>-<store>-<writer>-<n>.jsonl``
    (pending) → ``<stem>.claimed`` (being replayed) → removed, once every line
    is in the store. Lines that cannot be parsed or that the store rejects go to
    ``<stem>.failed-<unix_ts>.jsonl`` (the raw lines, so an operator can repair
    them and ``iai-queue spill requeue`` the file) with the reasons beside it in
    ``<stem>.failed-<unix_ts>.reason``. Nothing is ever deleted unread.

    ``<ts_ns>`` orders files oldest first; ``<store>`` is a hash of the store
    path, so processes of one user with different stores can share the
    directory; ``<writer>`` names one live queue.

Durability
    A file is written under its temporary name, fsynced, renamed, and the
    directory fsynced: no reader ever sees half a ``.jsonl``.

Claims (several processes, one directory)
    A live queue holds ``flock`` on ``.writer-<writer>.lock``: its files are
    replayed by it alone, which keeps its order. Files of writers that hold no
    lock (dead, stopped, or older writers) are orphans, replayed by whoever
    holds ``.replay.lock``, one process at a time. The kernel drops a dead
    process's locks, so its claims become claimable on their own. A ``.claimed``
    file found by a new holder was cut short by a crash: it is replayed with
    every line verified, so nothing is applied twice. A ``.tmp`` file whose
    writer is gone (its ``flock`` is free) is renamed to its final name.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence
from uuid import UUID

__all__ = ["SpillDirectory", "SpillLine", "BadLine", "ParsedSpill", "default_spill_dir", "is_pending_name"]

log = logging.getLogger("iai_queue.spill")

MAX_LINE_BYTES = 1 << 20  # a longer line is quarantined, not parsed
_FAILED = re.compile(r"\.failed-\d+\.jsonl$")
_OURS = re.compile(r"^(?P<ts>\d{19})-(?P<store>[0-9a-f]{8})-(?P<writer>w[0-9a-z]+)-(?P<n>\d+)$")
_TMP_ORPHAN_AGE_S = 2.0  # a tmp younger than this may be between open() and flock()


def default_spill_dir() -> Path:
    env = os.environ.get("IAI_QUEUE_SPILL_DIR")
    return Path(env) if env else Path.home() / ".iai-mcp" / ".provenance-overflow"


def is_pending_name(name: str) -> bool:
    return name.endswith(".jsonl") and not name.startswith(".") and not _FAILED.search(name)


def store_tag(store_path: os.PathLike[str] | str | None) -> str:
    """Eight hex digits naming a store, for spill file names."""
    if store_path is None:
        return "00000000"
    return hashlib.sha1(str(Path(store_path).resolve()).encode()).hexdigest()[:8]


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


def _stem(name: str) -> str:
    for suffix in (".jsonl", ".claimed"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def encode_line(record_id: UUID, entry: dict, entry_id: str, seen: bool) -> bytes:
    """One spill line; raises TypeError/ValueError for an entry JSON cannot hold."""
    obj = {"id": str(record_id), "entry": entry, "eid": entry_id}
    if seen:
        obj["seen"] = 1
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


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


def _lines(f) -> Iterator[tuple[int, bytes, int]]:
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
    out = ParsedSpill()
    pairs, entry_ids, bad = out.pairs, out.entry_ids, out.bad
    seen = False
    with open(path, "rb") as f:
        for lineno, raw, length in _lines(f):
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _try_flock(path: Path) -> Optional[int]:
    """An fd holding an exclusive flock on ``path``, or None if someone else holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)  # closing the last fd of the open file drops its flock


class SpillDirectory:
    """One queue's view of a spill directory: writes its own files, replays files it may claim.

    ``write`` may be called from any thread; everything else is the replaying
    worker's.
    """

    def __init__(self, path: os.PathLike[str] | str, *, store_path=None):
        self.path = Path(path)
        self.store = store_tag(store_path)
        self.writer = f"w{os.getpid()}x{secrets.token_hex(4)}"
        self._counter = 0
        self._last_ts = 0
        self._writer_fd: Optional[int] = None
        self._write_lock = threading.Lock()  # the spill thread, stop() and late enqueues all write

    # -- writing ---------------------------------------------------------------

    def _ensure_dir(self) -> None:
        if not self.path.is_dir():
            self.path.mkdir(parents=True, exist_ok=True)
        if self._writer_fd is None:
            # Held while this queue lives: our files are ours to replay, in order.
            self._writer_fd = _try_flock(self.path / f".writer-{self.writer}.lock")

    def write(self, lines: Sequence[bytes], *, before_ts: Optional[int] = None,
              on_named: Optional[Callable[[str], None]] = None) -> Path:
        """Write ``lines`` as a new spill file, durably; returns its path.

        ``before_ts``: name the file older than this timestamp, so it replays
        before files already written (used when older pairs are spilled late).
        ``on_named``: called with the file's name before it becomes visible
        (a replayer may take it the moment it is renamed into place).
        Raises OSError (ENOSPC, EACCES, EROFS, …); nothing is left behind then.
        """
        with self._write_lock:
            self._ensure_dir()
            ts = max(time.time_ns(), self._last_ts + 1) if before_ts is None else before_ts - 1
            if before_ts is None:
                self._last_ts = ts
            self._counter += 1
            name = f"{ts:019d}-{self.store}-{self.writer}-{self._counter:06d}.jsonl"
        tmp = self.path / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # tells a recoverer this tmp is alive
            _write_all(fd, b"".join(lines))
            os.fsync(fd)
            if on_named is not None:
                on_named(name)
            os.rename(tmp, self.path / name)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
        _fsync_dir(self.path)
        return self.path / name

    def release(self) -> None:
        """Give up the writer lock; our remaining files become orphans for anyone to replay."""
        fd, self._writer_fd = self._writer_fd, None
        if fd is not None:
            if not any(self._is_own(n) for n in self._names()):
                try:
                    os.unlink(self.path / f".writer-{self.writer}.lock")
                except OSError:
                    pass
            _unlock(fd)

    # -- reading the directory ---------------------------------------------------

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.path)
        except (FileNotFoundError, NotADirectoryError):  # not created yet, or a file in the way
            return []

    def _is_own(self, name: str) -> bool:
        m = _OURS.match(_stem(name))
        return m is not None and m["writer"] == self.writer

    def own_files(self) -> list[str]:
        """Our pending and claimed files (tmp files included), any order."""
        return [n for n in self._names() if self.writer in n and (is_pending_name(n) or n.endswith((".claimed", ".tmp")))]

    def oldest_own_ts(self) -> Optional[int]:
        stamps = [int(m["ts"]) for n in self.own_files() if (m := _OURS.match(_stem(n.lstrip(".").removesuffix(".tmp"))))]
        return min(stamps) if stamps else None

    def replayable(self) -> list[tuple[str, bool]]:
        """Files this queue may replay now, oldest first: ``(name, own)``.

        Ours, and orphans of our store (or of no known store) whose writer
        holds no lock. The caller must hold the replay lock for orphans.
        """
        names = self._names()
        alive: dict[str, bool] = {}
        out = []
        for n in names:
            if not (is_pending_name(n) or n.endswith(".claimed")):
                continue
            m = _OURS.match(_stem(n))
            if m is None:
                out.append((n, False))  # an older writer's file: any store may take it
                continue
            if m["store"] != self.store:
                continue
            w = m["writer"]
            if w == self.writer:
                out.append((n, True))
                continue
            if w not in alive:
                alive[w] = self._writer_alive(w)
            if not alive[w]:
                out.append((n, False))
        out.sort(key=lambda item: _stem(item[0]))
        return out

    def _writer_alive(self, writer: str) -> bool:
        lock = self.path / f".writer-{writer}.lock"
        if not lock.exists():
            return False
        fd = _try_flock(lock)
        if fd is None:
            return True
        _unlock(fd)
        return False

    # -- replay --------------------------------------------------------------------

    def acquire_replay_lock(self) -> Optional[int]:
        """The fd of the directory's replay lock, or None while another process holds it."""
        if not self.path.is_dir():
            return None
        return _try_flock(self.path / ".replay.lock")

    release_replay_lock = staticmethod(_unlock)

    def recover_tmp_files(self) -> int:
        """Rename spill temp files whose writer is gone to their final name. Call under the replay lock."""
        recovered = 0
        now = time.time()
        for n in self._names():
            if not (n.startswith(".") and n.endswith(".jsonl.tmp")):
                continue
            p = self.path / n
            try:
                if now - p.stat().st_mtime < _TMP_ORPHAN_AGE_S:
                    continue
            except FileNotFoundError:
                continue
            fd = _try_flock(p)
            if fd is None:
                continue  # its writer is still writing
            try:
                final = self.path / n[1:-len(".tmp")]
                os.rename(p, final)
                recovered += 1
                log.warning("spill.recover_tmp", extra={"event": "spill.recover_tmp", "file": final.name})
            finally:
                _unlock(fd)
        if recovered:
            _fsync_dir(self.path)
        return recovered

    def claim(self, name: str) -> tuple[Path, bool]:
        """Move a pending file to its claimed name. Returns (claimed path, recovered):
        ``recovered`` is True for a file that was already claimed, i.e. cut short by a crash."""
        if name.endswith(".claimed"):
            return self.path / name, True
        claimed = self.path / (_stem(name) + ".claimed")
        os.rename(self.path / name, claimed)
        return claimed, False

    def remove(self, claimed: Path) -> None:
        os.unlink(claimed)

    def quarantine(self, stem: str, bad: Iterable[BadLine], whole: Optional[Path] = None) -> Path:
        """Set bad lines aside as ``<stem>.failed-<unix_ts>.jsonl`` plus a ``.reason`` file.

        ``whole``: move that file there as it is (nothing in it was good).
        """
        bad = list(bad)
        self.path.mkdir(parents=True, exist_ok=True)  # a poison pair may come before any spill
        ts = int(time.time())
        while (self.path / f"{stem}.failed-{ts}.jsonl").exists():
            ts += 1
        target = self.path / f"{stem}.failed-{ts}.jsonl"
        reasons = "".join(f"line {b.lineno}: {b.reason}\n" if b.lineno else f"file: {b.reason}\n" for b in bad)
        self._atomic_write(target.with_suffix(".reason"), reasons.encode())
        if whole is not None:
            os.rename(whole, target)
        else:
            self._atomic_write(target, b"".join(b.raw for b in bad))
        _fsync_dir(self.path)
        return target

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)


# -- operator tools: what ``iai-queue spill status|inspect|requeue`` use ----------------------


def is_quarantined_name(name: str) -> bool:
    return not name.startswith(".") and bool(_FAILED.search(name))


@dataclass(frozen=True)
class SpillFileInfo:
    """One file of a spill directory, as :func:`status` sees it."""

    name: str
    state: str  # "pending", "claimed", "quarantined" or "tmp"
    entries: int  # non-blank lines
    bytes: int
    age_s: float  # since the file was last modified
    store: Optional[str]  # store tag; None for a name this library did not write
    writer: Optional[str]
    writer_alive: Optional[bool]  # None: unknown (not our name, or the lock cannot be read)


@dataclass(frozen=True)
class SpillStatus:
    """A spill directory at one moment. "Pending" counts claimed files too: neither is in the store yet."""

    path: Path
    exists: bool
    files: tuple[SpillFileInfo, ...]

    def _of(self, *states: str) -> list[SpillFileInfo]:
        return [f for f in self.files if f.state in states]

    def as_dict(self) -> dict:
        pending, quarantined = self._of("pending", "claimed"), self._of("quarantined")
        return {
            "dir": str(self.path),
            "exists": self.exists,
            "pending_files": len(pending),
            "claimed_files": len(self._of("claimed")),
            "pending_entries": sum(f.entries for f in pending),
            "pending_bytes": sum(f.bytes for f in pending),
            "oldest_age_s": round(max(f.age_s for f in pending), 3) if pending else None,
            "quarantined_files": len(quarantined),
            "quarantined_lines": sum(f.entries for f in quarantined),
            "tmp_files": len(self._of("tmp")),
            "bytes": sum(f.bytes for f in self.files),
            "files": [{**f.__dict__, "age_s": round(f.age_s, 3)} for f in self.files],
        }


def _count_lines(path: Path) -> int:
    """Non-blank lines, read in bounded chunks (an overlong line counts once)."""
    n, content = 0, False
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.readline(MAX_LINE_BYTES), b""):
            content = content or bool(chunk.strip())
            if chunk.endswith(b"\n"):
                n, content = n + content, False
    return n + content


def _lock_held(lock: Path) -> Optional[bool]:
    """Whether someone holds ``lock``; opened read-only so that looking creates nothing."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        return True if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)


def status(path: os.PathLike[str] | str) -> SpillStatus:
    """Every spill, claimed, quarantined and temporary file of ``path``, oldest first.

    A missing directory is an empty spill. Raises NotADirectoryError for a
    file, OSError when the directory cannot be read.
    """
    path = Path(path)
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return SpillStatus(path, False, ())
    now = time.time()
    alive: dict[str, Optional[bool]] = {}
    files = []
    for n in names:
        if n.startswith(".") and n.endswith(".jsonl.tmp"):
            state, stem = "tmp", _stem(n[1:-len(".tmp")])
        elif is_quarantined_name(n):
            state, stem = "quarantined", n[: _FAILED.search(n).start()]
        elif n.endswith(".claimed") and not n.startswith("."):
            state, stem = "claimed", _stem(n)
        elif is_pending_name(n):
            state, stem = "pending", _stem(n)
        else:
            continue
        p = path / n
        try:
            st = p.stat()
            entries = _count_lines(p) if state != "tmp" else 0
        except FileNotFoundError:
            continue  # replayed or renamed while we looked
        m = _OURS.match(stem)
        writer = m["writer"] if m else None
        if writer is not None and writer not in alive:
            alive[writer] = _lock_held(path / f".writer-{writer}.lock")
        files.append(SpillFileInfo(n, state, entries, st.st_size, max(0.0, now - st.st_mtime),
                                   m["store"] if m else None, writer, alive.get(writer) if writer else None))
    files.sort(key=lambda f: (_stem(f.name), f.name))
    return SpillStatus(path, True, tuple(files))


@dataclass(frozen=True)
class LineReport:
    """One line of a spill file: ``problem`` is None for a line replay would write."""

    lineno: int  # 1-based; 0 for the whole file
    bytes: int
    problem: Optional[str]
    record_id: Optional[str] = None
    entry_id: Optional[str] = None


def inspect_file(path: os.PathLike[str] | str) -> list[LineReport]:
    """Every non-blank line of a spill file judged as replay would (:func:`parse_line`)."""
    path = Path(path)
    stem = _stem(path.name)
    out = []
    with open(path, "rb") as f:
        for lineno, raw, size in _lines(f):
            if raw.isspace():
                continue
            parsed = parse_line(raw, stem=stem, lineno=lineno) if size <= MAX_LINE_BYTES else (
                f"line of {size} bytes exceeds {MAX_LINE_BYTES}")
            if isinstance(parsed, str):
                out.append(LineReport(lineno, size, parsed))
            else:
                out.append(LineReport(lineno, size, None, str(parsed.record_id), parsed.entry_id))
    return out or [LineReport(0, 0, "empty file")]


def requeue(path: os.PathLike[str] | str, *, force: bool = False,
            store_path: os.PathLike[str] | str | None = None) -> Path:
    """Put a repaired quarantined file back in the spill queue; returns its new (pending) path.

    The new name keeps the store tag of the file's original name (or takes
    ``store_path``'s), so only that store's queues replay it; a file of unknown
    store becomes ``<stem>.requeued-<ts>.jsonl``, which any store may replay.
    Raises ValueError for a name that is not quarantined, or (unless
    ``force``) a file with bad lines; the ``.reason`` file is removed.
    """
    path = Path(path)
    m = _FAILED.search(path.name)
    if m is None or path.name.startswith("."):
        raise ValueError(f"{path.name} is not a quarantined file (<stem>.failed-<ts>.jsonl)")
    bad = [r for r in inspect_file(path) if r.problem]
    if bad and not force:
        first = f"line {bad[0].lineno}: " if bad[0].lineno else ""
        raise ValueError(f"{path.name}: {len(bad)} bad line(s), first {first}{bad[0].problem}")
    stem = path.name[: m.start()]
    ours = _OURS.match(stem)
    tag = store_tag(store_path) if store_path is not None else (ours["store"] if ours else None)
    if tag is not None:
        # A writer name no process holds: an orphan of that store, replayed oldest first.
        ts = int(ours["ts"]) if ours else time.time_ns()
        target = path.with_name(f"{ts:019d}-{tag}-wrq{secrets.token_hex(4)}-000001.jsonl")
    else:
        ts = int(time.time())
        while (target := path.with_name(f"{stem}.requeued-{ts}.jsonl")).exists():
            ts += 1
    os.rename(path, target)
    try:
        os.unlink(path.with_suffix(".reason"))
    except FileNotFoundError:
        pass
    _fsync_dir(path.parent)
    return target
