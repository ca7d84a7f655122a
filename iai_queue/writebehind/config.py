"""Every queue option, validated once, in one place.

Bounds: ``max_queue_size`` counts batches (enqueue calls) held for the store,
as ``queue.Queue(maxsize)`` does; ``max_memory_pairs`` counts pairs held on
their way to the spill directory (default ``4 * max_queue_size``).
``max_batch_pairs`` is what one write takes when traffic is light;
``backlog_batch_pairs`` what it takes when more than one batch waits. Times given
in milliseconds keep their ``_ms`` name; everything is held in seconds.

``durability`` (:class:`~iai_queue.journal.Durability`): ``"memory"`` (the
default) or one of the write-ahead levels. In a write-ahead level
``exit_timeout`` defaults to 0: the journal holds what the store has not taken,
so exit need not wait for the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..envconfig import MAX_WAIT_S
from ..journal import Durability
from ..spill import default_spill_dir

__all__ = ["OptionsView", "QueueConfig"]


def _number(name: str, value: object) -> float:
    """A time option: a finite number from 0 to a year (in its unit: ``_ms`` names count milliseconds)."""
    limit = MAX_WAIT_S * (1000 if name.endswith("_ms") else 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= limit:
        raise ValueError(f"{name} must be a number from 0 to {limit:g}, got {value!r}")  # NaN fails too
    return value


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class QueueConfig:
    coalesce_s: float
    max_queue_size: int
    max_batch_pairs: int
    max_memory_pairs: int
    exit_timeout: float
    retry_initial_s: float
    retry_max_s: float
    idle_replay_s: float
    replay_batch_pairs: int
    spill_file_pairs: int
    spill_dir: Path
    backlog_batch_pairs: int  # what the worker takes per write when more than one batch waits
    durability: Durability = Durability.MEMORY
    fsync_interval_s: float = 0.1
    journal_segment_bytes: int = 16 << 20

    @classmethod
    def from_options(cls, *, coalesce_ms: float = 50, max_queue_size: int = 4096,
                     max_batch_pairs: Optional[int] = None, backlog_batch_pairs: Optional[int] = None,
                     spill_dir: str | os.PathLike[str] | None = None, max_memory_pairs: Optional[int] = None,
                     exit_timeout: Optional[float] = None, retry_initial_s: float = 0.05, retry_max_s: float = 5.0,
                     idle_replay_s: float = 5.0, replay_batch_pairs: int = 8192,
                     spill_file_pairs: int = 8192, durability: str | Durability = "memory",
                     fsync_interval_ms: float = 100, journal_segment_bytes: int = 16 << 20) -> "QueueConfig":
        """Raises ValueError naming the first bad option and its value.

        ``backlog_batch_pairs`` (what one write may take when more than one
        batch waits) defaults to ``replay_batch_pairs`` — unless the caller set
        ``max_batch_pairs``, which then stays a hard cap on every write.
        """
        capped = max_batch_pairs is not None
        max_batch_pairs = 256 if max_batch_pairs is None else max_batch_pairs
        try:
            durability = Durability(durability)
        except ValueError:
            raise ValueError(f"durability must be one of {', '.join(repr(d.value) for d in Durability)}, "
                             f"got {durability!r}") from None
        if exit_timeout is None:
            exit_timeout = 0.0 if durability.journaled else 2.0
        _number("fsync_interval_ms", fsync_interval_ms)
        _count("journal_segment_bytes", journal_segment_bytes)
        for name, value in (("coalesce_ms", coalesce_ms), ("exit_timeout", exit_timeout),
                            ("retry_initial_s", retry_initial_s), ("retry_max_s", retry_max_s),
                            ("idle_replay_s", idle_replay_s)):
            _number(name, value)
        for name, value in (("max_queue_size", max_queue_size), ("max_batch_pairs", max_batch_pairs),
                            ("replay_batch_pairs", replay_batch_pairs), ("spill_file_pairs", spill_file_pairs)):
            _count(name, value)
        if backlog_batch_pairs is not None:
            _count("backlog_batch_pairs", backlog_batch_pairs)
        max_memory_pairs = _count("max_memory_pairs", 4 * max_queue_size if max_memory_pairs is None
                                  else max_memory_pairs)
        return cls(
            coalesce_s=coalesce_ms / 1000.0, max_queue_size=max_queue_size, max_batch_pairs=max_batch_pairs,
            max_memory_pairs=max_memory_pairs, exit_timeout=exit_timeout, retry_initial_s=retry_initial_s,
            retry_max_s=max(retry_max_s, retry_initial_s), idle_replay_s=idle_replay_s,
            replay_batch_pairs=max(replay_batch_pairs, max_batch_pairs), spill_file_pairs=spill_file_pairs,
            # Resolved now, not at first spill: the environment may change later.
            spill_dir=Path(spill_dir) if spill_dir is not None else default_spill_dir(),
            backlog_batch_pairs=max(max_batch_pairs, backlog_batch_pairs if backlog_batch_pairs is not None
                                    else max_batch_pairs if capped else replay_batch_pairs),
            durability=durability, fsync_interval_s=max(fsync_interval_ms, 1) / 1000.0,
            journal_segment_bytes=max(journal_segment_bytes, 4096))


def _option(name: str) -> property:
    return property(lambda self: getattr(self._cfg, name), doc=f"The ``{name}`` option (read-only).")


class OptionsView:
    """The options of a queue's ``_cfg`` (a :class:`QueueConfig`) as read-only attributes."""

    _cfg: QueueConfig

    coalesce_s = _option("coalesce_s")
    max_queue_size = _option("max_queue_size")
    max_batch_pairs = _option("max_batch_pairs")
    max_memory_pairs = _option("max_memory_pairs")
    exit_timeout = _option("exit_timeout")
    retry_initial_s = _option("retry_initial_s")
    retry_max_s = _option("retry_max_s")
    idle_replay_s = _option("idle_replay_s")
    replay_batch_pairs = _option("replay_batch_pairs")
    spill_file_pairs = _option("spill_file_pairs")
    spill_dir = _option("spill_dir")
    backlog_batch_pairs = _option("backlog_batch_pairs")
    fsync_interval_s = _option("fsync_interval_s")

    @property
    def durability(self) -> str:
        """The ``durability`` option: ``"memory"``, ``"process"``, ``"fsync-interval"`` or ``"fsync-always"``."""
        return self._cfg.durability.value
