"""The L7 front end's counters (agent/l7/counters.py) as Prometheus metrics,
read from a consistent snapshot at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from agent.l7.counters import Counters

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
        refused = CounterMetricFamily(PREFIX + "connections_refused",
                                      "Connections refused before any request, by reason",
                                      labels=["reason"])
        for reason, n in snap["refused"].items():
            refused.add_metric([reason], n)
        yield refused
        tls = CounterMetricFamily(PREFIX + "tls_handshakes", "TLS handshakes completed",
                                  labels=["tls_version"])
        for version, n in snap["handshakes"].items():
            tls.add_metric([version], n)
        yield tls
        requests = CounterMetricFamily(PREFIX + "requests", "Requests answered, by zone",
                                       labels=["zone"])
        for zone, n in snap["requests"].items():
            requests.add_metric([zone], n)
        yield requests
        errors = CounterMetricFamily(PREFIX + "request_errors",
                                     "Requests refused by the HTTP layer, by error",
                                     labels=["error"])
        for error, n in snap["request_errors"].items():
            errors.add_metric([error], n)
        yield errors
        actions = CounterMetricFamily(PREFIX + "rule_actions",
                                      "What a zone's rules did (WAF, firewall, rate limits, "
                                      "cache, origin errors), by zone and action",
                                      labels=["zone", "action"])
        for zone, by_action in snap["actions"].items():
            for action, n in by_action.items():
                actions.add_metric([zone, action], n)
        yield actions
