"""Opt-in graceful shutdown on signals: drain (or spill) the provenance queue, then die as before.

A process killed by SIGTERM with the default disposition runs no ``atexit``
handler: whatever the queue holds in memory is lost. :func:`install_graceful_shutdown`
installs, for the signals the host names, a handler that

1. stops the queue on a helper thread — ``store.disable_provenance_queue()`` or
   ``queue.stop()``, which waits a bounded time for the store and spills the
   rest to disk, so nothing accepted is lost;
2. then lets the disposition that was in place before run, on the main
   thread: the previous Python handler is called; the default (``SIG_DFL``)
   is restored and the signal raised again, so the process ends exactly as it
   would have (status "killed by SIGTERM", ``KeyboardInterrupt`` for SIGINT);
   an ignored signal stays ignored.

The handler itself never blocks: the drain runs on a thread, because a signal
handler runs on the main thread between two bytecodes, possibly while that
thread holds one of the queue's locks. When the drain is done the helper
re-sends the signal to the main thread, whose handler then chains. A second
signal while draining is noted and waits for the (bounded) drain.

Nothing is installed behind the host's back: only a call to this function
installs a handler, and :meth:`GracefulShutdown.uninstall` puts the previous
ones back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

from .events import emit

__all__ = ["GracefulShutdown", "install_graceful_shutdown"]

log = logging.getLogger("iai_queue.shutdown")

_Disposition = Union[Callable[[int, Any], Any], int, None]


@runtime_checkable
class _StoreToggle(Protocol):
    def disable_provenance_queue(self, timeout: Optional[float] = None) -> None: ...


@runtime_checkable
class _Stoppable(Protocol):
    def stop(self, timeout: Optional[float] = None) -> bool: ...


def _drain_function(target: Any, timeout: Optional[float]) -> Callable[[], None]:
    if isinstance(target, _StoreToggle):
        return lambda: target.disable_provenance_queue(timeout=timeout)
    if isinstance(target, _Stoppable):
        return lambda: target.stop(timeout=timeout)
    if callable(target):
        return target
    raise TypeError(f"install_graceful_shutdown: expected a MemoryStore, a ProvenanceWriteQueue or a "
                    f"callable, got {type(target).__name__}: {target!r:.100}")


class GracefulShutdown:
    """The handlers :func:`install_graceful_shutdown` installed; ``uninstall()`` restores the previous ones."""

    def __init__(self, drain: Callable[[], None], signals: Sequence[int], on_drained: Optional[Callable[[int], None]]):
        self._drain = drain
        self._on_drained = on_drained
        self._signals = tuple(signals)
        self._previous: dict[int, _Disposition] = {}
        self._lock = threading.Lock()
        self._draining: Optional[int] = None  # the signal that started the drain
        self.drained = threading.Event()  # set once the drain has returned (or failed)

    def _install(self) -> None:
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back where ours is still installed. Main thread only."""
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # -- the handler (main thread) -------------------------------------------------------

    def _handle(self, signum: int, frame: Any) -> None:
        with self._lock:
            started = self._draining is not None
            if not started:
                self._draining = signum
        if self.drained.is_set():
            self._chain(signum, frame)
            return
        if started:
            emit(log, logging.WARNING, "shutdown.waiting", signal=signal.Signals(signum).name)
            return
        emit(log, logging.INFO, "shutdown.draining", signal=signal.Signals(signum).name)
        threading.Thread(target=self._drain_then_resignal, args=(signum,), name="iai_queue-shutdown",
                         daemon=False).start()

    def _drain_then_resignal(self, signum: int) -> None:
        try:
            self._drain()
        except BaseException:  # the process is going down: report, and still chain
            log.exception("graceful shutdown: draining the provenance queue failed")
        finally:
            self.drained.set()
        emit(log, logging.INFO, "shutdown.drained", signal=signal.Signals(signum).name)
        if self._on_drained is not None:
            self._on_drained(signum)
        # The chaining must run on the main thread (signal.signal works only there):
        # deliver the signal to it again; _handle sees drained and chains.
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(threading.main_thread().ident, signum)
        else:  # pragma: no cover - Windows
            os.kill(os.getpid(), signum)

    def _chain(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if previous is None:  # installed from C: the closest we can do is the default
            previous = signal.SIG_DFL
        if previous == signal.SIG_IGN:
            return
        if previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        previous(signum, frame)


def install_graceful_shutdown(queue_or_store: Any, signals: Sequence[int] = (signal.SIGTERM,), *,
                              timeout: Optional[float] = None,
                              on_drained: Optional[Callable[[int], None]] = None) -> GracefulShutdown:
    """On each of ``signals``, drain-or-spill ``queue_or_store``, then run the previous disposition.

    ``queue_or_store``: a :class:`~iai_queue.MemoryStore` (its live queue is
    disabled: drained, then later writes go synchronous), a
    :class:`~iai_queue.ProvenanceWriteQueue` (stopped), or a callable that does
    the draining. ``timeout``: how long to wait for the store before spilling
    (default: the queue's ``exit_timeout``). ``on_drained(signum)`` is called
    on the helper thread after the drain, before the previous disposition runs.

    Must be called from the main thread (Python delivers signals there).
    Returns a :class:`GracefulShutdown`; its ``uninstall()`` restores the
    previous handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_graceful_shutdown must be called from the main thread")
    signals = tuple(signals)
    if not signals:
        raise ValueError("install_graceful_shutdown: no signals given")
    for sig in signals:
        try:
            signal.Signals(sig)
        except ValueError:
            raise ValueError(f"install_graceful_shutdown: {sig!r} is not a signal") from None
        if sig in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)):
            raise ValueError(f"install_graceful_shutdown: {signal.Signals(sig).name} cannot be caught")
    handler = GracefulShutdown(_drain_function(queue_or_store, timeout), signals, on_drained)
    handler._install()
    return handler
