"""The recall pipeline: vector search, then provenance for every hit, off the hot path.

``dispatch(store, "memory_recall", {"cue", "session_id", "cue_embedding", "k"})``
(``cue_embedding``: a list, tuple or 1-d numpy array of ``store.dim`` floats)
searches the store, builds one ``{"ts", "cue", "session_id"}`` entry per hit
(``ts`` ISO-8601 UTC), hands them to ``store.queue_provenance_batch`` in hit
order and returns the hits. ``adispatch`` is the same for async hosts: the
search runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["dispatch", "adispatch", "OPS"]


def _require(args: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in args:
        raise ValueError(f"memory_recall: missing field {name!r}")
    value = args[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"memory_recall: field {name!r} has the wrong type: {value!r:.100}")
    return value


def _parse_recall(store: Any, args: Any) -> tuple[str, str, list, int]:
    if not isinstance(args, Mapping):
        raise ValueError(f"memory_recall: args must be a mapping, got {type(args).__name__}")
    cue = _require(args, "cue", str)
    session_id = _require(args, "session_id", str)
    emb = _require(args, "cue_embedding", (list, tuple, np.ndarray))
    if isinstance(emb, np.ndarray):
        if emb.ndim != 1:
            raise ValueError(f"memory_recall: field 'cue_embedding' must be 1-d, got an array of shape {emb.shape}")
        emb = emb.tolist()  # what embedding models return; the store takes plain floats
    k = args.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"memory_recall: field 'k' must be an int >= 1, got {k!r}")
    if len(emb) != store.dim:
        raise ValueError(f"memory_recall: cue_embedding has length {len(emb)}, store dim is {store.dim}")
    return cue, session_id, list(emb), k


def _record_provenance(store: Any, hits: list[dict], cue: str, session_id: str) -> list[dict]:
    ts = datetime.now(timezone.utc).isoformat()
    store.queue_provenance_batch([(h["id"], {"ts": ts, "cue": cue, "session_id": session_id}) for h in hits])
    return hits


def _memory_recall(store: Any, args: Any) -> list[dict]:
    cue, session_id, emb, k = _parse_recall(store, args)
    return _record_provenance(store, store.search(emb, k), cue, session_id)


OPS: dict[str, Callable[[Any, Any], Any]] = {"memory_recall": _memory_recall}


def dispatch(store: Any, op: str, args: Any) -> Any:
    """Run ``op`` against ``store``. Raises ValueError for an unknown op or bad args."""
    handler = OPS.get(op)
    if handler is None:
        raise ValueError(f"unknown op {op!r}; known: {sorted(OPS)}")
    return handler(store, args)


async def adispatch(store: Any, op: str, args: Any) -> Any:
    """:func:`dispatch` for anyio hosts (asyncio or trio): LanceDB work runs off the event loop."""
    import anyio.to_thread

    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {sorted(OPS)}")
    cue, session_id, emb, k = _parse_recall(store, args)
    hits = await anyio.to_thread.run_sync(store.search, emb, k)
    # Enqueue never blocks; with the queue disabled this is the synchronous write, so it goes to a thread too.
    if getattr(store, "provenance_queue", None) is not None:
        return _record_provenance(store, hits, cue, session_id)
    return await anyio.to_thread.run_sync(_record_provenance, store, hits, cue, session_id)
