"""The ``iai-queue`` command: ``bench`` (the main job), ``serve`` (an MCP memory server) and ``spill`` (operator tools).

Exit codes: 0 ok, 1 something needs attention, 2 usage error. Errors are one
line on stderr, never a traceback; usage errors are found before any long work.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence

__all__ = ["main", "build_parser", "plain_text", "positive_int", "nonempty_path"]

_REST_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`~?([^`]+)`")


def plain_text(doc: str) -> str:
    """reStructuredText markup (``literal``, :role:`target`) as plain text, for --help."""
    return _REST_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], doc).replace("``", "")


def nonempty_text(text: str) -> str:
    """An argparse type: any non-empty string (a path or a URI)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonempty_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (an empty path would mean the current directory)")
    return Path(text).expanduser()


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2 (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("iai_queue")
    except Exception:  # not installed (run from a checkout): the package's own number
        from . import __version__

        return __version__

_SPILL_DOC = """Inspect and repair the provenance spill directory.

The spill directory holds provenance entries the store could not take yet
(pending files, replayed automatically), the write-ahead journals of queues
with durability other than "memory" (<stem>.wal segments, replayed once their
writer is gone), and lines that could not be written
(quarantined files, <stem>.failed-<ts>.jsonl, with the reasons in a .reason
file beside them). Quarantined files wait for an operator: inspect, repair,
requeue."""


class _Fail(Exception):
    """A one-line error for stderr; exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    from . import bench, server

    parser = _Parser(prog="iai-queue", description=plain_text(__doc__.split("\n\n")[0]))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.add_arguments(sub.add_parser("bench", help="benchmark enqueue and recall latency",
                                       description=plain_text(bench.__doc__.split("\n\n")[0])))
    server.add_arguments(sub.add_parser("serve", help="run the reference MCP memory server (stdio by default)",
                                        description=plain_text(server.__doc__.split("\n\n")[0])))
    spill = sub.add_parser("spill", help="inspect and repair the spill directory", description=_SPILL_DOC,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_spill_commands(spill)
    return parser


def _add_spill_commands(spill: argparse.ArgumentParser) -> None:
    common = _Parser(add_help=False)
    common.add_argument("--dir", type=nonempty_path, metavar="DIR",
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
    p.add_argument("file", type=nonempty_path, metavar="FILE", help="a spill or quarantined file (a bare name is looked up in --dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("replay", parents=[common], help="drain the spill directory into a store now",
                       description="Write the pending files and dead writers' journals of STORE into it "
                                   "now, progress on stderr. Safe while other processes use the store: files "
                                   "and journals of a live writer are left to it, and orphaned ones are "
                                   "replayed by one process at a time.")
    p.add_argument("--store", type=nonempty_text, required=True, metavar="PATH|URI",
                   help="the memory store: a LanceDB directory, or an object-store URI (s3://bucket/prefix)")
    add_storage_option_argument(p)
    p.add_argument("--dim", type=positive_int, metavar="N", help="embedding size (default: read from the store)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up after this long without progress (default 60)")

    p = sub.add_parser("requeue", parents=[common], help="put a repaired quarantined file back in the queue",
                       description="Validate a quarantined FILE (<stem>.failed-<ts>.jsonl) and move it back into "
                                   "the spill queue under a pending name; its .reason file is removed. "
                                   "Refuses (exit 1) while lines are still bad, unless --force.")
    p.add_argument("file", type=nonempty_path, metavar="FILE", help="the quarantined file (a bare name is looked up in --dir)")
    p.add_argument("--force", action="store_true", help="requeue even with bad lines (they are quarantined again)")
    p.add_argument("--store", type=nonempty_path, metavar="PATH",
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
    if args.command == "serve":
        from . import server

        return server.run(args)
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


def _store_label(tag: Optional[str], locations: dict[str, str]) -> str:
    if tag is None:
        return "any store (file not named by this library)"
    return f"{locations[tag]} ({tag})" if tag in locations else f"store {tag} (location not recorded)"


def _cmd_status(args: argparse.Namespace) -> int:
    from .journal_cli import journal_counts, journal_summary
    from .spill import status
    from .spill.stores import store_locations

    st = status(_spill_dir(args))
    locations = store_locations(st.path)
    d = st.as_dict()
    d.update(journal_counts(st))
    d["stores"] = {tag: locations.get(tag) for tag in sorted({f.store for f in st.files if f.store})}
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
        if (journal_line := journal_summary(st, _size)) is not None:
            _out(journal_line)
        if st.files:
            _out("")
            _out(f"{'STATE':<12} {'ENTRIES':>7} {'SIZE':>10} {'AGE':>7}  {'WRITER':<8} {'STORE':<8} FILE")
            for f in st.files:
                writer = {True: "live", False: "gone", None: "-"}[f.writer_alive]
                _out(f"{f.state:<12} {f.entries:>7} {_size(f.bytes):>10} {_age(f.age_s):>7}  {writer:<8} "
                     f"{f.store or '-':<8} {f.name}")
        if d["stores"]:
            _out("")
            _out("STORE     LOCATION")
            for tag, location in d["stores"].items():
                _out(f"{tag}  {location or '(not recorded)'}")
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
    from .journal_cli import replay_dead_journals
    from .spill import status
    from .spill.stores import record_store_location, store_locations
    from .store import MemoryStore
    from .writebehind import Replayer
    from .writebehind.lifecycle import GiveUp, StopSignal

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

    tag = store.identity  # what the queue's spill names carry for this store
    record_store_location(spill_dir, store.path)  # only where the directory exists; never creates it
    files = [f for f in status(spill_dir).files if f.state in ("pending", "claimed", "journal")]
    ours = [f for f in files if f.store in (tag, None)]
    live = [f for f in ours if f.writer_alive]
    others = [f for f in files if f.store not in (tag, None)]
    todo = [f for f in ours if not f.writer_alive]
    if others:
        locations = store_locations(spill_dir)
        _err(f"{_plural(len(others), 'file')} belong to other stores: not touched")
        by_store: dict[Optional[str], list] = {}
        for f in others:
            by_store.setdefault(f.store, []).append(f.name)
        for other_tag, names in sorted(by_store.items(), key=lambda kv: kv[0] or ""):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            _err(f"  {_store_label(other_tag, locations)}: {shown}")
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
    replayer = Replayer.for_store(store, spill_dir)
    counts = replayer.ledger.n
    left: list = []
    gave_up = False
    pkg_log.addHandler(handler)
    try:
        journals = replay_dead_journals(store, spill_dir, args.timeout, _err)  # dead writers' journals first
        last_progress = time.monotonic()
        while True:
            stop = StopSignal()
            stop.deadline = last_progress + args.timeout  # a failing store: give up after this long without progress
            progressed = False
            try:
                progressed = replayer.replay_some(stop)
            except GiveUp:
                gave_up = True
            left = replayer.directory.replayable()
            if progressed and not gave_up:
                last_progress = time.monotonic()
                _err(f"  {counts['replayed']} entries replayed, {_plural(len(left), 'file')} left")
            if not left or gave_up or time.monotonic() - last_progress > args.timeout:
                break
            if not progressed:
                time.sleep(0.2)  # another process holds the replay lock
    finally:
        pkg_log.removeHandler(handler)
    code = 0
    _err(f"replayed {counts['replayed'] + journals.replayed} entries into {store_path}")
    if counts["quarantined_lines"]:
        _err(f"{_plural(counts['quarantined_lines'], 'line')} quarantined: see iai-queue spill status --dir {spill_dir}")
        code = 1
    if journals.damaged_spans:
        _err(f"{_plural(journals.damaged_spans, 'damaged journal span')} set aside: see iai-queue spill status "
             f"--dir {spill_dir}")
        code = 1
    if left or journals.left:
        _err(f"gave up after {args.timeout:g}s without progress: {_plural(len(left) + journals.left, 'file')} left "
             f"({counts['store_errors'] + journals.store_errors} store errors); they stay on disk and are "
             f"replayed later")
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
