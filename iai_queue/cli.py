"""The ``iai-queue`` command: ``bench`` (the main job) and ``spill`` (operator tools).

Exit codes: 0 ok, 1 something needs attention, 2 usage error. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["main", "build_parser"]

_SPILL_DOC = """Inspect and repair the provenance spill directory.

The spill directory holds provenance entries the store could not take yet
(pending files, replayed automatically) and lines that could not be written
(quarantined files, <stem>.failed-<ts>.jsonl, with the reasons in a .reason
file beside them). Quarantined files wait for an operator: inspect, repair,
requeue."""


class _Fail(Exception):
    """A one-line error for stderr; exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(prog="iai-queue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.add_arguments(sub.add_parser("bench", help="benchmark enqueue and recall latency",
                                       description=bench.__doc__.splitlines()[0]))
    spill = sub.add_parser("spill", help="inspect and repair the spill directory", description=_SPILL_DOC,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_spill_commands(spill)
    return parser


def _add_spill_commands(spill: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, metavar="DIR",
                        help="the spill directory (default: $IAI_QUEUE_SPILL_DIR, else ~/.iai-mcp/.provenance-overflow)")
    sub = spill.add_subparsers(dest="spill_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("status", parents=[common], help="pending and quarantined files at a glance",
                       description="Pending files and entries, bytes, the oldest file's age, quarantined "
                                   "files and lines. A missing directory is an empty spill.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true", help="exit 1 when quarantined files exist (for monitoring)")

    p = sub.add_parser("inspect", parents=[common], help="judge every line of a spill file",
                       description="Every non-blank line of FILE: ok, or why replay would quarantine it. "
                                   "Exit 1 when a line is bad.")
    p.add_argument("file", type=Path, metavar="FILE", help="a spill or quarantined file (a bare name is looked up in --dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("replay", parents=[common], help="drain the spill directory into a store now",
                       description="Write the pending files of STORE into it now, progress on stderr. Safe "
                                   "while other processes use the store: files of a live writer are left to "
                                   "it, and orphaned files are replayed by one process at a time.")
    p.add_argument("--store", required=True, metavar="PATH|URI",
                   help="the memory store: a LanceDB directory, or an object-store URI (s3://bucket/prefix)")
    add_storage_option_argument(p)
    p.add_argument("--dim", type=int, metavar="N", help="embedding size (default: read from the store)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up after this long without progress (default 60)")

    p = sub.add_parser("requeue", parents=[common], help="put a repaired quarantined file back in the queue",
                       description="Validate a quarantined FILE (<stem>.failed-<ts>.jsonl) and move it back into "
                                   "the spill queue under a pending name; its .reason file is removed. "
                                   "Refuses (exit 1) while lines are still bad, unless --force.")
    p.add_argument("file", type=Path, metavar="FILE", help="the quarantined file (a bare name is looked up in --dir)")
    p.add_argument("--force", action="store_true", help="requeue even with bad lines (they are quarantined again)")
    p.add_argument("--store", metavar="PATH",
                   help="the store the entries belong to, for a file whose name does not say")


def add_storage_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        type=_storage_option, metavar="KEY=VALUE",
                        help="an object-store setting passed to LanceDB (repeatable), e.g. endpoint=http://host:9000")


def _storage_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        # never echo the text: the value may be a secret
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {key.strip()[:40]!r}"
                                         f"{'' if sep else ' with no ='}")
    return key.strip(), value


