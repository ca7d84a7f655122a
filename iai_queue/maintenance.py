"""Store maintenance off the write path, scheduled by work done, safe with many hosts.

Guarantee: :class:`MaintenanceScheduler` runs ``store.maintain()`` (compaction
plus the scalar indexes ``get()`` uses) on a daemon thread of its own — never
on a thread that writes provenance and never holding a lock a writer takes, so
appends run on while it works: LanceDB's compaction and index commits are
compatible with concurrent appends (a conflicting commit is retried by LanceDB
or fails the run, which is tried again later; no row is lost or doubled). At
most one run is under way per process, and a :class:`MaintenanceLock` decides
which host runs:

* a local store: ``flock`` on ``<store>/.iai-queue-maintain.lock``, held for the
  run (the kernel releases it if the process dies);
* an object store: the conditional put Lance commits with. Claiming window
  ``w = floor(wall_clock / window_s)`` means creating the table
  ``_iai_queue_maintenance_<w>`` with a row naming this claimant; version 1 of
  that table is written by exactly one host (a losing create may still commit,
  as version 2), so the host named in version 1 runs in that window. A run longer than a window, or clocks skewed
  across a window boundary, can let two hosts overlap: safe (above), only wasted.

A run starts when rows appended through this store since the last run reach
``rows_threshold`` or the appends ``appends_threshold`` (work done), or when
some were appended and none for ``idle_s`` (idleness), or when
:meth:`MaintenanceScheduler.request` asks. The
thread is supervised: an error is logged (``maintain.failed``, rate-limited) and
the run retried after ``poll_s``. The thread lives only while work is waiting
(rows appended since the last run, or a request): it ends after a run, when the
store is garbage collected, or at :meth:`MaintenanceScheduler.close`, and the
next append starts a new one.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

from .envconfig import MAX_WAIT_S
from .events import RateLimiter, emit

try:
    import fcntl
except ImportError:  # Windows: no flock; a local store's processes are not coordinated there
    fcntl = None  # type: ignore[assignment]

__all__ = ["MaintenanceRole", "MaintenancePolicy", "MaintenanceStats", "MaintenanceScheduler",
           "MaintenanceLock", "FlockMaintenanceLock", "WindowMaintenanceLock", "LEASE_TABLE_PREFIX"]

log = logging.getLogger("iai_queue.maintenance")

LEASE_TABLE_PREFIX = "_iai_queue_maintenance_"


class MaintenanceRole(enum.Enum):
    AUTO = "auto"      # schedule runs; claim the store-wide lock before each
    ALWAYS = "always"  # schedule runs; skip the lock (the one designated maintainer)
    NEVER = "never"    # no scheduler: maintain() runs only when called


@dataclass(frozen=True)
class MaintenancePolicy:
    role: MaintenanceRole = MaintenanceRole.AUTO
    rows_threshold: int = 50_000  # provenance rows appended here since the last run
    appends_threshold: int = 32   # ... or this many appends (each leaves a fragment get() reads until then)
    idle_s: float = 5.0           # ... or any rows, and no append for this long
    poll_s: float = 1.0           # how often the thread looks
    window_s: float = 30.0        # object stores: one claim per host per window

    def __post_init__(self) -> None:
        if not isinstance(self.role, MaintenanceRole):
            raise ValueError(f"role must be a MaintenanceRole, got {self.role!r}")
        for name in ("rows_threshold", "appends_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("idle_s", "poll_s", "window_s"):
            value = getattr(self, name)
            # A finite, positive time of at most a year (NaN fails the comparison; a wait past
            # threading.TIMEOUT_MAX would raise in the maintenance thread).
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1e-3 <= value <= MAX_WAIT_S:
                raise ValueError(f"{name} must be a number of seconds from 0.001 to a year, got {value!r}")

    @classmethod
    def from_env(cls) -> "MaintenancePolicy":
        """``$IAI_QUEUE_MAINTENANCE`` = ``auto`` (default), ``always`` or ``never``."""
        raw = os.environ.get("IAI_QUEUE_MAINTENANCE", "")
        try:
            return cls(role=MaintenanceRole(raw.strip().lower() or "auto"))  # empty: unset, as every IAI_QUEUE_*
        except ValueError:
            raise ValueError(f"IAI_QUEUE_MAINTENANCE={raw!r}: expected auto, always or never") from None


@dataclass(frozen=True)
class MaintenanceStats:
    runs: int            # maintain() runs completed here
    failures: int        # runs that raised
    claimed_elsewhere: int  # times another host held the lock
    rows_since_run: int  # rows appended here since the last run
    last_run_s: float    # duration of the last run
    longest_run_s: float


class MaintenanceLock(Protocol):
    def acquire(self) -> bool:
        """True: this host may run now. Never blocks for long."""

    def release(self) -> None:
        """After a run that :meth:`acquire` allowed."""


class FlockMaintenanceLock:
    """A local store: an exclusive, non-blocking ``flock`` on a file in the store directory."""

    def __init__(self, store_dir: Path):
        self.path = Path(store_dir) / ".iai-queue-maintain.lock"
        self._fd: Optional[int] = None

    def acquire(self) -> bool:
        if fcntl is None:
            return True  # without flock every process may run; overlapping runs are safe, only wasted
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the flock


class WindowMaintenanceLock:
    """An object store: one winner per time window, by creating a marker table only one host can create."""

    def __init__(self, db, window_s: float, clock: Callable[[], float] = time.time):
        import pyarrow as pa

        self._db = db
        self._window_s = window_s
        self._clock = clock
        self._schema = pa.schema([pa.field("window", pa.int64()), pa.field("claimant", pa.string())])
        self._won: Optional[int] = None

    def acquire(self) -> bool:
        window = int(self._clock() // self._window_s)
        if self._won == window:
            return True  # a second run in a window we already hold
        import pyarrow as pa

        claimant = uuid.uuid4().hex
        marker = pa.table({"window": [window], "claimant": [claimant]}, schema=self._schema)
        try:
            table = self._db.create_table(f"{LEASE_TABLE_PREFIX}{window}", data=marker, exist_ok=False)
            # create_table is not exclusive by itself: a create that loses the race for version 1
            # is retried by Lance as an overwrite (version 2). Version 1 is written with a
            # conditional put, so exactly one host's claimant is in it: that host won.
            table.checkout(1)
            won = table.to_arrow().column("claimant").to_pylist() == [claimant]
        except Exception as exc:  # "already exists", a commit conflict or a store error: not ours
            log.debug("maintenance window %s not claimed: %r", window, exc)
            return False
        if not won:
            return False
        self._won = window
        self._drop_old(window)
        return True

    def release(self) -> None:
        pass  # the window expires by itself

    def _drop_old(self, window: int) -> None:
        try:
            names = self._db.list_tables().tables
        except Exception:  # best effort: stale markers are harmless
            return
        for name in names:
            if name.startswith(LEASE_TABLE_PREFIX):
                try:
                    old = int(name[len(LEASE_TABLE_PREFIX):])
                except ValueError:
                    continue
                if old < window - 1:
                    try:
                        self._db.drop_table(name)
                    except Exception:
                        pass


class _AlwaysLock:
    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


class MaintenanceScheduler:
    """Runs ``maintain`` on its own thread when enough work was done or the store went idle."""

    def __init__(self, store, maintain: Callable[[], None], lock: MaintenanceLock, policy: MaintenancePolicy):
        self._store_ref = weakref.ref(store)
        self._maintain = maintain  # a function of the store, not a bound method: no strong reference
        self._lock = lock if policy.role is MaintenanceRole.AUTO else _AlwaysLock()
        self.policy = policy
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rows = self._appends = 0
        self._last_append = 0.0
        self._requested = False
        self._warn = RateLimiter()
        self._runs = self._failures = self._elsewhere = 0
        self._last_run_s = self._longest_run_s = 0.0

    def note_rows(self, n: int) -> None:
        """Called after each append: O(1), never blocks on maintenance."""
        with self._mutex:
            self._rows += n
            self._appends += 1
            self._last_append = time.monotonic()
            due = self._work_due_locked()
        self._ensure_thread()
        if due:
            self._wake.set()

    def request(self) -> None:
        """Ask for a run soon (for example when the host goes idle); returns at once."""
        with self._mutex:
            self._requested = True
        self._ensure_thread()
        self._wake.set()

    def stats(self) -> MaintenanceStats:
        with self._mutex:
            return MaintenanceStats(self._runs, self._failures, self._elsewhere, self._rows,
                                    round(self._last_run_s, 6), round(self._longest_run_s, 6))

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; a run under way finishes first (bounded by ``timeout``)."""
        self._closed.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def _ensure_thread(self) -> None:
        t = self._thread
        if (t is None or not t.is_alive()) and not self._closed.is_set():
            with self._mutex:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="iai_queue-maintenance", daemon=True)
                    self._thread.start()

    def _due(self) -> bool:
        with self._mutex:
            if self._requested:
                return True
            if not self._rows:
                return False
            return self._work_due_locked() or time.monotonic() - self._last_append >= self.policy.idle_s

    def _work_due_locked(self) -> bool:
        return self._rows >= self.policy.rows_threshold or self._appends >= self.policy.appends_threshold

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.policy.poll_s)
            self._wake.clear()
            if self._closed.is_set() or self._store_ref() is None:
                return
            with self._mutex:
                if not self._rows and not self._requested:
                    self._thread = None  # nothing to do: end; the next append starts a new thread
                    return
            try:
                if self._due():
                    self._run_once()
            except Exception as exc:  # supervised: log, wait, try again
                self._warn.emit(log, logging.WARNING, "maintain.failed", key=type(exc).__name__,
                                error=repr(exc)[:300])
                with self._mutex:
                    self._failures += 1
                self._closed.wait(self.policy.poll_s)

    def _run_once(self) -> None:
        if not self._lock.acquire():
            with self._mutex:
                self._elsewhere += 1
                self._rows = self._appends = 0  # another host is maintaining the shared tables
                self._requested = False
            return
        try:
            with self._mutex:
                rows, appends, self._rows, self._appends = self._rows, self._appends, 0, 0
                self._requested = False
            store = self._store_ref()
            if store is None:
                return
            t0 = time.monotonic()
            try:
                self._maintain(store)
            except BaseException:
                with self._mutex:
                    self._rows += rows  # not done: due again
                    self._appends += appends
                raise
            finally:
                del store
            took = time.monotonic() - t0
            with self._mutex:
                self._runs += 1
                self._last_run_s = took
                self._longest_run_s = max(self._longest_run_s, took)
            emit(log, logging.INFO, "maintain", rows=rows, seconds=round(took, 3))
        finally:
            self._lock.release()
