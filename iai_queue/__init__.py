"""iai_queue: a LanceDB memory store with a write-behind provenance queue that loses nothing."""

from .core import adispatch, dispatch
from .pairs import ProvenanceBatch, ProvenanceSink
from .spill import default_spill_dir
from .store import MemoryRecord, MemoryStore
from .writebehind import ProvenanceWriteQueue, QueueStats

__version__ = "0.1.0"

__all__ = [
    "MemoryRecord",
    "MemoryStore",
    "ProvenanceBatch",
    "ProvenanceSink",
    "ProvenanceWriteQueue",
    "QueueStats",
    "adispatch",
    "default_spill_dir",
    "dispatch",
]
