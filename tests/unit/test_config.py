"""Node config: one valid example, and an invalid one for every rule."""

from __future__ import annotations

import textwrap

import pytest

from agent.config import DEFAULT_BOGONS, ConfigError, load_config, parse_config

VALID = """
interface: edge0
role: public
limits:
  syn: {pps: 100, burst: 200}
  udp: {pps: 5000, burst: 10000}
allow: [203.0.113.0/24, "2001:db8:1::/48"]
bogons: default
deny:
  prefixes: [192.0.2.0/24, 198.51.100.7]
l4_rules:
  - {name: ntp-peers, proto: udp, sport: [123], dport: [123], action: pass}
  - {name: reflection, proto: udp, sport: [19, 123, "1900", 11211], action: drop}
  - {name: high, proto: tcp, dport: ["1024-65535"], action: pass}
  - {name: gre, proto: gre, action: drop}
"""


def _load(tmp_path, text: str):
    p = tmp_path / "node.yaml"
    p.write_text(textwrap.dedent(text))
    return load_config(p)


def test_valid_example(tmp_path) -> None:
    cfg = _load(tmp_path, VALID)
    assert cfg.interface == "edge0" and cfg.public
    assert cfg.limits.syn.interval_ns == 10_000_000 and cfg.limits.syn.burst_ns == 2_000_000_000
    assert cfg.bogons == DEFAULT_BOGONS
    assert [r.name for r in cfg.l4_rules] == ["ntp-peers", "reflection", "high", "gre"]
    assert cfg.l4_rules[1].sport[2].lo == 1900 and cfg.l4_rules[3].proto == 47
    assert cfg.l4_rules[2].dport[0].hi == 65535


def test_minimal_config_has_production_defaults() -> None:
    cfg = parse_config({"interface": "eth1"})
    assert cfg.role == "public" and cfg.bogons == DEFAULT_BOGONS
    assert {r.name for r in cfg.l4_rules} == {"ntp-symmetric", "udp-reflection"}


@pytest.mark.parametrize(("patch", "message"), [
    ({"limits": {"syn": {"pps": -5, "burst": 1}}},
     "limits.syn.pps: -5: Input should be greater than or equal to 0"),
    ({"interface": "a-very-long-interface-name"},
     "interface: 'a-very-long-interface-name': 'a-very-long-interface-name' is not an "
     "interface name"),
    ({"allow": ["10.0.0.1/8"]}, "allow[0]: '10.0.0.1/8': '10.0.0.1/8': host bits are set"),
    ({"deny": {"prefixes": ["nonsense"]}}, "deny.prefixes[0]: 'nonsense'"),
    ({"role": "edge"}, "role: 'edge': Input should be 'public' or 'backbone'"),
    ({"l4_rules": [{"name": "x", "proto": "xyz", "action": "drop"}]},
     "l4_rules[0].proto: 'xyz': 'xyz' is not a protocol"),
    ({"l4_rules": [{"name": "x", "proto": "icmp", "sport": [1], "action": "drop"}]},
     "l4_rules[0]: ports can only be matched for tcp and udp"),
    ({"l4_rules": [{"name": "x", "proto": "udp", "sport": ["9-2"], "action": "drop"}]},
     "port range 9-2 is reversed"),
    ({"l4_rules": [{"name": "x", "proto": "udp", "sport": ["http"], "action": "drop"}]},
     "'http' is not a port or a port range"),
    ({"l4_rules": [{"name": "x", "proto": "udp", "action": "block"}]},
     "l4_rules[0].action: 'block': Input should be 'drop' or 'pass'"),
    ({"l4_rules": [{"name": "x", "proto": "udp", "action": "drop"}] * 2},
     "rule names must be unique: x repeated"),
    ({"l4_rules": [{"name": f"r{i}", "proto": "udp", "action": "drop"} for i in range(33)]},
     "33 rules; at most 32 fit the bit vectors"),
    ({"capacity": {"deny4_exact": 10}}, "capacity.deny4_exact: 10: Input should be greater"),
    ({"colour": "blue"}, "colour: 'blue': Extra inputs are not permitted"),
])
def test_invalid_examples_name_path_value_and_why(patch, message) -> None:
    data = {"interface": "eth1", **patch}
    with pytest.raises(ConfigError) as e:
        parse_config(data, "node.yaml")
    assert f"node.yaml: {message}" in str(e.value) or message in str(e.value), str(e.value)
    assert str(e.value).startswith("node.yaml: ")


def test_yaml_syntax_error_names_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"node.yaml:\d+:\d+: not valid YAML \(expected"):
        _load(tmp_path, "interface: eth0\nlimits:\n  syn: {pps: 1\n")


def test_top_level_must_be_a_mapping(tmp_path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        _load(tmp_path, "- eth0\n")


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_the_documented_example_is_valid() -> None:
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples/node.yaml")
    assert cfg.interface == "edge0" and cfg.deny.prefixes == ("192.0.2.0/24",)
