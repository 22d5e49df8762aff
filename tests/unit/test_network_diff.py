"""control/render.py: each DC's share of the network config, and what a new
config would change there (`python -m control.network diff OLD NEW`)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from control.network import load_network, main, parse_network
from control.render import dc_view, diff

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "network.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def _diff(old: dict, new: dict, base: Path = Path(".")) -> dict:
    return diff(parse_network(old, "old", base), parse_network(new, "new", base), base, base)


def test_a_dc_inspects_global_zones_and_its_regions_and_holds_keys_by_policy() -> None:
    net = load_network(EXAMPLE)
    dus, iad = dc_view(net, "dus"), dc_view(net, "iad")
    assert set(dus.zones) == {"www", "shop-eu"} and set(iad.zones) == {"www"}
    assert dus.keys == {"www", "shop-eu"} and iad.keys == {"www"}
    assert len(dus.deny) == 2 and dus.steering == iad.steering


def test_the_same_config_changes_nothing() -> None:
    assert all(d.empty for d in _diff(example(), example()).values())


def test_one_prefix_more_reaches_every_dc() -> None:
    new = example()
    new["deny"]["prefixes"].append("192.0.2.0/24")
    changes = _diff(example(), new)
    assert {dc: (d.deny_added, d.deny_removed) for dc, d in changes.items()} == {
        "dus": (1, 0), "fra": (1, 0), "iad": (1, 0)}
    assert changes["dus"].summary() == "deny +1 -0 prefixes"


def test_a_list_file_of_100k_prefixes_is_counted_by_entry(tmp_path: Path) -> None:
    lines = [f"10.{i >> 8 & 255}.{i & 255}.0/24" for i in range(100_000 % 65536)]
    lines += [f"2001:db8:{i:x}::/48" for i in range(100_000 - len(lines))]
    (tmp_path / "old.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "new.txt").write_text("\n".join([*lines[1:], "192.0.2.0/24"]) + "\n")
    old, new = example(), example()
    old["deny"]["files"], new["deny"]["files"] = ["old.txt"], ["new.txt"]
    d = _diff(old, new, tmp_path)["fra"]
    assert (d.deny_added, d.deny_removed) == (1, 1) and not d.zones_changed


def test_a_regional_zone_changes_only_in_its_region() -> None:
    new = example()
    new["zones"][1]["waf"] = {"paranoia": 2}
    changes = _diff(example(), new)
    assert changes["dus"].zones_changed == ["shop-eu"] == changes["fra"].zones_changed
    assert changes["iad"].empty


def test_a_geo_key_policy_moves_keys_and_a_new_dc_gets_everything() -> None:
    new = copy.deepcopy(example())
    new["zones"][0]["key_policy"] = {"mode": "geo", "regions": ["eu"]}
    new["dcs"]["ams"] = {"region": "eu", "backbone": "198.18.0.4", "public": ["203.0.113.4"]}
    changes = _diff(example(), new)
    assert changes["iad"].keys_removed == ["www"] and changes["iad"].zones_changed == ["www"]
    assert changes["dus"].keys_removed == [] and changes["dus"].steering_changed
    ams = changes["ams"]
    assert ams.new_dc and ams.zones_added == ["shop-eu", "www"] and ams.deny_added == 2


def test_limits_change_every_dcs_rules(tmp_path: Path, capsys) -> None:
    new = example()
    new["limits"]["syn"] = {"pps": 100, "burst": 200}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(example()))
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(new))
    assert main(["diff", str(tmp_path / "old.yaml"), str(tmp_path / "new.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{dc}  L4 rules or limits changed" for dc in ("dus", "fra", "iad")]
