"""The L7 front end's counters (agent/l7/counters.py) as Prometheus metrics,
read from a consistent snapshot at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from agent.l7.counters import LATENCY_BUCKETS, Counters, RuleAction
from agent.metrics.families import counter_by, cumulative

# The origin's failures, also among the rule actions, as a metric of their own
# (the origin error ratio is what an operator alerts on).
ORIGIN_ERRORS = {RuleAction.ORIGIN_ERROR: "error", RuleAction.ORIGIN_TIMEOUT: "timeout"}

PREFIX = "privedge_l7_"


class L7Collector:
    """`source` gives the front end's current counters (a reload makes a new
    front end), or None while none runs."""

    def __init__(self, source: Callable[[], Counters | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        counters = self.source()
        if counters is None:
            return
        snap = counters.snapshot()
        yield CounterMetricFamily(PREFIX + "connections_accepted",
                                  "TCP connections accepted by the front end",
                                  value=snap["connections_accepted"])
        yield counter_by(PREFIX + "connections_refused",
                         "Connections refused before any request, by reason", "reason",
                         snap["refused"])
        yield counter_by(PREFIX + "tls_handshakes", "TLS handshakes completed", "tls_version",
                         snap["handshakes"])
        yield counter_by(PREFIX + "requests", "Requests answered, by zone", "zone",
                         snap["requests"])
        yield counter_by(PREFIX + "request_errors", "Requests refused by the HTTP layer, by error",
                         "error", snap["request_errors"])
        actions = CounterMetricFamily(PREFIX + "rule_actions",
                                      "What a zone's rules did (WAF, firewall, rate limits, "
                                      "cache, origin errors), by zone and action",
                                      labels=["zone", "action"])
        origin = CounterMetricFamily(PREFIX + "origin_errors",
                                     "Requests the origin failed (502: error, 504: timeout), "
                                     "by zone", labels=["zone", "error"])
        for zone, by_action in snap["actions"].items():
            for action, n in by_action.items():
                actions.add_metric([zone, action], n)
            for action, error in ORIGIN_ERRORS.items():
                origin.add_metric([zone, error], by_action[action])
        yield actions
        yield origin
        responses = CounterMetricFamily(PREFIX + "responses",
                                        "Responses sent, by zone, status class and cache status",
                                        labels=["zone", "status_class", "cache_status"])
        for zone, by_class in snap["responses"].items():
            for cls, by_cache in by_class.items():
                for cache, n in by_cache.items():
                    responses.add_metric([zone, cls, cache], n)
        yield responses
        latency = HistogramMetricFamily(PREFIX + "response_seconds",
                                        "Time from a request's last byte in to its response's "
                                        "last byte out, by zone", labels=["zone"])
        for zone, hist in snap["latency"].items():
            latency.add_metric([zone], cumulative(LATENCY_BUCKETS, hist["buckets"]), hist["sum"])
        yield latency

