"""The log shippers' counts as Prometheus metrics, read at scrape time.

    registry.register(LogsCollector(lambda: daemon.log_router))

Labels: `stream` (logs, sample) and `core` (a core's name in logs.yaml),
both from closed sets; never an address or a record's content. They must
be on agent/metrics/registry.py's LABELS for AllowlistRegistry to take this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

PREFIX = "privedge_logs_"
LABELS = ("stream", "core")

# stats() key → (metric name without _total, help)
COUNTERS = {
    "submitted": ("records_submitted", "Records handed to the log shipper"),
    "sent": ("records_sent", "Records acknowledged by the core"),
    "dropped": ("records_dropped", "Records dropped: a bound of the in-memory queues was "
                                   "reached, or the agent stopped"),
    "rejected": ("records_rejected", "Records refused: by the core (400, 413) or, for "
                                     "a malformed record, before sending"),
    "batches_sent": ("batches_sent", "Batches acknowledged by the core"),
    "retries": ("retries", "Failed attempts to send a batch, each retried"),
}
GAUGES = {
    "pending_records": ("pending_records", "Records in memory not yet acknowledged"),
    "pending_bytes": ("pending_bytes", "Compressed batch bytes in memory not yet acknowledged"),
}


class StatsSource(Protocol):
    def stats(self) -> list[tuple[str, str, dict[str, int | str]]]: ...


class LogsCollector:
    """`source` gives the current router (a reload may make a new one), or
    None while logs are off."""

    def __init__(self, source: Callable[[], StatsSource | None]) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        # Families with their label names, so a registry can check them before
        # any shipper exists.
        return self._families([("logs", "core", {})])

    def collect(self) -> Iterator[Metric]:
        router = self.source()
        if router is None:
            return iter(())
        return iter(self._families(router.stats()))

    @staticmethod
    def _families(rows: list[tuple[str, str, dict[str, int | str]]]) -> list[Metric]:
        families: list[Metric] = []
        for key, (name, doc) in COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
            for stream, core, stats in rows:
                family.add_metric([stream, core], int(stats.get(key, 0)))
            families.append(family)
        for key, (name, doc) in GAUGES.items():
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            for stream, core, stats in rows:
                gauge.add_metric([stream, core], int(stats.get(key, 0)))
            families.append(gauge)
        return families
