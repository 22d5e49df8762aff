"""agent/metrics/xdp.py against a real node: frames through the program by
BPF_PROG_TEST_RUN, then a scrape sums the per-CPU counters."""

from __future__ import annotations

from prometheus_client import generate_latest

from agent.metrics.registry import AllowlistRegistry
from agent.metrics.xdp import XdpCollector
from tests.bpf.cases import standard_rules, v4


def _value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in the scrape")


def test_a_scrape_counts_the_programs_verdicts(edge) -> None:
    edge.apply(standard_rules(edge.base_rules()))  # denies 198.51.100.7
    registry = AllowlistRegistry()
    registry.register(XdpCollector({"tr0": edge.node}))
    drop = 'privedge_xdp_packets_total{interface="tr0",reason="denylist",verdict="drop"}'
    ok = 'privedge_xdp_packets_total{interface="tr0",reason="ok",verdict="pass"}'
    before = generate_latest(registry).decode()
    edge.run(v4("198.51.100.7"), repeat=5)
    edge.run(v4("198.51.100.44"), repeat=3)
    after = generate_latest(registry).decode()
    assert _value(after, drop) - _value(before, drop) == 5
    assert _value(after, ok) - _value(before, ok) == 3
    assert _value(after, drop.replace("packets", "bytes")) > _value(before, drop.replace(
        "packets", "bytes"))
