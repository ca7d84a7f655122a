"""The baseline write-behind queue, built the conventional way.

``enqueue`` is ``queue.Queue.put_nowait(list(pairs))``; one worker thread
coalesces with ``get(timeout=...)`` up to ``max_batch_pairs`` pairs or
``coalesce_ms``, whichever comes first, and writes each batch with
``store.append_provenance_batch``. No validation, no entry ids, no spill, no
retry: the cheapest correct-looking design, which is what
``scripts/bench_enqueue.py`` measures ``ProvenanceWriteQueue`` against.
"""

from __future__ import annotations

import queue
import threading
import time

__all__ = ["ReferenceWriteBehind"]

_STOP = object()


class ReferenceWriteBehind:
    def __init__(self, store, coalesce_ms: float = 50, max_batch_pairs: int = 256):
        self.store = store
        self.coalesce_s = coalesce_ms / 1000.0
        self.max_batch_pairs = max_batch_pairs
        self._q: queue.Queue = queue.Queue()
        self.written = 0
        self._worker = threading.Thread(target=self._run, name="reference-writer", daemon=True)

    def start(self) -> "ReferenceWriteBehind":
        self._worker.start()
        return self

    def enqueue(self, pairs) -> None:
        self._q.put_nowait(list(pairs))

    def flush(self, timeout: float = 60.0) -> bool:
        """Block until everything enqueued before this call is written."""
        done = threading.Event()
        self._q.put_nowait(done)
        return done.wait(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        self.flush(timeout)
        self._q.put_nowait(_STOP)
        self._worker.join(timeout)

    def _run(self) -> None:
        get = self._q.get
        while True:
            try:
                item = get(timeout=self.coalesce_s)
            except queue.Empty:
                continue
            batch: list = []
            markers: list = []
            stop = False
            deadline = time.monotonic() + self.coalesce_s
            while True:
                if item is _STOP:
                    stop = True
                    break
                if isinstance(item, threading.Event):
                    markers.append(item)
                    break  # a flush: write what we have now
                batch.extend(item)
                if len(batch) >= self.max_batch_pairs:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = get(timeout=left)
                except queue.Empty:
                    break
            if batch:
                self.store.append_provenance_batch(batch)
                self.written += len(batch)
            for m in markers:
                m.set()
            if stop:
                return
