"""The Prometheus collector and the OpenTelemetry bridge, against a real registry and an in-memory reader."""

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader, Sum
from prometheus_client import CollectorRegistry, generate_latest

from iai_queue.metrics import METRICS, Kind, stats_source
from iai_queue.metrics.otel import register_queue_metrics
from iai_queue.metrics.prometheus import QueueCollector


def queue_with_traffic(store, records, tmp_path):
    q = store.enable_provenance_queue(coalesce_ms=5, spill_dir=tmp_path / "spill")
    for i in range(6):
        q.enqueue([(records[i].id, {"n": i}), (records[i + 1].id, {"n": i})])
    assert q.flush(10)
    return q


def test_every_stats_field_has_one_metric():
    from dataclasses import fields

    from iai_queue import QueueStats

    assert sorted(m.field for m in METRICS) == sorted(f.name for f in fields(QueueStats))
    assert len({m.name for m in METRICS}) == len(METRICS)


def test_prometheus_collector_follows_the_store_toggle(store, records, tmp_path):
    registry = CollectorRegistry()
    registry.register(QueueCollector(store, labels={"store": "main"}))
    assert registry.get_sample_value("iai_queue_entries_accepted_total", {"store": "main"}) is None  # no queue yet

    queue_with_traffic(store, records, tmp_path)
    value = lambda name: registry.get_sample_value(name, {"store": "main"})  # noqa: E731
    assert value("iai_queue_entries_accepted_total") == 12
    assert value("iai_queue_entries_written_total") == 12
    assert value("iai_queue_entries_pending") == 0
    assert value("iai_queue_entries_dropped_total") == 0
    assert value("iai_queue_last_write_duration_seconds") > 0
    types = {f.name: f.type for f in registry.collect()}
    assert types["iai_queue_entries_accepted"] == "counter"
    assert types["iai_queue_entries_pending"] == "gauge"
    assert types["iai_queue_oldest_pending_age_seconds"] == "gauge"
    assert len(types) == len(METRICS)
    text = generate_latest(registry).decode()
    assert 'iai_queue_entries_accepted_total{store="main"} 12.0' in text

    store.disable_provenance_queue()
    assert value("iai_queue_entries_accepted_total") is None  # writes are synchronous: nothing to report


def test_prometheus_collector_on_a_queue_shows_pending(store, records, gate, tmp_path):
    q = store.enable_provenance_queue(coalesce_ms=1, spill_dir=tmp_path / "spill")
    registry = CollectorRegistry()
    registry.register(QueueCollector(q))
    q.enqueue([(records[0].id, {"n": 1})])
    assert gate.entered.wait(10)  # the worker holds the batch: it is pending
    q.enqueue([(records[1].id, {"n": 2})])
    assert registry.get_sample_value("iai_queue_entries_pending") == 2
    assert registry.get_sample_value("iai_queue_oldest_pending_age_seconds") > 0
    gate.open()
    assert q.flush(10)
    assert registry.get_sample_value("iai_queue_entries_pending") == 0
    assert registry.get_sample_value("iai_queue_entries_written_total") == 2
    store.disable_provenance_queue()


def test_otel_bridge_reports_counters_updowns_and_gauges(store, records, tmp_path):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    handle = register_queue_metrics(store, meter_provider=provider, attributes={"store": "main"})
    queue_with_traffic(store, records, tmp_path)

    data = reader.get_metrics_data()
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert set(metrics) == {f"iai_queue.{m.name}" for m in METRICS}
    for spec in METRICS:
        m = metrics[f"iai_queue.{spec.name}"]
        if spec.kind is Kind.GAUGE:
            assert isinstance(m.data, Gauge), spec
        else:
            assert isinstance(m.data, Sum) and m.data.is_monotonic == (spec.kind is Kind.COUNTER), spec
        assert m.unit == {"entries": "{entry}", "files": "{file}", "errors": "{error}", "retries": "{retry}",
                          "seconds": "s", "restarts": "{restart}", "bytes": "By"}[spec.unit]
        (point,) = m.data.data_points
        assert dict(point.attributes) == {"store": "main"}
    point = lambda name: metrics[name].data.data_points[0].value  # noqa: E731
    assert point("iai_queue.entries_accepted") == 12 == point("iai_queue.entries_written")
    assert point("iai_queue.entries_pending") == 0
    assert point("iai_queue.last_write_duration") > 0
    store.disable_provenance_queue()
    provider.shutdown()
    assert handle.instruments


def test_stats_source_rejects_what_it_cannot_read():
    with pytest.raises(TypeError, match="MemoryStore"):
        stats_source(42)
