"""``iai-queue spill replay``: drain a store's pending spill files into it now, with the replay part itself.

Guarantee: files of a live writer and of other stores are never touched (only
named on stderr); the store is checked to exist and to be a memory store
before anything is replayed (replaying into a new store would skip every
entry); it gives up after ``--timeout`` seconds without progress and then
leaves the files on disk, exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional

from .args import storage_options_of
from .output import Fail, err, plural, store_label
from .spill_paths import spill_dir_of

__all__ = ["cmd_replay"]


def _store_dim(location, storage_options: Optional[dict[str, str]] = None) -> int:
    """The embedding size of the store at ``location``; Fail when it is not a memory store."""
    import lancedb

    try:
        table = lancedb.connect(location.uri, storage_options=storage_options).open_table("records")
    except ValueError:
        raise Fail(f"{location.display!r} is not a memory store (no records table)") from None
    size = getattr(table.schema.field("embedding").type, "list_size", None)
    if not isinstance(size, int) or size <= 0:
        raise Fail(f"{location.display!r} is not a memory store (no fixed-size embedding column)")
    return size


def _existing_store_location(text: str):
    """The parsed ``--store``; Fail for a local path that is missing or a file (never create a store)."""
    from ..location import StoreLocation

    try:
        location = StoreLocation.parse(text)
    except (TypeError, ValueError) as exc:
        raise Fail(str(exc)) from None
    path = location.local_path
    if path is not None:
        if not path.exists():
            raise Fail(f"store {str(path)!r} does not exist")  # replay into a new store would skip every entry
        if not path.is_dir():
            raise Fail(f"store {str(path)!r} is a file, not a memory store directory")
    return location


def cmd_replay(args: argparse.Namespace) -> int:
    from ..spill import status
    from ..spill.stores import record_store_location, store_locations
    from ..store import MemoryStore
    from ..writebehind import Replayer
    from ..writebehind.lifecycle import GiveUp, StopSignal
    from .journals import replay_dead_journals

    spill_dir = spill_dir_of(args)
    location = _existing_store_location(args.store)
    options = storage_options_of(args)
    if args.dim is not None and args.dim <= 0:
        raise Fail(f"--dim must be a positive int, got {args.dim}")
    found_dim = _store_dim(location, options)
    try:
        store = MemoryStore(location.uri, dim=args.dim if args.dim is not None else found_dim,
                            storage_options=options, maintenance="never")
    except (TypeError, ValueError) as exc:
        raise Fail(str(exc)) from None
    store_path = store.location  # shown to the operator: never holds credentials

    tag = store.identity  # what the queue's spill names carry for this store
    record_store_location(spill_dir, store.path)  # only where the directory exists; never creates it
    files = [f for f in status(spill_dir).files if f.state in ("pending", "claimed", "journal")]
    unreadable = [f for f in files if f.problem is not None]
    files = [f for f in files if f.problem is None]
    if unreadable:
        err(f"{plural(len(unreadable), 'file')} cannot be read: left alone: "
            + "; ".join(f"{f.name} ({f.problem})" for f in unreadable[:3])
            + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""))
    ours = [f for f in files if f.store in (tag, None)]
    live = [f for f in ours if f.writer_alive]
    others = [f for f in files if f.store not in (tag, None)]
    todo = [f for f in ours if not f.writer_alive]
    if others:
        locations = store_locations(spill_dir)
        err(f"{plural(len(others), 'file')} belong to other stores: not touched")
        by_store: dict[Optional[str], list] = {}
        for f in others:
            by_store.setdefault(f.store, []).append(f.name)
        for other_tag, names in sorted(by_store.items(), key=lambda kv: kv[0] or ""):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            err(f"  {store_label(other_tag, locations)}: {shown}")
    if live:
        pids = sorted({f.writer[1:].split("x")[0] for f in live if f.writer})
        err(f"{plural(len(live), 'file')} ({sum(f.entries for f in live)} entries) belong to a live writer "
            f"(pid {', '.join(pids)}), which replays them itself: left to it")
    if not todo:
        err(f"nothing to replay into {store_path}")
        return 0
    err(f"replaying {plural(len(todo), 'file')} ({sum(f.entries for f in todo)} entries) from {spill_dir} "
        f"into {store_path}")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("iai-queue: %(levelname)s %(message)s"))
    handler.setLevel(logging.WARNING)
    pkg_log = logging.getLogger("iai_queue")
    rows_before = store.provenance_rows()
    replayer = Replayer.for_store(store, spill_dir)
    counts = replayer.ledger.n
    left: list = []
    gave_up = False
    pkg_log.addHandler(handler)
    try:
        journals = replay_dead_journals(store, spill_dir, args.timeout, err)  # dead writers' journals first
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
                err(f"  {counts['replayed']} entries replayed, {plural(len(left), 'file')} left")
            if not left or gave_up or time.monotonic() - last_progress > args.timeout:
                break
            if not progressed:
                time.sleep(0.2)  # another process holds the replay lock
    finally:
        pkg_log.removeHandler(handler)
    code = 0
    replayed = counts["replayed"] + journals.replayed
    added = store.provenance_rows() - rows_before  # other writers may add rows meanwhile: a hint, not a check
    err(f"replayed {replayed} entries into {store_path}"
        + (f": {added} rows added (the rest are for records the store does not have, or were already in it)"
           if 0 <= added < replayed else ""))
    if counts["quarantined_lines"]:
        err(f"{plural(counts['quarantined_lines'], 'line')} quarantined: see iai-queue spill status --dir {spill_dir}")
        code = 1
    if journals.damaged_spans:
        err(f"{plural(journals.damaged_spans, 'damaged journal span')} set aside: see iai-queue spill status "
            f"--dir {spill_dir}")
        code = 1
    if left or journals.left:
        err(f"gave up after {args.timeout:g}s without progress: {plural(len(left) + journals.left, 'file')} left "
            f"({counts['store_errors'] + journals.store_errors} store errors); they stay on disk and are "
            f"replayed later")
        code = 1
    return code
