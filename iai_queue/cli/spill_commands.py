"""``iai-queue spill``: the operator tools for the spill directory (status, inspect, requeue; replay in
:mod:`.spill_replay`).

Exit codes: 0 ok, 1 something needs attention (quarantined files with
``--check``, bad lines, a refused requeue, any error), 2 usage error, 130
interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

from .args import Parser, add_storage_option_argument, nonempty_path, nonempty_text, positive_int
from .output import Fail, age, err, out, plural, size
from .spill_paths import find_file, spill_dir_of
from .spill_replay import cmd_replay

__all__ = ["SPILL_DOC", "add_spill_commands", "run_spill"]

SPILL_DOC = """Inspect and repair the provenance spill directory.

The spill directory holds provenance entries the store could not take yet
(pending files, replayed automatically), the write-ahead journals of queues
with durability other than "memory" (<stem>.wal segments, replayed once their
writer is gone), and lines that could not be written
(quarantined files, <stem>.failed-<ts>.jsonl, with the reasons in a .reason
file beside them). Quarantined files wait for an operator: inspect, repair,
requeue."""


def add_spill_commands(spill: argparse.ArgumentParser) -> None:
    common = Parser(add_help=False)
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


def run_spill(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "status": _cmd_status, "inspect": _cmd_inspect, "replay": cmd_replay, "requeue": _cmd_requeue}
    prefix = f"iai-queue spill {args.spill_command}"
    try:
        return commands[args.spill_command](args)
    except Fail as exc:
        err(f"{prefix}: error: {exc}")
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        err(f"{prefix}: error: {exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        err(f"{prefix}: interrupted")
        return 130
    except Exception as exc:  # an operator tool reports, it does not dump a traceback
        err(f"{prefix}: error: {type(exc).__name__}: {exc}")
    return 1


def _cmd_status(args: argparse.Namespace) -> int:
    from ..spill import status
    from ..spill.stores import store_locations
    from .journals import journal_counts, journal_summary

    st = status(spill_dir_of(args))
    locations = store_locations(st.path)
    d = st.as_dict()
    d.update(journal_counts(st))
    d["stores"] = {tag: locations.get(tag) for tag in sorted({f.store for f in st.files if f.store})}
    if args.json:
        out(json.dumps(d, indent=2))
    else:
        out(f"spill directory  {st.path}{'' if st.exists else '  (does not exist: nothing spilled)'}")
        out(f"pending          {plural(d['pending_files'], 'file')} ({d['claimed_files']} claimed), "
            f"{plural(d['pending_entries'], 'entry', 'entries')}, {size(d['pending_bytes'])}")
        out(f"oldest           {age(d['oldest_age_s'])}")
        out(f"quarantined      {plural(d['quarantined_files'], 'file')}, {plural(d['quarantined_lines'], 'line')}")
        if d["tmp_files"]:
            out(f"being written    {plural(d['tmp_files'], 'file')}")
        if d["unreadable_files"]:
            out(f"unreadable       {plural(d['unreadable_files'], 'file')} (left alone by replay; see below)")
        if (journal_line := journal_summary(st, size)) is not None:
            out(journal_line)
        if st.files:
            out("")
            out(f"{'STATE':<12} {'ENTRIES':>7} {'SIZE':>10} {'AGE':>7}  {'WRITER':<8} {'STORE':<8} FILE")
            for f in st.files:
                writer = {True: "live", False: "gone", None: "-"}[f.writer_alive]
                entries = "?" if f.problem is not None else f.entries
                problem = f"  ({f.problem})" if f.problem is not None else ""
                out(f"{f.state:<12} {entries:>7} {size(f.bytes):>10} {age(f.age_s):>7}  {writer:<8} "
                    f"{f.store or '-':<8} {f.name}{problem}")
        if d["stores"]:
            out("")
            out("STORE     LOCATION")
            for tag, location in d["stores"].items():
                out(f"{tag}  {location or '(not recorded)'}")
        if d["quarantined_files"]:
            out("")
            out("quarantined files need an operator: iai-queue spill inspect FILE, repair it, "
                "then iai-queue spill requeue FILE")
    if args.check and d["quarantined_files"]:
        err(f"iai-queue spill status: {plural(d['quarantined_files'], 'quarantined file')} in {st.path}")
        return 1
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..spill import inspect_file

    path = find_file(args)
    reports = inspect_file(path)
    reason_file = path.with_suffix(".reason")
    try:
        recorded = reason_file.read_text(errors="replace").splitlines() if path.name.endswith(".jsonl") else []
    except FileNotFoundError:
        recorded = []
    bad = [r for r in reports if r.problem]
    good = len(reports) - len(bad) if reports[0].lineno else 0
    if args.json:
        out(json.dumps({"file": str(path), "ok_lines": good, "bad_lines": len(bad),
                        "lines": [{"line": r.lineno, "ok": r.problem is None, "problem": r.problem,
                                   "bytes": r.bytes, "record_id": r.record_id, "entry_id": r.entry_id}
                                  for r in reports],
                        "recorded_reasons": recorded}, indent=2))
    else:
        for r in reports:
            where = f"line {r.lineno}" if r.lineno else "file"
            out(f"{where}: ok  record {r.record_id}" if r.problem is None else f"{where}: BAD  {r.problem}")
        if recorded:
            out(f"reasons recorded in {reason_file.name}:")
            for line in recorded:
                out(f"  {line}")
        out(f"{path.name}: {good} ok, {len(bad)} bad")
    return 1 if bad else 0


def _cmd_requeue(args: argparse.Namespace) -> int:
    from ..spill import is_quarantined_name, requeue

    path = find_file(args)
    if not is_quarantined_name(path.name):
        raise Fail(f"{path.name} is not a quarantined file (<stem>.failed-<ts>.jsonl)")
    try:
        target = requeue(path, force=args.force, store_path=args.store)
    except ValueError as exc:
        raise Fail(f"{exc}; repair the file (iai-queue spill inspect shows the lines), or pass --force") from None
    out(f"requeued {path.name} as {target.name}")
    return 0
