"""``iai-queue serve``: a reference MCP memory server on the official ``mcp`` SDK (extra ``mcp``).

Tools
    ``memory_insert``   embed a text and store it as a memory; returns its id
    ``memory_recall``   the memories nearest a cue; each hit's provenance
                        ``{"ts", "cue", "session_id"}`` goes through the write-behind queue
    ``memory_get``      one memory with its provenance
    ``queue_status``    the queue's ``stats()`` (null while writes are synchronous), store, spill dir, pid
    ``queue_enable`` / ``queue_disable``   route provenance through the queue, or write it synchronously
    ``queue_flush``     wait until every queued entry is in the store

What is promised: a recall that returned has its provenance accepted by the
queue (or written synchronously while the queue is off). The server stops
gracefully — nothing accepted is lost — when its stdin closes (how MCP clients
stop a stdio server), on SIGTERM and on SIGINT: the queue drains, or spills
what the store does not take in time (``IAI_QUEUE_EXIT_TIMEOUT``), through
:func:`iai_queue.install_graceful_shutdown`, which the server opts into. SIGKILL
still loses what is in memory (see the README's guarantees).

Embeddings come from a pluggable ``text -> vector`` callable (``--embedder
module:callable``, or :func:`build_server`'s ``embed``); the default is the
offline :class:`~iai_queue.embedding.HashingEmbedder`, for demos and tests.
Queue options come from the ``IAI_QUEUE_*`` environment variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Optional
from uuid import UUID, uuid4

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from .location import StoreLocation
    from .store import MemoryStore

__all__ = ["build_server", "add_arguments", "run", "DEFAULT_DIM"]

log = logging.getLogger("iai_queue.server")

DEFAULT_DIM = 384
_MAX_K = 100
_TRANSPORTS = ("stdio", "streamable-http")


class _Usage(Exception):
    """A usage error found before the server starts: one line, exit 2."""


def _status(store: "MemoryStore") -> dict[str, Any]:
    q = store.provenance_queue
    return {
        "enabled": q is not None,
        "stats": dataclasses.asdict(q.stats()) if q is not None else None,
        "store": str(store.path),
        "spill_dir": str(q.spill_dir) if q is not None else None,
        "pid": os.getpid(),
    }


def build_server(store: "MemoryStore", embed: Callable[[str], Any], *, name: str = "iai-queue-memory",
                 default_session: Optional[str] = None) -> "MCPServer":
    """An :class:`mcp.server.mcpserver.MCPServer` serving ``store``, embedding texts and cues with ``embed``.

    ``embed`` runs on a worker thread (a model may take a while); it must return
    ``store.dim`` floats (a list or a 1-d numpy array). The caller owns the
    store and its queue: enable it before running, disable it after.
    """
    import anyio.to_thread
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from .core import adispatch
    from .embedding import check_embedding
    from .store import DuplicateIdError, MemoryRecord

    session_label = default_session or f"mcp-{os.getpid()}-{int(time.time())}"
    from . import __version__

    server = MCPServer(name, version=__version__, instructions=(
        "Long-term memory. memory_insert stores a text; memory_recall finds the memories nearest a cue "
        "and records that they were recalled; memory_get shows a memory with every recall of it."))

    async def embed_text(text: str, what: str) -> list[float]:
        vector = await anyio.to_thread.run_sync(embed, text)
        try:
            return check_embedding(vector, store.dim, source="the embedder")
        except ValueError as exc:
            raise ToolError(f"{what}: {exc}") from None

    def parse_id(value: str) -> UUID:
        try:
            return UUID(value)
        except (ValueError, AttributeError, TypeError):
            raise ToolError(f"id {value!r} is not a UUID") from None

    @server.tool()
    async def memory_insert(text: str, id: Optional[str] = None) -> dict[str, Any]:
        """Store a memory. Returns its id (a new UUID unless you give one; an id already stored is an error)."""
        rid = parse_id(id) if id is not None else uuid4()
        record = MemoryRecord(id=rid, text=text, embedding=await embed_text(text, "memory_insert"))
        try:
            await anyio.to_thread.run_sync(store.insert, record)
        except DuplicateIdError as exc:
            raise ToolError(str(exc)) from None
        return {"id": str(rid)}

    @server.tool()
    async def memory_recall(cue: str, session_id: Optional[str] = None, k: int = 10) -> dict[str, Any]:
        """The k memories nearest the cue, best first; records "recalled by cue in session" on each."""
        if not 1 <= k <= _MAX_K:
            raise ToolError(f"k must be between 1 and {_MAX_K}, got {k}")
        emb = await embed_text(cue, "memory_recall")
        hits = await adispatch(store, "memory_recall", {
            "cue": cue, "session_id": session_id or session_label, "cue_embedding": emb, "k": k})
        return {"hits": [{"id": str(h["id"]), "text": h["text"], "score": h["score"]} for h in hits]}

    @server.tool()
    async def memory_get(id: str) -> dict[str, Any]:
        """One memory with its provenance (every recall of it: ts, cue, session_id), oldest first."""
        rid = parse_id(id)
        record = await anyio.to_thread.run_sync(store.get, rid)
        if record is None:
            raise ToolError(f"no memory with id {id}")
        return {"id": str(record.id), "text": record.text, "created_at": record.created_at.isoformat(),
                "provenance": record.provenance}

    @server.tool()
    async def queue_status() -> dict[str, Any]:
        """The provenance queue: enabled or not, its counters (stats), the store and spill directory."""
        return _status(store)

    @server.tool()
    async def queue_enable() -> dict[str, Any]:
        """Route provenance through the write-behind queue (options from IAI_QUEUE_* variables). Idempotent."""
        await anyio.to_thread.run_sync(store.enable_provenance_queue)
        return _status(store)

    @server.tool()
    async def queue_disable() -> dict[str, Any]:
        """Drain and stop the queue; provenance is then written synchronously. Idempotent."""
        await store.adisable_provenance_queue()
        return _status(store)

    @server.tool()
    async def queue_flush(timeout_s: float = 5.0) -> dict[str, Any]:
        """Wait up to timeout_s seconds until every queued entry is in the store."""
        if not 0 <= timeout_s <= 300:
            raise ToolError(f"timeout_s must be between 0 and 300, got {timeout_s}")
        q = store.provenance_queue
        flushed = True if q is None else await q.aflush(timeout=timeout_s)
        return {"flushed": flushed, **_status(store)}

    return server


# -- the command ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="PATH",
                        help="the memory store (default: $IAI_QUEUE_STORE, else ~/.iai-mcp/lancedb)")
    parser.add_argument("--embedder", metavar="MODULE:CALLABLE",
                        help="a text -> vector callable (default: the built-in offline hashing embedder, "
                             "for demos and tests)")
    parser.add_argument("--dim", type=int, metavar="N",
                        help=f"embedding size of the built-in embedder (default: the store's, else {DEFAULT_DIM})")
    parser.add_argument("--transport", choices=_TRANSPORTS, default="stdio",
                        help="stdio (default; what desktop MCP clients start) or streamable-http")
    parser.add_argument("--host", default="127.0.0.1", help="streamable-http: address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="streamable-http: port (default 8000)")
    parser.add_argument("--no-queue", action="store_true",
                        help="start with provenance written synchronously (queue_enable turns the queue on)")


def _prepare(args: argparse.Namespace) -> tuple["MemoryStore", Callable[[str], Any]]:
    """Everything that can fail on bad input, before the server starts."""
    from .embedding import HashingEmbedder, check_embedding, load_embedder
    from .envconfig import queue_options_from_env
    from .location import StoreLocation
    from .maintenance import MaintenancePolicy
    from .store import MemoryStore, default_store_path

    try:
        import mcp.server.mcpserver  # noqa: F401
    except ImportError:
        raise _Usage('the MCP server needs the mcp extra: pip install "iai_queue[mcp]"') from None
    try:
        queue_options_from_env()  # a bad IAI_QUEUE_* value fails here, named
        MaintenancePolicy.from_env()
    except ValueError as exc:
        raise _Usage(str(exc)) from None
    if args.store is not None and not args.store.strip():
        raise _Usage("--store must not be empty (leave it out for the default store)")
    try:
        location = StoreLocation.parse(args.store if args.store is not None else default_store_path())
    except (TypeError, ValueError) as exc:
        raise _Usage(str(exc)) from None
    options = dict(args.storage_options) if getattr(args, "storage_options", None) else None
    store_path = location.local_path
    if store_path is not None and store_path.exists() and not store_path.is_dir():
        raise _Usage(f"--store {location.display!r} is a file, not a store directory")
    if args.dim is not None and args.dim < 2:
        raise _Usage(f"--dim must be an int >= 2, got {args.dim}")
    if not 0 < args.port < 65536:
        raise _Usage(f"--port must be between 1 and 65535, got {args.port}")
    found = _existing_dim(location, options)
    if args.embedder:
        if args.dim is not None:
            raise _Usage("--dim is for the built-in embedder; a custom embedder's vectors set the size")
        try:
            embed = load_embedder(args.embedder)
            dim = len(check_embedding(embed("dimension probe"), source=f"embedder {args.embedder}"))
        except ValueError as exc:
            raise _Usage(str(exc)) from None
        except Exception as exc:  # the host's own code: whatever it raises is a bad --embedder here
            raise _Usage(f"embedder {args.embedder} failed on a probe text: {type(exc).__name__}: {exc}") from None
    else:
        dim = args.dim or found or DEFAULT_DIM
        embed = HashingEmbedder(dim)
    if found is not None and found != dim:
        raise _Usage(f"store {location.display!r} holds {found}-d embeddings; the embedder makes {dim}-d ones")
    try:
        return MemoryStore(location.uri, dim=dim, storage_options=options), embed
    except OSError as exc:  # a local path that cannot be a directory (under a file, in /proc, no permission)
        raise _Usage(f"cannot open the store {location.display!r}: {exc.strerror or exc}") from None
    except Exception as exc:  # what LanceDB raises for an object store it cannot use
        raise _Usage(f"cannot open the store {location.display!r}: {type(exc).__name__}: {str(exc)[:300]}") from None


def _existing_dim(location: "StoreLocation", storage_options: Optional[dict[str, str]]) -> Optional[int]:
    """The embedding size of the store at ``location``, or None where there is none yet."""
    if location.local_path is not None and not location.local_path.is_dir():
        return None
    import lancedb

    try:
        table = lancedb.connect(location.uri, storage_options=storage_options).open_table("records")
    except (ValueError, FileNotFoundError):
        return None
    except Exception as exc:  # object storage unreachable, bad credentials, a bucket that does not exist
        raise _Usage(f"cannot open the store {location.display!r}: {type(exc).__name__}: {str(exc)[:300]}") from None
    size = getattr(table.schema.field("embedding").type, "list_size", None)
    return size if isinstance(size, int) and size > 0 else None


def run(args: argparse.Namespace) -> int:
    try:
        store, embed = _prepare(args)
    except _Usage as exc:
        print(f"iai-queue serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    from .shutdown import install_graceful_shutdown

    server = build_server(store, embed)
    if not args.no_queue:
        store.enable_provenance_queue()

    def exit_interrupted(signum: int, frame: Any) -> None:
        # What SIGINT chains to once the graceful handler has drained the queue: end now with Ctrl-C's
        # status. A KeyboardInterrupt would tear the event loop down mid-flight instead: the MCP
        # library prints exception groups, and anyio's stdin worker thread (not a daemon) can keep
        # the interpreter from exiting at all.
        _end_now(store, 128 + signum)

    signal.signal(signal.SIGINT, exit_interrupted)
    graceful = install_graceful_shutdown(store, (signal.SIGTERM, signal.SIGINT))
    log.info("serving %s (%d-d, embedder %r) over %s", store.path, store.dim, embed, args.transport)
    interrupted = False
    try:
        if args.transport == "stdio":
            server.run("stdio")
        else:
            server.run("streamable-http", host=args.host, port=args.port)
    except KeyboardInterrupt:  # raised by something else than our SIGINT handler (which exits above)
        interrupted = True
    finally:
        store.disable_provenance_queue()  # stdin closed or the HTTP server stopped: drain before exit
        graceful.uninstall()
    if interrupted:  # a KeyboardInterrupt from elsewhere: drained above; do not wait for anyio's threads
        _end_now(store, 130)
    return 0


def _end_now(store, status: int) -> None:
    """Stop maintenance, flush the logs and stdio, and end the process with ``status`` at once."""
    store.close()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
