"""A Prometheus registry that only takes metrics with allowlisted labels.

DESIGN.md's promise for system metrics: aggregated, no personal data, no
client IP, URL, user agent or end-user hostname in any label or value. The
values are counts and durations; the labels are the risk, so each label name
must be one of LABELS, whose values come from closed sets (enums, the
config's zone and DC names). A collector with another label is refused at
registration, before it can ever be scraped, and every scrape checks every
sample again (a custom collector may yield labels it did not describe).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

# Every label a metric may carry, and where its values come from.
LABELS = frozenset({
    "verdict",        # XDP: pass, drop, redirect (agent/abi.py)
    "reason",         # XDP and L7 refusals: enums
    "interface",      # the agent's configured interfaces
    "dc",             # DC names from the network config
    "peer_dc",        # the same, for RTT between DCs
    "zone",           # zone names from the config (never a Host header)
    "status_class",   # 1xx..5xx
    "cache_status",   # hit, miss, ..., none (agent/l7/counters.py CACHE_STATUSES)
    "action",         # rule actions: an enum (agent/l7/counters.py)
    "error",          # request errors: an enum
    "tls_version",    # TLSv1.2, TLSv1.3, other
    "le",             # histogram buckets (prometheus_client adds it)
    "stream",         # the log shippers' streams: logs, sample (agent/logs)
    "core",           # a core's name in logs.yaml
})


class MetricsError(ValueError):
    """A metric the agent must not export; the message names it and why."""


class AllowlistRegistry(CollectorRegistry):
    """CollectorRegistry that checks label names at register() and at collect()."""

    def __init__(self, allowed: frozenset[str] = LABELS) -> None:
        super().__init__(auto_describe=True)
        self.allowed = allowed

    def _check(self, name: str, labels: Iterable[str]) -> None:
        bad = sorted(set(labels) - self.allowed)
        if bad:
            raise MetricsError(f"metric {name}: label(s) {', '.join(bad)} not on the "
                               "allowlist (agent/metrics/registry.py LABELS)")

    def register(self, collector: Collector) -> None:
        # A client_python metric knows its label names; a custom collector
        # shows them in the samples of its description (or of a collection).
        self._check(getattr(collector, "_name", type(collector).__name__),
                    getattr(collector, "_labelnames", ()))
        describe = getattr(collector, "describe", None)
        for family in (describe() if describe is not None else collector.collect()):
            self._check(family.name, (k for s in family.samples for k in s.labels))
        super().register(collector)

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            for sample in family.samples:
                self._check(family.name, sample.labels)
            yield family
