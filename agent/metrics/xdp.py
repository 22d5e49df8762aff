"""The XDP program's per-CPU counters as Prometheus metrics, read at scrape
time: every scrape sums the per-CPU values of each link's pinned stats map
(agent/node.py), so nothing is polled in between."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from agent import abi
from agent.node import Node

PREFIX = "privedge_xdp_"


class XdpCollector:
    def __init__(self, nodes: Mapping[str, Node]) -> None:
        self.nodes = nodes  # interface name → its open node

    def collect(self) -> Iterator[Metric]:
        labels = ["interface", "verdict", "reason"]
        packets = CounterMetricFamily(PREFIX + "packets", "Packets by the XDP program's "
                                      "verdict and its reason", labels=labels)
        size = CounterMetricFamily(PREFIX + "bytes", "Bytes by the XDP program's verdict "
                                   "and its reason", labels=labels)
        for ifname, node in sorted(self.nodes.items()):
            counters = node.counters()
            for reason in abi.Reason:
                c = counters[reason]
                key = [ifname, reason.verdict.lower(), reason.label]
                packets.add_metric(key, c.packets)
                size.add_metric(key, c.bytes)
        yield packets
        yield size
