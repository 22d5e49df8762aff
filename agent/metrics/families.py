"""Small builders of metric families shared by the agent's collectors."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily


def counter_by(name: str, doc: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter with one label, a sample per key of `counts`."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in counts.items():
        family.add_metric([key], n)
    return family


def cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (the last one over every bound) as Prometheus's
    cumulative buckets, "+Inf" last."""
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"{len(counts)} counts for {len(bounds)} bounds (+Inf)")
    out, total = [], 0
    for bound, n in zip([*(repr(float(b)) for b in bounds), "+Inf"], counts, strict=True):
        total += n
        out.append((bound, total))
    return out
