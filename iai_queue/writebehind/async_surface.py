"""The anyio surface (asyncio and trio): blocking calls moved to worker threads.

``enqueue`` stays a plain call (it never blocks on the store; it does wait while
a stop drains the queue, see README "Async hosts"); ``aflush`` is
cancellable at once (a flush only waits); ``astop`` and ``async with`` run
``stop()`` on a worker thread, so a slow store never stalls the event loop.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["AsyncSurface"]


class AsyncSurface:
    """Mixed into :class:`~iai_queue.ProvenanceWriteQueue`; uses its ``start``, ``stop`` and ``flush``."""

    async def __aenter__(self):
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.astop()

    async def astop(self, timeout: Optional[float] = None) -> bool:
        """:meth:`stop` on a worker thread: the event loop keeps running."""
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.stop, timeout)

    async def aflush(self, timeout: float = 2.0) -> bool:
        """:meth:`flush` on a worker thread: the event loop keeps running. Cancellable at once."""
        import anyio.to_thread

        # flush() only waits, so a cancelled caller may leave it behind; stop() must not be left.
        return await anyio.to_thread.run_sync(self.flush, timeout, abandon_on_cancel=True)
