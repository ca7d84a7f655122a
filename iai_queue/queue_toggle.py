"""The store's runtime switch between write-behind and synchronous provenance writes.

Guarantee (order across the toggle): per record, entries land in the order
they were handed over, whichever way they went. Enabling waits for a
disabled-mode write in progress, and the new queue starts after it (so it sees
that write's spill files and queues behind them); a caller still holding an
older queue lands behind what the new one holds (``forward_to``). Disabling
retires the queue: writes that race it, and every write after it, go through
the stopped queue — they wait for its drain, then run on the caller's thread
or are spilled behind what it left on disk. A queue that drained clean is
forgotten, and writes go through a queue that never runs: its closed route is
the synchronous write, with the same checks, codec and quarantine as every
other path.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional
from uuid import UUID

from .pairs import ProvenanceSink

__all__ = ["QueueToggle"]

log = logging.getLogger("iai_queue.store")

_DEFAULT = object()  # "not given" in option comparisons


def _option_value(name: str, value: Any) -> Any:
    """A queue option in the form two requests are compared in (a path given as str or Path)."""
    return Path(value) if name == "spill_dir" and isinstance(value, (str, os.PathLike)) else value


class QueueToggle:
    """Which queue a store's ``queue_provenance_batch`` goes through: ``live``, else the disabled path.

    ``sink``: returns the store (a ``weakref.ref`` to it: the toggle lives in the
    store and must not keep it alive); the queues it makes look its
    ``append_provenance_batch`` up at each write, so a wrapper installed on the
    store takes effect. ``defaults``: queue options that replace the queue's own
    defaults for this store (options given to :meth:`enable` and ``IAI_QUEUE_*`` win).
    """

    def __init__(self, sink: Callable[[], Optional[ProvenanceSink]], defaults: Optional[dict[str, Any]] = None):
        self._sink = sink
        self._defaults = dict(defaults or {})
        self.live = None  # the live ProvenanceWriteQueue, or None (read on the recall path: one attribute)
        self._retired_queue = None  # a stopped queue still draining or with entries on disk: writes go behind it
        self._sync_queue = None  # a queue that never runs: the synchronous path
        self._last_queue: Optional[weakref.ref] = None  # the queue enable made last: the next one succeeds it
        self._queue_options: dict[str, Any] = {}  # what the live queue was built with
        self._toggle_lock = threading.Lock()
        self._sync_lock = threading.Lock()  # disabled-mode writes, one at a time; enable waits for them

    def enable(self, coalesce_ms: Optional[float] = None, **queue_options: Any):
        """See :meth:`MemoryStore.enable_provenance_queue <iai_queue.store.MemoryStore.enable_provenance_queue>`."""
        from .envconfig import resolve_queue_options
        from .events import emit
        from .writebehind import ProvenanceWriteQueue

        options = {**self._defaults, **resolve_queue_options({"coalesce_ms": coalesce_ms, **queue_options})}
        with self._sync_lock, self._toggle_lock:
            if self.live is None:
                q = ProvenanceWriteQueue(self._sink(), **options)
                last = self._last_queue() if self._last_queue is not None else None
                if last is not None:
                    # A caller still holding it lands behind in the live queue (through this toggle: no
                    # chain of queues); first its write in progress ends, so the start below sees its file.
                    last.forward_to(self.enqueue)
                q.start()  # after every disabled-mode write in progress: its spill files are seen
                self._retired_queue = None
                self._sync_queue = None  # rebuilt with these options (its spill directory) when next needed
                self._last_queue = weakref.ref(q)
                self.live = q
                self._queue_options = options
                return q
            live, q = self._queue_options, self.live
        differs = {k: v for k, v in options.items() if _option_value(k, live.get(k, _DEFAULT)) != _option_value(k, v)}
        if differs:
            emit(log, logging.WARNING, "enable.options_ignored",
                 options=", ".join(f"{k}={v!r} (live: {live.get(k, 'default')!r})" for k, v in differs.items()),
                 hint="the queue is already live; disable_provenance_queue() first to change its options")
        return q

    def disable(self, timeout: Optional[float] = None) -> None:
        """See :meth:`MemoryStore.disable_provenance_queue <iai_queue.store.MemoryStore.disable_provenance_queue>`."""
        with self._toggle_lock:
            q, self.live = self.live, None
            if q is not None:
                q.retire()  # a stop()/start() elsewhere must not bring it back beside its successor
                self._retired_queue = q
        if q is None:
            return
        q.stop() if timeout is None else q.stop(timeout=timeout)
        with self._toggle_lock:
            if self._retired_queue is q and not q.left_on_disk:
                self._retired_queue = None  # drained clean: nothing to keep order behind

    def enqueue(self, pairs: Sequence[tuple[UUID | str, dict]]) -> None:
        """Hand pairs to the live queue, or append them now on this thread (behind a retired queue's entries)."""
        q = self.live
        if q is None:
            with self._sync_lock:  # disabled mode: enabling waits for a write in progress here
                q = self.live
                if q is None:
                    q = self._retired_queue or self._sync_queue
                    if q is None:
                        from .writebehind import ProvenanceWriteQueue

                        # A queue that never runs: its closed route is the synchronous write,
                        # with the same checks, codec and quarantine as every other path.
                        q = self._sync_queue = ProvenanceWriteQueue(self._sink(), **self._queue_options)
                        q.stop()
                    q.enqueue(pairs)
                    return
        q.enqueue(pairs)
