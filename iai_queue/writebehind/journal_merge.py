"""A journal segment's suffix into the store: bulk-decoded, merged by seq with its writer's spill lines, in commits.

The part of recovery that turns bytes into store writes, for
:class:`~iai_queue.writebehind.journal_replay.JournalReplayer` (which finds,
claims and deletes segments, and checkpoints). Guarantees:

- Only what follows the checkpoint: records at or below ``done_up_to`` are
  left out (found by a binary search over seqs, then filtered), and so are
  entry ids the store already has (``stored``: looked up once per segment by
  entry-id range, or, where that cannot be trusted, every batch is verified).
- In order: records in file order, each writer's spill lines (calls its
  journal refused, e.g. on a full disk) placed before the first record with a
  higher seq, so a writer's calls land in the order they were accepted, per
  record; the lines after its last segment follow it (:meth:`SpillMerges.finish`).
- Bounded memory: payloads are decoded ``RUN_BYTES`` of journal at a time and
  written ``COMMIT_PAIRS`` pairs (or ``COMMIT_BYTES`` of journal) per store write.
- Damage is judged exactly as the reader judges it: the bulk check stops at
  the first record it would reject, and from there
  :func:`~iai_queue.journal.reader.scan_records` decides (its good records
  after the damage are delivered verified); the damaged spans are returned.
  For a store that takes entries as their JSON (``CommitBuffer.encoded``), a
  run whose records all pass the same checks goes to it undecoded
  (:func:`~iai_queue.journal.bulk.decode_run_encoded`); any other run takes
  the path above.

Store writes go through the ``commit`` callable the replayer passes in.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import deque
from typing import Callable, Iterator, Optional

from ..events import emit
from ..journal.bulk import decode_run, decode_run_encoded, entry_id_ranges, first_after, first_bad, seq_at
from ..journal.format import JournalHeader
from ..journal.reader import Damage, good_frames, scan_records
from ..spill import SpillDirectory, parse_file
from ..spill.names import is_pending_name, parse_name, stem_of
from .lifecycle import StopSignal

__all__ = ["COMMIT_BYTES", "COMMIT_PAIRS", "RUN_BYTES", "Commit", "CommitBuffer", "Replayed", "SpillMerge",
           "SpillMerges", "decode_suffix"]

log = logging.getLogger("iai_queue.queue")

COMMIT_PAIRS = 65_536  # pairs per store write in a replay (one LanceDB commit each)
COMMIT_BYTES = 32 << 20  # and at most this many journal bytes' worth (records with many pairs)
RUN_BYTES = 1 << 20  # journal bytes decoded per call

# One store write of a replay: (pairs, entry ids, verify, stop); raises as Delivery.deliver does.
Commit = Callable[[list, list, bool, StopSignal], None]


class Replayed:
    __slots__ = ("records", "pairs", "seqs", "own_run")

    def __init__(self, own_run: bool = False):
        self.records = 0
        self.pairs = 0
        self.seqs: list[int] = []  # kept only for our own stopped run (its ledger marks them done)
        self.own_run = own_run


class CommitBuffer:
    """Records gathered into store writes of up to COMMIT_PAIRS pairs (a LanceDB commit costs about the same
    for 256 rows or 50 000), with their entry ids; ids in ``stored`` (already in the store) are left out.
    ``merge``: (seq, pair, entry id) of the writer's spill lines, by seq, placed among the records."""

    def __init__(self, commit: Commit, prefix: str, stop: StopSignal, out: Replayed, verify: bool,
                 merge: Optional[deque] = None):
        self.commit = commit
        self.prefix = prefix
        self.stop = stop
        self.out = out
        self.verify = verify
        self.encoded = False  # the store takes entries as their JSON (EncodedEntry): runs are not decoded to dicts
        self.stored: set = set()
        self.floor = 0  # records at or below this seq are in the store already
        self.merge = merge
        self.pairs: list = []
        self.entry_ids: list = []
        self.bytes = 0

    def add(self, records, size: int) -> None:
        if records and self.floor and records[0][0] <= self.floor:  # seqs increase: only a first run has any
            records = [r for r in records if r[0] > self.floor]
        pairs, eids = self.pairs, self.entry_ids
        merge = self.merge
        if not merge and all(len(items) == 1 for _, items in records):  # one pair per call: in bulk
            pairs += [items[0] for _, items in records]
            eids += self._one_pair_ids([seq for seq, _ in records])
            records_iter = ()
        else:
            records_iter = records
        for seq, items in records_iter:
            while merge and merge[0][0] < seq:  # the writer's spill lines that come before this call
                _, pair, eid = merge.popleft()
                pairs.append(pair)
                eids.append(eid)
            pairs += items
            eids += self._ids(seq, len(items))
        self._added(len(records), [seq for seq, _ in records] if self.out.own_run else (), size)

    def add_encoded(self, seqs: list[int], pairs: list, counts: Optional[list[int]], size: int) -> None:
        """Records from :func:`~iai_queue.journal.bulk.decode_run_encoded` (all above ``floor``; no merge):
        their pairs, entries still JSON, and their entry ids."""
        self.pairs += pairs
        if counts is None:
            self.entry_ids += self._one_pair_ids(seqs)
        else:
            for seq, n in zip(seqs, counts):
                self.entry_ids += self._ids(seq, n)
        self._added(len(seqs), seqs if self.out.own_run else (), size)

    # The entry ids of a call, ``<prefix><seq:x>.<index>`` (iai_queue.pairs.EntryIds): one place here.

    def _one_pair_ids(self, seqs: list[int]) -> Iterator[str]:
        return map((self.prefix.replace("%", "%%") + "%x.0").__mod__, seqs)

    def _ids(self, seq: int, n: int) -> list[str]:
        head = f"{self.prefix}{seq:x}."
        return [head + str(k) for k in range(n)]

    def _added(self, n_records: int, seqs, size: int) -> None:
        out = self.out
        out.records += n_records
        out.seqs += seqs
        self.bytes += max(0, size)
        if len(self.pairs) >= COMMIT_PAIRS or self.bytes >= COMMIT_BYTES:
            self.flush()

    def flush(self) -> None:
        pairs, eids = self.pairs, self.entry_ids
        self.pairs, self.entry_ids, self.bytes = [], [], 0
        if self.stored and not self.stored.isdisjoint(eids):
            stored = self.stored
            keep = [k for k, e in enumerate(eids) if e not in stored]
            if len(keep) < len(eids):
                pairs, eids = [pairs[k] for k in keep], [eids[k] for k in keep]
        if not pairs:
            return
        for start in range(0, len(pairs), COMMIT_PAIRS):
            end = start + COMMIT_PAIRS
            self.commit(pairs[start:end], eids[start:end], self.verify, self.stop)
        self.out.pairs += len(pairs)


