"""iai_queue: a LanceDB memory store with a write-behind provenance queue that loses nothing."""

import logging

from .core import adispatch, dispatch
from .pairs import ProvenanceBatch, ProvenanceSink
from .shutdown import GracefulShutdown, install_graceful_shutdown
from .spill import default_spill_dir, inspect_file, requeue
from .spill import status as spill_status
from .store import DuplicateIdError, MemoryRecord, MemoryStore
from .writebehind import ProvenanceWriteQueue, QueueStats

__version__ = "0.1.0"

# A library never decides where its logs go: without this, a host that configured
# no logging would see our warnings as bare lines on stderr (logging.lastResort).
logging.getLogger("iai_queue").addHandler(logging.NullHandler())

__all__ = [
    "DuplicateIdError",
    "GracefulShutdown",
    "MemoryRecord",
    "MemoryStore",
    "ProvenanceBatch",
    "ProvenanceSink",
    "ProvenanceWriteQueue",
    "QueueStats",
    "adispatch",
    "default_spill_dir",
    "dispatch",
    "inspect_file",
    "install_graceful_shutdown",
    "requeue",
    "spill_status",
]