def storage_options_of(args: argparse.Namespace) -> Optional[dict[str, str]]:
    """``--storage-option`` pairs as a dict (a later key wins); None when none were given."""
    pairs = getattr(args, "storage_options", None) or []
    return dict(pairs) if pairs else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from . import bench

        return bench.run(args)
    if args.command == "spill":
        return _run_spill(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


# -- spill commands ---------------------------------------------------------------------


def _out(text: str = "") -> None:
    print(text, file=sys.stdout)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_spill(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "status": _cmd_status, "inspect": _cmd_inspect, "replay": _cmd_replay, "requeue": _cmd_requeue}
    prefix = f"iai-queue spill {args.spill_command}"
    try:
        return commands[args.spill_command](args)
    except _Fail as exc:
        _err(f"{prefix}: error: {exc}")
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _err(f"{prefix}: error: {exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        _err(f"{prefix}: interrupted")
        return 130
    except Exception as exc:  # an operator tool reports, it does not dump a traceback
        _err(f"{prefix}: error: {type(exc).__name__}: {exc}")
    return 1


def _spill_dir(args: argparse.Namespace) -> Path:
    from .spill import default_spill_dir

    path = args.dir if args.dir is not None else default_spill_dir()
    if path.exists() and not path.is_dir():
        raise _Fail(f"spill directory {str(path)!r} is not a directory")
    return path


def _find_file(args: argparse.Namespace) -> Path:
    path: Path = args.file
    if not path.exists() and path.parent == Path("."):
        candidate = _spill_dir(args) / path
        if candidate.exists():
            path = candidate
    if not path.exists():
        raise _Fail(f"no such file: {str(args.file)!r}")
    if not path.is_file():
        raise _Fail(f"{str(path)!r} is not a file")
    return path


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _plural(n: int, word: str, many: Optional[str] = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def _cmd_status(args: argparse.Namespace) -> int:
    from .spill import status

    st = status(_spill_dir(args))
    d = st.as_dict()
    if args.json:
        _out(json.dumps(d, indent=2))
    else:
        _out(f"spill directory  {st.path}{'' if st.exists else '  (does not exist: nothing spilled)'}")
        _out(f"pending          {_plural(d['pending_files'], 'file')} ({d['claimed_files']} claimed), "
             f"{_plural(d['pending_entries'], 'entry', 'entries')}, {_size(d['pending_bytes'])}")
        _out(f"oldest           {_age(d['oldest_age_s'])}")
        _out(f"quarantined      {_plural(d['quarantined_files'], 'file')}, {_plural(d['quarantined_lines'], 'line')}")
        if d["tmp_files"]:
            _out(f"being written    {_plural(d['tmp_files'], 'file')}")
        if st.files:
            _out("")
            _out(f"{'STATE':<12} {'ENTRIES':>7} {'SIZE':>10} {'AGE':>7}  {'WRITER':<8} FILE")
            for f in st.files:
                writer = {True: "live", False: "gone", None: "-"}[f.writer_alive]
                _out(f"{f.state:<12} {f.entries:>7} {_size(f.bytes):>10} {_age(f.age_s):>7}  {writer:<8} {f.name}")
        if d["quarantined_files"]:
            _out("")
            _out("quarantined files need an operator: iai-queue spill inspect FILE, repair it, "
                 "then iai-queue spill requeue FILE")
    if args.check and d["quarantined_files"]:
        _err(f"iai-queue spill status: {_plural(d['quarantined_files'], 'quarantined file')} in {st.path}")
        return 1
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .spill import inspect_file

    path = _find_file(args)
    reports = inspect_file(path)
    reason_file = path.with_suffix(".reason")
    try:
        recorded = reason_file.read_text(errors="replace").splitlines() if path.name.endswith(".jsonl") else []
    except FileNotFoundError:
        recorded = []
    bad = [r for r in reports if r.problem]
    good = len(reports) - len(bad) if reports[0].lineno else 0
    if args.json:
        _out(json.dumps({"file": str(path), "ok_lines": good, "bad_lines": len(bad),
                         "lines": [{"line": r.lineno, "ok": r.problem is None, "problem": r.problem,
                                    "bytes": r.bytes, "record_id": r.record_id, "entry_id": r.entry_id}
                                   for r in reports],
                         "recorded_reasons": recorded}, indent=2))
    else:
        for r in reports:
            where = f"line {r.lineno}" if r.lineno else "file"
            _out(f"{where}: ok  record {r.record_id}" if r.problem is None else f"{where}: BAD  {r.problem}")
        if recorded:
            _out(f"reasons recorded in {reason_file.name}:")
            for line in recorded:
                _out(f"  {line}")
        _out(f"{path.name}: {good} ok, {len(bad)} bad")
    return 1 if bad else 0


def _store_dim(location, storage_options: Optional[dict[str, str]] = None) -> int:
    """The embedding size of the store at ``location``; _Fail when it is not a memory store."""
    import lancedb

    try:
        table = lancedb.connect(location.uri, storage_options=storage_options).open_table("records")
    except ValueError:
        raise _Fail(f"{location.display!r} is not a memory store (no records table)") from None
    size = getattr(table.schema.field("embedding").type, "list_size", None)
    if not isinstance(size, int) or size <= 0:
        raise _Fail(f"{location.display!r} is not a memory store (no fixed-size embedding column)")
    return size


def _existing_store_location(text: str):
    """The parsed ``--store``; _Fail for a local path that is missing or a file (never create a store)."""
    from .location import StoreLocation

    try:
        location = StoreLocation.parse(text)
    except (TypeError, ValueError) as exc:
        raise _Fail(str(exc)) from None
    path = location.local_path
    if path is not None:
        if not path.exists():
            raise _Fail(f"store {str(path)!r} does not exist")  # replay into a new store would skip every entry
        if not path.is_dir():
            raise _Fail(f"store {str(path)!r} is a file, not a memory store directory")
    return location


def _cmd_replay(args: argparse.Namespace) -> int:
    from .provenance_queue import ProvenanceWriteQueue
    from .spill import SpillDirectory, status, store_tag
    from .store import MemoryStore

    spill_dir = _spill_dir(args)
    location = _existing_store_location(args.store)
    options = storage_options_of(args)
    if args.dim is not None and args.dim <= 0:
        raise _Fail(f"--dim must be a positive int, got {args.dim}")
    found_dim = _store_dim(location, options)
    try:
        store = MemoryStore(location.uri, dim=args.dim if args.dim is not None else found_dim,
                            storage_options=options, maintenance="never")
    except (TypeError, ValueError) as exc:
        raise _Fail(str(exc)) from None
    store_path = store.location  # shown to the operator: never holds credentials

    tag = store_tag(store.path)  # what the queue's spill names carry for this store
    files = [f for f in status(spill_dir).files if f.state in ("pending", "claimed")]
    ours = [f for f in files if f.store in (tag, None)]
    live = [f for f in ours if f.writer_alive]
    others = [f for f in files if f.store not in (tag, None)]
    todo = [f for f in ours if not f.writer_alive]
    if others:
        _err(f"{_plural(len(others), 'file')} belong to other stores: not touched")
    if live:
        pids = sorted({f.writer[1:].split("x")[0] for f in live if f.writer})
        _err(f"{_plural(len(live), 'file')} ({sum(f.entries for f in live)} entries) belong to a live writer "
             f"(pid {', '.join(pids)}), which replays them itself: left to it")
    if not todo:
        _err(f"nothing to replay into {store_path}")
        return 0
    _err(f"replaying {_plural(len(todo), 'file')} ({sum(f.entries for f in todo)} entries) from {spill_dir} "
         f"into {store_path}")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("iai-queue: %(levelname)s %(message)s"))
    handler.setLevel(logging.WARNING)
    pkg_log = logging.getLogger("iai_queue")
    view = SpillDirectory(spill_dir, store_path=store.path)  # only lists; never writes
    q = ProvenanceWriteQueue(store, spill_dir=spill_dir, idle_replay_s=0.5, retry_max_s=1.0)
    left: list = []
    pkg_log.addHandler(handler)
    try:
        q.start()
        last_left: Optional[tuple] = None
        last_replayed = -1
        last_progress = time.monotonic()
        while True:
            left = view.replayable()
            replayed = q.stats().replayed
            if tuple(left) != last_left or replayed != last_replayed:
                if last_left is not None:
                    _err(f"  {replayed} entries replayed, {_plural(len(left), 'file')} left")
                last_left, last_replayed, last_progress = tuple(left), replayed, time.monotonic()
            if not left:
                break
            if time.monotonic() - last_progress > args.timeout:
                break
            time.sleep(0.2)
    finally:
        q.stop(timeout=5.0)
        pkg_log.removeHandler(handler)
    st = q.stats()
    code = 0
    _err(f"replayed {st.replayed} entries into {store_path}")
    if st.quarantined_lines:
        _err(f"{_plural(st.quarantined_lines, 'line')} quarantined: see iai-queue spill status --dir {spill_dir}")
        code = 1
    if left:
        _err(f"gave up after {args.timeout:g}s without progress: {_plural(len(left), 'file')} left "
             f"({st.store_errors} store errors); they stay on disk and are replayed later")
        code = 1
    return code


def _cmd_requeue(args: argparse.Namespace) -> int:
    from .spill import is_quarantined_name, requeue

    path = _find_file(args)
    if not is_quarantined_name(path.name):
        raise _Fail(f"{path.name} is not a quarantined file (<stem>.failed-<ts>.jsonl)")
    try:
        target = requeue(path, force=args.force, store_path=args.store)
    except ValueError as exc:
        raise _Fail(f"{exc}; repair the file (iai-queue spill inspect shows the lines), or pass --force") from None
    _out(f"requeued {path.name} as {target.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
