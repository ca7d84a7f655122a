"""Operator tools: what ``iai-queue spill status|inspect|requeue`` use.

None of these write except :func:`requeue`, which renames a repaired
quarantined file back into the replay queue.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .codec import open_regular, parse_line, read_lines
from .directory import fsync_dir
from .locks import lock_held
from .names import FileState, file_state, is_quarantined_name, parse_name, quarantined_stem, stem_of, store_tag, \
    writer_lock_name

__all__ = ["LineReport", "SpillFileInfo", "SpillStatus", "inspect_file", "requeue", "status"]


@dataclass(frozen=True)
class SpillFileInfo:
    """One file of a spill directory, as :func:`status` sees it."""

    name: str
    state: str  # "pending", "claimed", "quarantined", "tmp" or "journal" (a FileState's value)
    entries: int  # non-blank lines
    bytes: int
    age_s: float  # since the file was last modified
    store: Optional[str]  # store tag; None for a name this library did not write
    writer: Optional[str]
    writer_alive: Optional[bool]  # None: unknown (not our name, or the lock cannot be read)
    problem: Optional[str] = None  # why it cannot be read (not a regular file, an I/O error); entries is 0 then


@dataclass(frozen=True)
class SpillStatus:
    """A spill directory at one moment. "Pending" counts claimed files too: neither is in the store yet."""

    path: Path
    exists: bool
    files: tuple[SpillFileInfo, ...]

    def _of(self, *states: FileState) -> list[SpillFileInfo]:
        values = {s.value for s in states}
        return [f for f in self.files if f.state in values and f.problem is None]  # unreadable: counted apart

    def as_dict(self) -> dict:
        pending, quarantined = self._of(FileState.PENDING, FileState.CLAIMED), self._of(FileState.QUARANTINED)
        return {
            "dir": str(self.path),
            "exists": self.exists,
            "pending_files": len(pending),
            "claimed_files": len(self._of(FileState.CLAIMED)),
            "pending_entries": sum(f.entries for f in pending),
            "pending_bytes": sum(f.bytes for f in pending),
            "oldest_age_s": round(max(f.age_s for f in pending), 3) if pending else None,
            "quarantined_files": len(quarantined),
            "quarantined_lines": sum(f.entries for f in quarantined),
            "tmp_files": len(self._of(FileState.TMP)),
            "unreadable_files": sum(1 for f in self.files if f.problem is not None),
            "bytes": sum(f.bytes for f in self.files),
            "files": [{**f.__dict__, "age_s": round(f.age_s, 3)} for f in self.files],
        }


_READ_CHUNK = 1 << 20


def _count_lines(path: Path) -> int:
    """Non-blank lines, read in bounded chunks (a long line counts once)."""
    n, content = 0, False
    with open_regular(path) as f:
        for chunk in iter(lambda: f.readline(_READ_CHUNK), b""):
            content = content or bool(chunk.strip())
            if chunk.endswith(b"\n"):
                n, content = n + content, False
    return n + content


def _count_entries(path: Path, state: FileState) -> int:
    """Lines of a spill file; pairs in a journal segment's whole records; 1 for a set-aside journal span."""
    if state is FileState.TMP:
        return 0
    if state is FileState.JOURNAL:
        from ..journal import scan_segment  # the journal package imports nothing of the spill package's users

        return sum(len(r.items) for r in scan_segment(path).records)
    if path.name.endswith(".wal"):
        return 1
    return _count_lines(path)


def status(path: os.PathLike[str] | str) -> SpillStatus:
    """Every spill, claimed, quarantined and temporary file of ``path``, oldest first.

    A missing directory is an empty spill. Raises NotADirectoryError for a
    file, OSError when the directory cannot be read. A file that cannot be read
    (a directory, FIFO or symlink under a spill name, an I/O error) is listed with
    its ``problem``, never followed or opened blocking; replay leaves it alone too.
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
        known = file_state(n)
        if known is None:
            continue
        state, stem = known
        p = path / n
        entries, problem, st = 0, None, None
        try:
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode):
                problem = f"not a regular file ({stat.filemode(st.st_mode)}): not read"
            else:
                entries = _count_entries(p, state)
        except FileNotFoundError:
            continue  # replayed or renamed while we looked
        except OSError as exc:
            problem = f"cannot be read: {exc.strerror or exc}"
        parts = parse_name(stem)
        writer = parts.writer if parts else None
        if writer is not None and writer not in alive:
            alive[writer] = lock_held(path / writer_lock_name(writer))
        size, age_s = (st.st_size, max(0.0, now - st.st_mtime)) if st is not None else (0, 0.0)
        files.append(SpillFileInfo(n, state.value, entries, size, age_s,
                                   parts.store if parts else None, writer, alive.get(writer) if writer else None,
                                   problem))
    files.sort(key=lambda f: (stem_of(f.name), f.name))
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
    stem = stem_of(path.name)
    out = []
    with open_regular(path) as f:
        for lineno, raw in read_lines(f):
            if raw.isspace():
                continue
            parsed = parse_line(raw, stem=stem, lineno=lineno)
            if isinstance(parsed, str):
                out.append(LineReport(lineno, len(raw), parsed))
            else:
                out.append(LineReport(lineno, len(raw), None, str(parsed.record_id), parsed.entry_id))
    return out or [LineReport(0, 0, "empty file")]


def requeue(path: os.PathLike[str] | str, *, force: bool = False,
            store_path: os.PathLike[str] | str | None = None) -> Path:
    """Put a repaired quarantined file back in the spill queue; returns its new (pending) path.

    The new name keeps the store tag of the file's original name (or takes
    ``store_path``'s), so only that store's queues replay it; a file of unknown
    store becomes ``<stem>.requeued-<ts>.jsonl``, which any store may replay.
    Raises ValueError for a name that is not quarantined, for set-aside journal
    bytes (``.wal``: even with ``force``), or (unless ``force``) a file with bad
    lines; the ``.reason`` file is removed.
    """
    path = Path(path)
    if not is_quarantined_name(path.name):
        raise ValueError(f"{path.name} is not a quarantined file (<stem>.failed-<ts>.jsonl)")
    if not path.name.endswith(".jsonl"):  # a set-aside journal segment or span: binary records, not lines
        raise ValueError(f"{path.name} is set-aside journal bytes, not a spill file: requeue takes "
                         f"<stem>.failed-<ts>.jsonl; a segment set aside because it could not be read goes "
                         f"back by renaming it to {quarantined_stem(path.name)}.wal")
    bad = [r for r in inspect_file(path) if r.problem]
    if bad and not force:
        first = f"line {bad[0].lineno}: " if bad[0].lineno else ""
        raise ValueError(f"{path.name}: {len(bad)} bad line(s), first {first}{bad[0].problem}")
    stem = quarantined_stem(path.name)
    ours = parse_name(stem)
    tag = store_tag(store_path) if store_path is not None else (ours.store if ours else None)
    if tag is not None:
        # A writer name no process holds: an orphan of that store, replayed oldest first.
        ts = ours.ts if ours else time.time_ns()
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
    fsync_dir(path.parent)
    return target
