"""The Regional Services guard and the serve config: pure cases, no sockets."""

from __future__ import annotations

import copy
import textwrap

import pytest

from agent.l7.config import ConfigError, ServeConfig, load_serve_config, parse_serve_config
from agent.l7.counters import Counters, Refusal
from agent.l7.guard import Action, Decision, Guard, Reason

VALID = """
dc: dus
region: eu
listen: ["0.0.0.0", "::"]
port: 443
certs: /etc/privedge/certs
status_socket: /run/privedge/el-dus/l7.sock
unknown_sni: refuse
zones:
  - {name: shop-eu, hostnames: [shop.example.eu], region: eu,
     addresses: [198.51.100.65, "2001:db8:100::65"]}
  - {name: www, hostnames: [www.example.com, "*.cdn.example.com"],
     addresses: [198.51.100.10, "2001:db8:100::10"]}
  - {name: shop-us, hostnames: [shop.example.us], region: us, addresses: [198.51.100.66]}
"""

BASE: dict = {
    "dc": "dus", "region": "eu", "certs": "/c",
    "zones": [
        {"name": "shop-eu", "hostnames": ["shop.example.eu"], "region": "eu",
         "addresses": ["198.51.100.65", "2001:db8:100::65"]},
        {"name": "www", "hostnames": ["www.example.com"],
         "addresses": ["198.51.100.10", "2001:db8:100::10"]},
    ],
}


def _cfg(**patch: object) -> ServeConfig:
    return parse_serve_config({**copy.deepcopy(BASE), **patch}, "serve.yaml")


def _guard(region: str = "eu", unknown_sni: str = "refuse") -> Guard:
    return Guard(parse_serve_config(
        {**copy.deepcopy(BASE), "region": region, "unknown_sni": unknown_sni,
         "zones": [*BASE["zones"], {"name": "shop-us", "hostnames": ["shop.example.us"],
                                    "region": "us", "addresses": ["198.51.100.66"]}]}))


def serve(zone: str | None, reason: Reason) -> Decision:
    return Decision(Action.SERVE, zone, reason)


def refuse(reason: Reason, zone: str | None = None) -> Decision:
    return Decision(Action.REFUSE, zone, reason)


# ---------------------------------------------------------------- config


def test_valid_example(tmp_path) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(textwrap.dedent(VALID))
    cfg = load_serve_config(p)
    assert (cfg.dc, cfg.region, cfg.port, cfg.listen) == ("dus", "eu", 443, ("0.0.0.0", "::"))
    assert [z.name for z in cfg.zones] == ["shop-eu", "www", "shop-us"]
    assert cfg.zone("shop-eu").regional and not cfg.zone("www").regional
    assert cfg.zone("www").hostnames == ("www.example.com", "*.cdn.example.com")
    assert cfg.handshake_timeout == 10 and cfg.idle_timeout == 30


def test_config_is_immutable() -> None:
    cfg = _cfg()
    with pytest.raises(ValueError, match="frozen"):
        cfg.region = "us"  # type: ignore[misc]


def test_hostnames_and_addresses_are_normalised() -> None:
    cfg = _cfg(zones=[{"name": "a", "hostnames": ["WWW.Example.COM."],
                       "addresses": ["::ffff:198.51.100.7", "2001:DB8:0:0::1"]}])
    assert cfg.zones[0].hostnames == ("www.example.com",)
    assert cfg.zones[0].addresses == ("198.51.100.7", "2001:db8::1")


def _zones(*extra: dict) -> list[dict]:
    return [*copy.deepcopy(BASE["zones"]), *extra]