def decode_suffix(data: bytes, pos: int, prefix: str, done_up_to: int, sink: CommitBuffer,
                  stored_between: Optional[Callable[[str, str], set]]) -> list[Damage]:
    """Every good record of ``data`` (a segment, its records from ``pos``) after ``done_up_to`` into ``sink``,
    in order, and flushed; returns the damaged spans. ``stored_between``: the store's range lookup of entry
    ids, asked once for the suffix's range (None: the sink verifies every batch)."""
    bounds = good_frames(data, pos)
    first = first_after(data, bounds, done_up_to)
    sink.floor = done_up_to  # records at or below it are in the store (the search may not have skipped all)
    if stored_between is not None and first < len(bounds) - 1:
        last = seq_at(data, bounds, len(bounds) - 2)
        lo = seq_at(data, bounds, first)
        if lo is None or last is None or last < lo:
            sink.verify = True
        else:
            sink.stored = set().union(*(stored_between(a, b) for a, b in entry_id_ranges(prefix, lo, last)))
    last_seq = (seq_at(data, bounds, first - 1) or 0) if first else 0
    i, n = first, len(bounds) - 1
    encoded = sink.encoded and not sink.merge
    while i < n:
        j = bisect_left(bounds, bounds[i] + RUN_BYTES, i + 1, n)  # the records of about RUN_BYTES from i
        size = bounds[j] - bounds[i]
        if encoded:
            run = decode_run_encoded(data, bounds, i, j, max(last_seq, done_up_to))
            if run is not None:  # else: damage or records at or below the checkpoint; decoded below
                last_seq = run[0][-1]
                sink.add_encoded(*run, size)
                i = j
                continue
        objs = decode_run(data, bounds, i, j)
        bad = first_bad(objs, last_seq)
        if bad:
            last_seq = objs[bad - 1][0]
            sink.add(objs[:bad] if bad < len(objs) else objs, size)
        if bad < j - i:
            pos = bounds[i + bad]  # not a good record by the bulk check: the reader's policy decides
            break
        i = j
    else:
        pos = bounds[-1]
    damage: list[Damage] = []
    if pos < len(data):
        records, damage = scan_records(data, pos, last_seq)
        if records:
            sink.verify = True  # past the damage: not covered by the range lookup above
            sink.add([(r.seq, r.items) for r in records], 0)
    sink.flush()
    return damage


