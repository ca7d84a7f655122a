"""Clustering the provenance table: each record's rows kept together, so get() reads a few runs, not a row per page.

Rows are appended in arrival order, so one record's rows end up scattered over
the whole table and a lookup reads one page per row (61–153 ms at 10 M rows,
~1 000 rows per record, BTree index or not). :class:`ProvenanceClusterer`
rewrites fragments into *runs* sorted by ``(record_id, seq)``, where one
record's rows are contiguous (1–4 ms for the same lookup), and merges runs
size-tiered, as LSM trees do. Runs stop growing at ``max_run_rows``, so a
record lives in at most ``fanout - 1`` runs per lower tier plus one per settled
run: about N / 2 Mi of those (5 at 10 M rows, 50 at 100 M), which is where
get() grows again.

Costs: a merge holds its rows in memory (up to ``max_run_rows`` rows with their
entries; a single unsorted fragment larger than that, which LanceDB's own
compaction does not write, is sorted whole). Small runs under ``base_rows`` are
rewritten with every run's new rows (at most ``base_rows`` rows each time). A
process reads the ``record_id`` column of each fragment once to learn whether
it is sorted (the whole table, ~1–2 s at 10 M rows, on its first run).

Guarantees:

* One Lance ``Rewrite`` commit per merge: readers see the old fragments or the
  new run, never both, never neither; the run holds exactly the rows it
  replaces (row counts and entry ids unchanged).
* Appends committed while a merge runs are untouched: Lance rebases a
  ``Rewrite`` over concurrent ``Append`` commits. A merge that conflicts with
  another maintainer's rewrite of the same fragments is refused whole and left
  for the next run; a process killed mid-merge leaves only unreferenced files
  (the run it was writing), which Lance's cleanup deletes once they are 7 days old.
* The layout never decides what get() returns: it sorts by ``seq`` and keeps the
  first row of an entry id, whatever the fragments hold.

Merged rows are unindexed until the indexes are brought up to date, which
:meth:`~iai_queue.store_maintenance.TableMaintenance.run` does right after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ClusterPolicy", "ProvenanceClusterer", "plan_merges"]

log = logging.getLogger("iai_queue.maintenance")


@dataclass(frozen=True)
class ClusterPolicy:
    """Size tiers: tier 0 is under ``base_rows``; tier ``t`` holds ``base_rows * fanout**(t-1)`` up to
    ``fanout`` times that. ``fanout`` fragments of one tier merge into one run of the next; fragments
    that ``fanout`` of would exceed ``max_run_rows`` are settled (a merge's memory stays bounded)."""

    base_rows: int = 32_768
    fanout: int = 4
    max_run_rows: int = 2_097_152

    def __post_init__(self) -> None:
        for name, least in (("base_rows", 1), ("fanout", 2), ("max_run_rows", self.base_rows)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _tier(rows: int, policy: ClusterPolicy) -> int:
    tier, bound = 0, policy.base_rows
    while rows >= bound:
        tier += 1
        bound *= policy.fanout
    return tier


def plan_merges(fragments: Sequence[tuple[int, int, bool]], policy: ClusterPolicy = ClusterPolicy()) -> list[list[int]]:
    """Which fragments to merge: groups of fragment ids, from ``(fragment id, rows, sorted)`` triples.

    Unsorted fragments (raw appends, or runs an older ``optimize()`` concatenated)
    and sorted ones under ``base_rows`` form tier 0; it is rewritten in groups of
    at most ``max_run_rows`` whenever a group holds two fragments or an unsorted
    one of ``base_rows`` or more. A higher tier merges ``fanout`` fragments at a
    time, smallest first, unless that would exceed ``max_run_rows``.
    """
    tiers: dict[int, list[tuple[int, int]]] = {}
    for fid, rows, is_sorted in fragments:
        if rows > 0:
            tiers.setdefault(_tier(rows, policy) if is_sorted else 0, []).append((rows, fid))
    unsorted_large = {fid for fid, rows, is_sorted in fragments if not is_sorted and rows >= policy.base_rows}
    groups: list[list[int]] = []
    for tier, members in sorted(tiers.items()):
        members.sort()
        if tier == 0:
            chunks: list[list[int]] = [[]]
            total = 0
            for rows, fid in members:
                if total + rows > policy.max_run_rows and chunks[-1]:
                    chunks.append([])
                    total = 0
                chunks[-1].append(fid)
                total += rows
            groups.extend(c for c in chunks if len(c) > 1 or (c and c[0] in unsorted_large))
            continue
        while len(members) >= policy.fanout:
            chunk, members = members[:policy.fanout], members[policy.fanout:]
            if sum(rows for rows, _ in chunk) > policy.max_run_rows:
                break
            groups.append([fid for _, fid in chunk])
    return groups


def _sorted_run(rows: pa.Table) -> pa.Table:
    return rows.sort_by([("record_id", "ascending"), ("seq", "ascending")])


def _is_sorted(fragment) -> bool:
    ids = fragment.to_table(columns=["record_id"]).column("record_id")
    return len(ids) < 2 or not pc.any(pc.less(ids[1:], ids[:-1])).as_py()


class ProvenanceClusterer:
    """Keeps one provenance table clustered (see the module's guarantees); one per store.

    Whether a fragment is sorted is read once per fragment and remembered while
    it exists: Lance never reuses a fragment id nor changes a fragment's rows in place.
    """

    def __init__(self, table, policy: ClusterPolicy = ClusterPolicy()):
        self._table = table
        self._policy = policy
        self._sorted: dict[int, bool] = {}

    def run(self) -> int:
        """Merge what :func:`plan_merges` picks from the fragments there are now, one ``Rewrite`` commit per
        group; returns rows rewritten.

        Planned once per call: appends that arrive meanwhile wait for the next
        call (so a steady writer cannot keep it going), and so does a run a
        merge makes that could merge again. Raises what Lance raises, a conflict
        with another maintainer's rewrite included: nothing of the refused merge
        is visible, and the merges committed before it stay.
        """
        import lance  # pylance: the Rewrite commit LanceDB's API does not expose

        dataset, fragments = self._snapshot()
        known = self._sorted
        self._sorted = {fid: known[fid] if fid in known else _is_sorted(f) for fid, f in fragments.items()}
        groups = plan_merges([(fid, f.metadata.physical_rows - f.metadata.num_deletions, self._sorted[fid])
                              for fid, f in fragments.items()], self._policy)
        rewritten = 0
        for i, group in enumerate(groups):
            if i:
                dataset, fragments = self._snapshot()
                if not all(fid in fragments for fid in group):
                    continue  # another maintainer merged some of them meanwhile
            members = [fragments[fid] for fid in group]
            run = _sorted_run(dataset.scanner(fragments=members).to_table())
            new = lance.fragment.write_fragments(run, dataset, schema=dataset.schema,
                                                 max_rows_per_file=max(self._policy.max_run_rows, run.num_rows),
                                                 data_storage_version=dataset.data_storage_version)
            op = lance.LanceOperation.Rewrite(groups=[lance.LanceOperation.RewriteGroup(
                old_fragments=[f.metadata for f in members], new_fragments=new)], rewritten_indices=[])
            lance.LanceDataset.commit(dataset, op, read_version=dataset.version)
            rewritten += run.num_rows
            log.debug("provenance: %d fragments (%d rows) merged into a sorted run", len(members), run.num_rows)
        return rewritten

    def _snapshot(self):
        """The latest version (opened with the connection's storage options) and its fragments by id."""
        dataset = self._table.to_lance()
        return dataset, {f.fragment_id: f for f in dataset.get_fragments()}