@pytest.mark.parametrize(("patch", "message"), [
    ({"zones": _zones({"name": "www", "hostnames": ["x.example.com"]})},
     "zones[2].name: 'www': zone names must be unique: already zones[1]"),
    ({"zones": _zones({"name": "dup", "hostnames": ["SHOP.example.eu"]})},
     "zones[2].hostnames[0]: 'shop.example.eu': already a hostname of zones[0]"),
    ({"zones": _zones({"name": "dup", "hostnames": ["d.example"],
                       "addresses": ["198.51.100.9", "::ffff:198.51.100.65"]})},
     "zones[2].addresses[1]: '198.51.100.65': already an address of zones[0]"),
    ({"zones": _zones({"name": "eu2", "hostnames": ["e.example"], "region": "eu"})},
     "zones[2]: zone 'eu2' is restricted to region eu, so it needs dedicated addresses"),
    ({"zones": _zones({"name": "bad", "hostnames": ["b.example"], "addresses": ["300.1.1.1"]})},
     "zones[2].addresses[0]: '300.1.1.1': '300.1.1.1' is not an IPv4 or IPv6 address"),
    ({"zones": _zones({"name": "bad", "hostnames": ["under_score.example"]})},
     "zones[2].hostnames[0]: 'under_score.example': 'under_score.example' is not a hostname"),
    ({"zones": _zones({"name": "Bad/Name", "hostnames": ["b.example"]})},
     "zones[2].name: 'Bad/Name': 'Bad/Name' is not a name"),
    ({"zones": _zones({"name": "empty", "hostnames": []})},
     "zones[2].hostnames: Tuple should have at least 1 item"),
    ({"zones": _zones({"name": "refuse", "hostnames": ["r.example"]})},
     "zones[2].name: 'refuse': 'refuse' is reserved for unknown_sni"),
    ({"unknown_sni": "nope"},
     "unknown_sni: 'nope': must be 'refuse' or a zone name (zones: shop-eu, www)"),
    ({"listen": ["0.0.0.0", "localhost"]},
     "listen[1]: 'localhost': 'localhost' is not an IPv4 or IPv6 address"),
    ({"listen": ["::", "0:0::0"]}, "listen[1]: '::': listed twice"),
    ({"port": 70000}, "port: 70000: Input should be less than or equal to 65535"),
    ({"handshake_timeout": 0}, "handshake_timeout: 0: Input should be greater than 0"),
    ({"colour": "blue"}, "colour: 'blue': Extra inputs are not permitted"),
])
def test_invalid_examples_name_path_value_and_why(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(**patch)
    assert f"serve.yaml: {message}" in str(e.value), str(e.value)


def test_every_cross_zone_problem_is_listed() -> None:
    zones = _zones({"name": "www", "hostnames": ["www.example.com"],
                    "addresses": ["198.51.100.10"]})
    with pytest.raises(ConfigError) as e:
        _cfg(zones=zones, unknown_sni="nope")
    lines = str(e.value).splitlines()
    assert lines == [
        "serve.yaml: zones[2].name: 'www': zone names must be unique: already zones[1]",
        "serve.yaml: zones[2].hostnames[0]: 'www.example.com': already a hostname of zones[1]",
        "serve.yaml: zones[2].addresses[0]: '198.51.100.10': already an address of zones[1]",
        "serve.yaml: unknown_sni: 'nope': must be 'refuse' or a zone name "
        "(zones: shop-eu, www)",
    ]


def test_direct_construction_checks_too() -> None:
    data = {**copy.deepcopy(BASE), "unknown_sni": "nope"}
    with pytest.raises(ValueError, match="unknown_sni: 'nope'"):
        ServeConfig.model_validate(data)


def test_yaml_errors_name_the_file(tmp_path) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text("dc: dus\nzones: [\n")
    with pytest.raises(ConfigError, match=r"serve.yaml:\d+:\d+: not valid YAML"):
        load_serve_config(p)
    p.write_text("- dus\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_serve_config(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_serve_config(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- guard


@pytest.mark.parametrize(("region", "local_ip", "expected"), [
    # Out of region: the regional zone's dedicated IPs are refused, both families.
    ("us", "198.51.100.65", refuse(Reason.REGION_ADDRESS, "shop-eu")),
    ("us", "2001:db8:100::65", refuse(Reason.REGION_ADDRESS, "shop-eu")),
    # A dual-stack socket reports IPv4 as mapped IPv6; it is the same address.
    ("us", "::ffff:198.51.100.65", refuse(Reason.REGION_ADDRESS, "shop-eu")),
    ("us", "2001:DB8:100:0::65", refuse(Reason.REGION_ADDRESS, "shop-eu")),
    ("eu", "198.51.100.66", refuse(Reason.REGION_ADDRESS, "shop-us")),
    # In region, global zones, and addresses of no zone are admitted.
    ("eu", "198.51.100.65", serve("shop-eu", Reason.ADDRESS)),
    ("eu", "::ffff:198.51.100.65", serve("shop-eu", Reason.ADDRESS)),
    ("us", "198.51.100.10", serve("www", Reason.ADDRESS)),
    ("us", "2001:db8:100::10", serve("www", Reason.ADDRESS)),
    ("us", "127.0.0.1", serve(None, Reason.ADDRESS)),
    ("us", "fe80::1%lo", serve(None, Reason.ADDRESS)),
])
def test_by_address(region: str, local_ip: str, expected: Decision) -> None:
    assert _guard(region).by_address(local_ip) == expected


def test_by_address_rejects_non_addresses() -> None:
    with pytest.raises(ValueError):
        _guard().by_address("not-an-ip")


@pytest.mark.parametrize(("region", "unknown_sni", "sni", "expected"), [
    ("eu", "refuse", "shop.example.eu", serve("shop-eu", Reason.SNI)),
    ("eu", "refuse", "SHOP.Example.EU.", serve("shop-eu", Reason.SNI)),
    ("us", "refuse", "shop.example.eu", refuse(Reason.REGION_SNI, "shop-eu")),
    ("eu", "refuse", "shop.example.us", refuse(Reason.REGION_SNI, "shop-us")),
    ("us", "refuse", "www.example.com", serve("www", Reason.SNI)),
    ("eu", "refuse", "nope.example.com", refuse(Reason.UNKNOWN_SNI)),
    ("eu", "refuse", None, refuse(Reason.UNKNOWN_SNI)),
    ("eu", "refuse", "", refuse(Reason.UNKNOWN_SNI)),
    ("eu", "www", None, serve("www", Reason.DEFAULT)),
    ("eu", "www", "nope.example.com", serve("www", Reason.DEFAULT)),
    # A regional default zone is still only served in its region.
    ("eu", "shop-eu", None, serve("shop-eu", Reason.DEFAULT)),
    ("us", "shop-eu", None, refuse(Reason.REGION_SNI, "shop-eu")),
    ("us", "shop-eu", "www.example.com", serve("www", Reason.SNI)),
])
def test_by_sni(region: str, unknown_sni: str, sni: str | None, expected: Decision) -> None:
    assert _guard(region, unknown_sni).by_sni(sni) == expected


def test_wildcard_hostnames_match_one_label() -> None:
    g = Guard(_cfg(zones=[{"name": "cdn", "hostnames": ["*.cdn.example.com"]}]))
    assert g.by_sni("img.cdn.example.com") == serve("cdn", Reason.SNI)
    assert g.by_sni("cdn.example.com").reason is Reason.UNKNOWN_SNI
    assert g.by_sni("a.b.cdn.example.com").reason is Reason.UNKNOWN_SNI


@pytest.mark.parametrize(("unknown_sni", "host", "tls_zone", "expected"), [
    ("refuse", "www.example.com", "www", serve("www", Reason.HOST)),
    ("refuse", "WWW.example.com:443", "www", serve("www", Reason.HOST)),
    # SNI www, Host of a regional zone: never read as that zone's request.
    ("refuse", "shop.example.eu", "www", refuse(Reason.MISDIRECTED, "www")),
    ("refuse", "shop.example.us:443", "www", refuse(Reason.MISDIRECTED, "www")),
    ("refuse", "[2001:db8:100::10]:443", "www", refuse(Reason.MISDIRECTED, "www")),
    ("refuse", None, "www", refuse(Reason.MISDIRECTED, "www")),
    ("www", "198.51.100.10", "www", serve("www", Reason.HOST)),
    ("www", None, "www", serve("www", Reason.HOST)),
    ("www", "shop.example.eu", "www", refuse(Reason.MISDIRECTED, "www")),
])
def test_by_host(unknown_sni: str, host: str | None, tls_zone: str, expected: Decision) -> None:
    assert _guard("eu", unknown_sni).by_host(host, tls_zone) == expected


def test_servable_zones_exclude_foreign_regions() -> None:
    assert _guard("eu").servable == ("shop-eu", "www")
    assert _guard("us").servable == ("www", "shop-us")


def test_refusal_reasons_are_counter_labels() -> None:
    refusals = {Reason.REGION_ADDRESS, Reason.REGION_SNI, Reason.UNKNOWN_SNI,
                Reason.MISDIRECTED}
    assert {Refusal(r) for r in refusals} <= set(Refusal)


# ---------------------------------------------------------------- counters


def test_counters_have_closed_label_sets() -> None:
    c = Counters(["shop-eu", "www"])
    c.accepted()
    c.refused(Refusal.REGION_SNI)
    c.refused("region_address")
    c.handshake("TLSv1.3")
    c.handshake("SSLv3")
    c.served("www")
    with pytest.raises(ValueError):
        c.refused("198.51.100.7")
    with pytest.raises(KeyError):
        c.served("attacker-chosen.example")
    snap = c.snapshot()
    assert snap["connections_accepted"] == 1
    assert snap["refused"] == {"region_address": 1, "region_sni": 1, "unknown_sni": 0,
                               "handshake_error": 0, "misdirected": 0}
    assert snap["handshakes"] == {"TLSv1.2": 0, "TLSv1.3": 1, "other": 1}
    assert snap["requests"] == {"shop-eu": 0, "www": 1}
    assert snap["request_errors"] == {"timeout": 0, "too_large": 0, "malformed": 0,
                                      "closed": 0}
