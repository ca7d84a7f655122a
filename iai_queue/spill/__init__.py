"""The spill directory: provenance pairs that did not fit in memory, on disk.

A package that never imports the queue. Its parts, each with the rules it
implements written at its top:

- :mod:`.names` — where the directory is; file names and the state each name says
  (``FileState``: tmp → pending → claimed → removed, or quarantined).
- :mod:`.codec` — the line format (one pair per JSON line) and the parser that
  tells a good line from a bad one.
- :mod:`.locks` — ``flock``: which writers are alive, who may replay orphans.
- :mod:`.directory` — :class:`SpillDirectory`: durable writes, claims,
  removal, quarantine (spill guarantee: a crash never leaves half a ``.jsonl``).
- :mod:`.durable` — private directory, full writes, fsynced renames.
- :mod:`.housekeeping` — what dead writers leave: ``.tmp`` files, lock files.
- :mod:`.quarantine_files` — ``<stem>.failed-<ts>.jsonl`` / ``.wal`` and their ``.reason``.
- :mod:`.operator` — ``status``, ``inspect_file``, ``requeue`` for operators.
"""

from .codec import BadLine, ParsedSpill, SpillLine, encode_line, parse_file, parse_line
from .directory import SpillDirectory
from .names import FileState, default_spill_dir, is_pending_name, is_quarantined_name, store_tag
from .operator import LineReport, SpillFileInfo, SpillStatus, inspect_file, requeue, status

__all__ = [
    "BadLine", "FileState", "LineReport", "ParsedSpill", "SpillDirectory", "SpillFileInfo",
    "SpillLine", "SpillStatus", "default_spill_dir", "encode_line", "inspect_file", "is_pending_name",
    "is_quarantined_name", "parse_file", "parse_line", "requeue", "status", "store_tag",
]
