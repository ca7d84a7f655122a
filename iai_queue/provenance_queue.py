"""``iai_queue.provenance_queue``: the seed contract's import path for the queue.

The queue lives in :mod:`iai_queue.writebehind` (one module per part; its
package docstring says where each guarantee lives).
"""

from .pairs import ProvenanceSink, validate_pairs
from .writebehind import ProvenanceWriteQueue, QueueStats

__all__ = ["ProvenanceWriteQueue", "QueueStats", "ProvenanceSink", "validate_pairs"]
