"""A Prometheus collector for the provenance queue (extra ``prometheus``: ``prometheus-client``).

::

    from prometheus_client import REGISTRY, start_http_server
    from iai_queue.metrics.prometheus import QueueCollector

    REGISTRY.register(QueueCollector(store))      # or a queue, or a callable returning QueueStats
    start_http_server(9464)

Each scrape takes one ``stats()`` snapshot, so the samples of a scrape agree
with each other. Names: ``iai_queue_<name>_total`` for counters,
``iai_queue_<name>`` for gauges, ``_seconds`` on durations (table in
:data:`iai_queue.metrics.METRICS`). ``labels`` adds constant labels (e.g.
``{"store": "main"}``) to tell several queues of one process apart.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import METRICS, Kind, stats_source

__all__ = ["QueueCollector", "metric_name"]


def metric_name(spec, namespace: str = "iai_queue") -> str:
    """The family name (counters without ``_total``: the client library appends it)."""
    suffix = "_seconds" if spec.unit == "seconds" else ""
    return f"{namespace}_{spec.name}{suffix}"


class QueueCollector(Collector):
    """Exposes a queue's ``stats()`` at scrape time; registers nothing by itself."""

    def __init__(self, source: Any, *, namespace: str = "iai_queue", labels: Optional[Mapping[str, str]] = None):
        self._source = stats_source(source)
        self._namespace = namespace
        self._labels = dict(labels or {})

    def describe(self) -> Iterator:
        # Families without samples: lets registry.register() check names without a scrape.
        return self._families(None)

    def collect(self) -> Iterator:
        stats = self._source()
        if stats is None:  # no queue right now (writes are synchronous): nothing to report
            return iter(())
        return self._families(stats)

    def _families(self, stats) -> Iterator:
        keys, values = list(self._labels), list(self._labels.values())
        for spec in METRICS:
            name = metric_name(spec, self._namespace)
            family_type = CounterMetricFamily if spec.kind is Kind.COUNTER else GaugeMetricFamily
            family = family_type(name, spec.help, labels=keys, unit="")
            if stats is not None:
                family.add_metric(values, float(getattr(stats, spec.field)))
            yield family
