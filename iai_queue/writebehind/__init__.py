"""The write-behind core: ``enqueue`` on the recall path, a daemon worker writing coalesced batches.

Where each guarantee lives (its full text is at the top of that module):

==  ===========================  ==============================================
1   store outages                :mod:`.delivery` (retry, backoff with jitter)
2   poison pairs                 :mod:`.delivery` (bisection, probe), :mod:`.quarantine`
3   exactly-once effect          :mod:`iai_queue.pairs` (entry ids), :mod:`.delivery` (verify),
                                 :mod:`iai_queue.provenance_table` (skip stored ids; first-wins ``get()``)
4   order                        :mod:`.admission` (route), :mod:`.worker` (refill), :mod:`.spilling` (names)
5   spill files                  :mod:`iai_queue.spill.directory`, :mod:`.replay`
6   several processes, one dir   :mod:`iai_queue.spill.directory` (claims, locks), :mod:`.replay`
7   lifecycle                    :mod:`.lifecycle`, :mod:`.stopping` (drain), :mod:`.closed`
8   fork                         :mod:`.facade`
9   exit                         :mod:`.facade`
10  disk trouble                 :mod:`.admission`, :mod:`.spilling`
11  write-ahead journal          :mod:`.journaling` (enqueue, fallback), :mod:`.journal_backlog` (refill),
                                 :mod:`iai_queue.journal` (segments, fsync, checkpoints)
12  journal recovery             :mod:`.journal_replay` (claim, deliver, checkpoint),
                                 :mod:`.journal_merge` (bulk decode, commits, merge with spill files)
--  flush                        :mod:`.ledger`
--  the one drop path            :mod:`.admission`
==  ===========================  ==============================================

The parts, data first: :mod:`.config` (options) → :mod:`.admission` (memory,
route, backpressure) → :mod:`.worker` (coalescing) → :mod:`.delivery` (the
store) ; :mod:`.spilling` (memory → disk) and :mod:`.replay` (disk → store)
through :mod:`iai_queue.spill`; :mod:`.ledger` (numbers, done-marks, counters)
and :mod:`.lifecycle` (states, stop signal, backoff) beside them;
:mod:`.threads` (supervised threads of a run) and :mod:`.stopping` (the drain
at ``stop()``); :mod:`.facade` puts them together. Write-ahead mode
(``durability`` other than memory) adds :mod:`.journaling` (the journaled
``enqueue`` and the journal thread) with :mod:`.journal_backlog` (calls on disk
only, read back into memory), and recovery of dead writers' journals:
:mod:`.journal_replay` (which segments, when, and deleting them) with
:mod:`.journal_merge` (their bytes into store writes).

What is not promised: entries still in memory when the process is SIGKILLed
are lost — at most ``max_queue_size`` batches, ``max_memory_pairs`` pairs on
their way to disk, and the batch being written (``max_batch_pairs``).
"""

from .facade import ProvenanceWriteQueue
from .replay import Replayer
from .stats import QueueStats

__all__ = ["ProvenanceWriteQueue", "QueueStats", "Replayer"]
