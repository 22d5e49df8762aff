"""Invariant: nothing is lost when the core is away (issue 5 §6).

Steady lab traffic, 200 requests a second through Düsseldorf for 80 s; the
core's log store is stopped for 60 s of it and started again. Every answered
request's log record must be in the store once the edge has caught up, and
the edge must report nothing dropped (lab/outage.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab import outage
from lab.cluster import Lab
from tests.integration.labs import whole_lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from whole_lab("o")


def test_a_60s_core_outage_at_200_requests_per_second_loses_no_record(lab: Lab) -> None:
    r = outage.run(lab, rate=200, seconds=80, outage=60)
    assert r["outage_s"] >= 60
    assert r["errors"] == {} and r["answered"] == r["requests_sent"] == 16000, r
    assert r["records_stored"] == r["answered"], r
    assert r["dropped_reported"] == 0, r
