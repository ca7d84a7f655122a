"""Queue options from ``IAI_QUEUE_*`` environment variables, as OpenTelemetry reads ``OTEL_BSP_*``.

Every :class:`~iai_queue.ProvenanceWriteQueue` option has a variable named
``IAI_QUEUE_`` plus the option in capitals (``coalesce_ms`` →
``IAI_QUEUE_COALESCE_MS``). An explicit argument always wins over the
environment; an unset or empty variable means "not configured". A value that
does not parse, or is out of range, raises :class:`EnvConfigError` naming the
variable and the value — at the point the options are read, before anything
starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

__all__ = ["ENV_PREFIX", "MAX_WAIT_S", "QUEUE_ENV_OPTIONS", "EnvConfigError", "queue_options_from_env",
           "resolve_queue_options"]

ENV_PREFIX = "IAI_QUEUE_"
MAX_WAIT_S = 365 * 86400.0  # the longest time option: a year (a wait beyond threading.TIMEOUT_MAX raises)


class EnvConfigError(ValueError):
    """An ``IAI_QUEUE_*`` variable holds a value the queue cannot use."""


def _number(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError
    return value


def _time_up_to(limit: float) -> Callable[[str], float]:
    """A parser of a time option: a finite number from 0 to ``limit`` (in the option's unit)."""

    def parse(text: str) -> float:
        value = _number(text)
        if value > limit:
            raise ValueError
        return value

    return parse


_seconds, _milliseconds = _time_up_to(MAX_WAIT_S), _time_up_to(MAX_WAIT_S * 1000)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _path(text: str) -> Path:
    return Path(text).expanduser()


def _durability(text: str) -> str:
    from .journal import Durability

    return Durability(text).value  # ValueError: reported with the variable's name


# option -> (parser, what the value must be)
QUEUE_ENV_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "coalesce_ms": (_milliseconds, "a number of milliseconds from 0 to a year"),
    "max_batch_pairs": (_count, "an integer >= 1"),
    "max_queue_size": (_count, "an integer >= 1"),
    "max_memory_pairs": (_count, "an integer >= 1"),
    "spill_dir": (_path, "a directory path"),
    "exit_timeout": (_seconds, "a number of seconds from 0 to a year"),
    "retry_initial_s": (_seconds, "a number of seconds from 0 to a year"),
    "retry_max_s": (_seconds, "a number of seconds from 0 to a year"),
    "idle_replay_s": (_seconds, "a number of seconds from 0 to a year"),
    "replay_batch_pairs": (_count, "an integer >= 1"),
    "spill_file_pairs": (_count, "an integer >= 1"),
    "backlog_batch_pairs": (_count, "an integer >= 1"),
    "durability": (_durability, "one of memory, process, fsync-interval, fsync-always"),
    "fsync_interval_ms": (_milliseconds, "a number of milliseconds from 0 to a year"),
}


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper()


def queue_options_from_env(environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """The queue options set in the environment, parsed and validated; unset ones are absent."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for option, (parse, expected) in QUEUE_ENV_OPTIONS.items():
        name = env_name(option)
        raw = env.get(name)
        if raw is None or not raw.strip():
            continue
        try:
            out[option] = parse(raw.strip())
        except (ValueError, OverflowError):
            raise EnvConfigError(f"{name}={raw!r}: expected {expected}") from None
    return out


def resolve_queue_options(explicit: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """``explicit`` over the environment: the keyword arguments to build a queue with.

    An explicit value of None counts as "not given" (so a signature default of
    None lets the environment through); unknown names are passed on untouched
    for the queue to reject.
    """
    given = {k: v for k, v in explicit.items() if v is not None}
    return {**queue_options_from_env(environ), **given}
