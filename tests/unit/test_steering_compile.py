"""Steering's compiled maps, without a kernel: regions, services, tables, drains."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest

from agent import abi, maglev
from agent.config import ConfigError, Steering, parse_config
from agent.steering import compile_steering, drain, region_tables

DCS = [{"name": "dus", "region": "eu", "backbone": "198.18.0.1"},
       {"name": "fra", "region": "eu", "backbone": "198.18.0.2"},
       {"name": "iad", "region": "us", "backbone": "198.18.0.3"},
       {"name": "syd", "region": "ap", "backbone": "198.18.0.7", "enabled": False}]
SVC = [{"address": "198.51.100.65", "region": "eu"},
       {"address": "2001:db8:100::65", "region": "eu"},
       {"address": "198.51.100.70", "region": "ap"}]


def steering(dc: str = "iad", dcs=DCS, services=SVC) -> Steering:
    me = next(d for d in dcs if d["name"] == dc)
    return Steering(dc=dc, region=me["region"], backbone_interface="bb0",
                    backbone_address=me["backbone"], dcs=dcs, services=services)


def test_compiled_maps() -> None:
    t = compile_steering(steering(), public=True, backbone_ifindex=7, slots=251)
    assert steering().regions == ("ap", "eu", "us")
    assert t.params.flags == abi.S_STEER and t.params.region == 2
    assert t.params.bb_ifindex == 7 and t.params.maglev_size == 251
    assert bytes(t.params.bb_addr4) == ipaddress.IPv4Address("198.18.0.3").packed
    assert [int(x) for x in t.svc4_keys] == [int(ipaddress.IPv4Address("198.51.100.65")),
                                            int(ipaddress.IPv4Address("198.51.100.70"))]
    assert list(t.svc4_vals["region"]) == [1, 0] and list(t.svc6_vals["region"]) == [1]
    assert t.dcs[1]["bb_addr4"] == int(ipaddress.IPv4Address("198.18.0.2"))
    table = t.maglev.reshape(-1)
    assert set(np.unique(table[0:251])) == {abi.MAGLEV_EMPTY}          # ap: drained
    assert set(np.unique(table[251:502])) == {0, 1}                   # eu: dus, fra
    assert set(np.unique(table[502:753])) == {2}                      # us: iad
    assert len(t.maglev) % abi.MAGLEV_PER_WORD == 0


def test_backbone_link_decapsulates() -> None:
    t = compile_steering(steering("dus"), public=False, backbone_ifindex=3, slots=251)
    assert t.params.flags == abi.S_DECAP and t.params.region == 1


def test_no_steering_steers_nothing() -> None:
    t = compile_steering(None, public=True, backbone_ifindex=0, slots=251)
    assert t.params.flags == 0 and len(t.svc4_keys) == 0 and len(t.svc6_keys) == 0


@pytest.mark.parametrize("n", [2, 3, 10, 100])
def test_drain_moves_only_the_drained_slots_and_restores(n: int) -> None:
    names = [f"dc{i:03d}" for i in range(n)]
    full = maglev.build(names, 65537)
    enabled = [i != n // 2 for i in range(n)]
    drained = drain(full, names, enabled, 65537)
    changed = drained != full
    assert (changed == (full == n // 2)).all(), "a slot of a DC that stayed moved"
    counts = np.bincount(drained, minlength=n)
    assert counts[n // 2] == 0
    alive = counts[np.array(enabled)]
    assert alive.max() - alive.min() <= 2, f"unbalanced: {alive.min()}..{alive.max()}"
    assert (drain(full, names, [True] * n, 65537) == full).all()


def test_all_drained_is_empty() -> None:
    names = ["a", "b"]
    assert (drain(maglev.build(names, 251), names, [False, False], 251) == maglev.EMPTY).all()


def test_drained_dc_gets_no_flows_in_region_tables() -> None:
    dcs = [dict(d, enabled=d["name"] != "fra") for d in DCS]
    tables = region_tables(steering(dcs=dcs), 251)
    assert set(np.unique(tables["eu"])) == {0}


@pytest.mark.parametrize("change,error", [
    ({"dc": "lax"}, "dc: 'lax' is not in dcs"),
    ({"backbone_address": "198.18.0.9"}, "is listed in dcs with region us and backbone"),
    ({"dcs": [*DCS, DCS[0]]}, "names must be unique: dus repeated"),
    ({"services": [SVC[0], SVC[0]]}, "address 198.51.100.65 listed twice"),
    ({"backbone_address": "2001:db8::1"}, "is not an IPv4 address"),
    ({"services": [{"address": "198.51.100.9", "region": "apac"}]},
     "region apac has no DC (regions with DCs: ap, eu, us)"),
    ({"dcs": [*DCS, {"name": "lax", "region": "us", "backbone": "198.18.0.3"}]},
     "backbone address 198.18.0.3 listed twice"),
])
def test_invalid_steering_is_named(change: dict, error: str) -> None:
    data = {"interface": "inet0", "steering": {
        "dc": "iad", "region": "us", "backbone_interface": "bb0",
        "backbone_address": "198.18.0.3", "dcs": DCS, "services": SVC, **change}}
    with pytest.raises(ConfigError) as e:
        parse_config(data, "node.yaml")
    assert "node.yaml: steering" in str(e.value) and error in str(e.value)


@pytest.mark.parametrize("link,error", [
    ({"interface": "bb0"}, "'bb0' is this link, whose role is public"),
    ({"interface": "eth9", "role": "backbone"}, "but this backbone link is 'eth9'"),
])
def test_link_role_matches_the_backbone_interface(link: dict, error: str) -> None:
    data = {**link, "steering": {
        "dc": "iad", "region": "us", "backbone_interface": "bb0",
        "backbone_address": "198.18.0.3", "dcs": DCS, "services": SVC}}
    with pytest.raises(ConfigError) as e:
        parse_config(data, "node.yaml")
    assert error in str(e.value)


def test_maglev_slots_must_be_prime() -> None:
    with pytest.raises(ConfigError, match=r"capacity\.maglev_slots: 65536: 65536 is not a prime"):
        parse_config({"interface": "inet0", "capacity": {"maglev_slots": 65536}}, "node.yaml")
