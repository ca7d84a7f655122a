"""Writes a journal as a writer that then goes away: ``python tests/_journal_writer.py <json args>``.

Args: ``db``, ``spill_dir``, ``ids`` (record ids), ``seqs`` (one one-pair call ``{"c": 0, "n": seq}`` per seq,
round-robin over ``ids``), ``land`` (seqs whose pairs are also appended to the store with the entry ids the
queue would use, as the writer's worker would have), ``checkpoint`` (the writer's done-watermark), ``spill_runs``
(lists of seqs written as spill files of the same writer, one file per list, after the journal), ``hold``
(stay alive, the writer lock held, until stdin closes).
Prints ``{"prefix": ...}``. Its own process: the replayer sees another pid, as after a crash.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(a: dict) -> None:
    from iai_queue import MemoryStore
    from iai_queue.journal import Durability, JournalWriter, write_checkpoint
    from iai_queue.pairs import ProvenanceBatch
    from iai_queue.spill import SpillDirectory

    store = MemoryStore(a["db"], dim=8, maintenance="never")
    ids = [UUID(x) for x in a["ids"]]
    prefix = f"qw{os.getpid():x}-"
    sd = SpillDirectory(a["spill_dir"], store_path=store.path, tag=store.identity)
    w = JournalWriter(sd, prefix, Durability.PROCESS)
    w.open()
    land = set(a["land"])
    pairs, eids = [], []
    with w.lock:
        for seq in a["seqs"]:
            item = (ids[seq % len(ids)], {"c": 0, "n": seq})
            w.append_locked(seq, (item,))
            if seq in land:
                pairs.append(item)
                eids.append(f"{prefix}{seq:x}.0")
    if pairs:
        store.append_provenance_batch(ProvenanceBatch(pairs, eids))
    for run in a.get("spill_runs", []):  # calls the journal refused (disk full), spilled as memory mode does
        from iai_queue.spill import encode_line

        sd.write([encode_line(ids[seq % len(ids)], {"c": 0, "n": seq}, f"{prefix}{seq:x}.0", False) for seq in run])
    if a["checkpoint"]:
        write_checkpoint(sd.path, sd.writer, a["checkpoint"])
    if a.get("hold"):  # a live writer: its lock stays held until stdin closes (or the process is killed)
        print(json.dumps({"prefix": prefix}), flush=True)
        sys.stdin.read()
        return
    for s in w.segments:
        os.close(s.fd)
    sd.release()
    print(json.dumps({"prefix": prefix}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
