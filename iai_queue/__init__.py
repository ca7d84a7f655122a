"""iai_queue: a LanceDB memory store with a write-behind provenance queue that loses nothing."""

from .core import adispatch, dispatch
from .provenance_queue import ProvenanceWriteQueue, QueueStats
from .spill import default_spill_dir
from .store import MemoryRecord, MemoryStore, ProvenanceBatch

__version__ = "0.1.0"

__all__ = [
    "MemoryRecord",
    "MemoryStore",
    "ProvenanceBatch",
    "ProvenanceWriteQueue",
    "QueueStats",
    "adispatch",
    "default_spill_dir",
    "dispatch",
]