# -- a dead writer's spill files, merged into its journal by seq -----------------------------------

class SpillMerge:
    __slots__ = ("items", "done", "keep")

    def __init__(self) -> None:
        self.items: deque = deque()
        self.done: list = []  # claimed paths to remove once everything is in the store
        self.keep: list = []  # claimed files with bad lines, left for the spill replayer


class SpillMerges:
    """The spill files of dead write-ahead writers, claimed and held (per writer) while their journal is replayed.

    A write-ahead writer whose journal failed (disk full) took memory mode's
    path for those calls and may have spilled them. Its journal and those
    files together hold its calls; replayed merged by seq, they land in the
    order they were accepted, per record.
    """

    def __init__(self, directory: SpillDirectory):
        self.directory = directory
        self._merging: dict[str, SpillMerge] = {}  # writer -> its spill files, merged into its journal by seq

    def files_of(self, writer: Optional[str]) -> list[str]:
        """Pending or claimed spill files of ``writer`` for our store, oldest first."""
        if writer is None:
            return []
        out = []
        for n in self.directory.regular_names():
            if is_pending_name(n) or n.endswith(".claimed"):
                parts = parse_name(stem_of(n))
                if parts is not None and parts.writer == writer and parts.store == self.directory.store:
                    out.append(n)
        return sorted(out, key=stem_of)

    def claim(self, header: JournalHeader) -> Optional[SpillMerge]:
        """The writer's spill lines (calls its journal refused), claimed and ordered by seq; None if none.
        Raises OSError (a claim failed): the segment waits."""
        merge = self._merging.get(header.writer)
        if merge is not None:
            return merge
        names = self.files_of(header.writer)
        if not names:
            return None
        merge = SpillMerge()
        prefix = header.prefix
        rows = []
        for name in names:
            try:
                claimed, _ = self.directory.claim(name)
            except FileNotFoundError:
                continue
            parsed = parse_file(claimed, stem_of(claimed.name))
            for pair, eid in zip(parsed.pairs, parsed.entry_ids):
                rows.append((_seq_of(eid, prefix), pair, eid))
            if parsed.bad:
                merge.keep.append(claimed.name)  # its bad lines: the spill replayer quarantines them (verified)
            else:
                merge.done.append(claimed)
        rows.sort(key=lambda r: r[0])  # stable: a file's lines keep their order
        merge.items = deque(rows)
        self._merging[header.writer] = merge
        return merge

    def take(self, writer: str) -> Optional[SpillMerge]:
        """The writer's held merge, no longer held (None if none): after its last segment, or after a replay
        cut short (rebuilt from the claimed files next time, verified)."""
        return self._merging.pop(writer, None)

    def finish(self, merge: SpillMerge, sink: CommitBuffer, failed: Callable[[str, OSError], None]) -> None:
        """After the writer's last segment: its remaining spill lines through ``sink`` (verified), then its
        spill files go (``failed``: one that could not be removed; it is replayed again later, verified)."""
        if merge.items:
            sink.pairs = [pair for _, pair, _ in merge.items]
            sink.entry_ids = [eid for _, _, eid in merge.items]
            merge.items.clear()
            sink.flush()
        for claimed in merge.done:
            try:
                self.directory.remove(claimed)
            except FileNotFoundError:
                pass
            except OSError as exc:  # written, but still there: replayed again later, verified
                failed(claimed.name, exc)
        emit(log, logging.INFO, "journal.replay_spill_merged", files=len(merge.done) + len(merge.keep),
             left_for_quarantine=len(merge.keep))


def _seq_of(entry_id: str, prefix: str) -> int:
    """The call number in ``<prefix><seq:x>.<i>``; 0 (first) for an id of another prefix."""
    if not entry_id.startswith(prefix):
        return 0
    try:
        return int(entry_id[len(prefix):entry_id.index(".", len(prefix))], 16)
    except ValueError:
        return 0
