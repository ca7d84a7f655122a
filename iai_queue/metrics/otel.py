"""An OpenTelemetry metrics bridge for the provenance queue (extra ``otel``: ``opentelemetry-api``).

::

    from iai_queue.metrics.otel import register_queue_metrics

    register_queue_metrics(store)        # instruments on the global MeterProvider's meter "iai_queue"

Observable instruments, read when the SDK collects: counts as
``ObservableCounter``, entries held in memory as ``ObservableUpDownCounter``,
ages and last-write figures as ``ObservableGauge``. Names are
``iai_queue.<name>`` with UCUM units (``{entry}``, ``{file}``, ``{error}``,
``{retry}``, ``s``). One ``stats()`` snapshot serves every instrument of one
collection. Only the API is needed here; the application installs the SDK and
its exporters.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Mapping, Optional

from opentelemetry import metrics

from . import METRICS, Kind, stats_source

__all__ = ["register_queue_metrics", "QueueInstruments", "instrument_name"]

_UNITS = {"entries": "{entry}", "files": "{file}", "errors": "{error}", "retries": "{retry}", "seconds": "s",
          "restarts": "{restart}", "bytes": "By"}
_SNAPSHOT_TTL_S = 0.5  # one collection reads all instruments within this window


def instrument_name(spec) -> str:
    return f"iai_queue.{spec.name}"


class QueueInstruments:
    """The instruments :func:`register_queue_metrics` created (kept alive as long as this object)."""

    def __init__(self, source: Any, meter: "metrics.Meter", attributes: Optional[Mapping[str, Any]] = None):
        self._source = stats_source(source)
        self._attributes = dict(attributes or {})
        self._lock = threading.Lock()
        self._snapshot: tuple[float, Any] = (float("-inf"), None)
        self.instruments = []
        create = {Kind.COUNTER: meter.create_observable_counter,
                  Kind.UPDOWN: meter.create_observable_up_down_counter,
                  Kind.GAUGE: meter.create_observable_gauge}
        for spec in METRICS:
            self.instruments.append(create[spec.kind](
                instrument_name(spec), callbacks=[self._callback(spec.field)], unit=_UNITS[spec.unit],
                description=spec.help))

    def _stats(self):
        now = time.monotonic()
        with self._lock:
            taken, stats = self._snapshot
            if now - taken > _SNAPSHOT_TTL_S:
                stats = self._source()
                self._snapshot = (now, stats)
            return stats

    def _callback(self, field: str):
        def observe(options: "metrics.CallbackOptions") -> Iterable["metrics.Observation"]:
            stats = self._stats()
            if stats is None:
                return []
            return [metrics.Observation(getattr(stats, field), self._attributes)]
        return observe


def register_queue_metrics(source: Any, *, meter_provider: Optional["metrics.MeterProvider"] = None,
                           attributes: Optional[Mapping[str, Any]] = None) -> QueueInstruments:
    """Create the queue's observable instruments on ``meter_provider`` (default: the global one)."""
    from .. import __version__

    meter = metrics.get_meter("iai_queue", __version__, meter_provider=meter_provider)
    return QueueInstruments(source, meter, attributes)
