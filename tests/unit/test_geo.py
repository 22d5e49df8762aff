"""The country table behind ip.geoip.country."""

from __future__ import annotations

import pytest

from agent.l7.geo import CountryTable

TABLE = CountryTable({"DE": ["192.0.2.0/24", "2001:db8:de::/48"],
                      "FR": ["192.0.2.128/25"],          # more specific than DE's /24
                      "US": ["198.51.100.7/32"]})


@pytest.mark.parametrize("address,code", [
    ("192.0.2.1", "DE"), ("192.0.2.200", "FR"), ("198.51.100.7", "US"),
    ("198.51.100.8", ""), ("2001:db8:de::1", "DE"), ("2001:db8:df::1", ""),
    ("not an address", ""),
])
def test_longest_prefix_names_the_country(address: str, code: str) -> None:
    assert TABLE.country(address) == code


@pytest.mark.parametrize("table,msg", [
    ({"de": ["192.0.2.0/24"]}, "'de' is not a two-letter code"),
    ({"DE": ["192.0.2.300/24"]}, "countries.DE: '192.0.2.300/24' is not a prefix"),
])
def test_bad_tables_are_named(table: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        CountryTable(table)


def test_firewall_rules_see_the_country() -> None:
    from agent.l7.config import Zone
    from agent.l7.counters import Counters
    from agent.l7.http1 import Request
    from agent.l7.pipeline import ZonePipeline

    zone = Zone.model_validate({"name": "z", "hostnames": ["z.example"], "firewall": [
        {"expression": 'ip.geoip.country in {"FR"}', "action": "block"}]})
    pipe = ZonePipeline(zone, Counters(["z"]), TABLE)
    req = Request("GET", "/", "z.example", (("host", "z.example"),), b"", "id", "1.1")
    assert pipe.run(req, "192.0.2.200", tls=True, now=0).response.status == 403
    assert pipe.run(req, "192.0.2.1", tls=True, now=0).response is None
