"""control/network.py: the network config. The example is valid; for every
rule an invalid variant of it is refused, naming the path, and nothing of
it is accepted (one error refuses the whole file)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.config import ConfigError
from control.network import json_schema, load_network, main, parse_network

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "network.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_the_example_is_valid(capsys) -> None:
    cfg = load_network(EXAMPLE)
    assert set(cfg.dcs) == {"dus", "fra", "iad"} and cfg.zones[1].region == "eu"
    assert cfg.zones[0].logs.logpush[0].fields == ("time", "status", "path")
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "ok: 2 region(s), 3 DC(s), 2 zone(s) (1 regional)" in capsys.readouterr().out


def _set(path: str, value: object) -> Callable[[dict], None]:
    """A change at a dotted path (list indices as numbers)."""
    def change(doc: dict) -> None:
        *parents, last = path.split(".")
        node: object = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]  # type: ignore[index]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value  # type: ignore[index]
    return change


def _kek() -> str:
    key = x25519.X25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


INVALID = [
    ("a DC in an undefined region", _set("dcs.iad.region", "apac"),
     r"dcs\.iad\.region: 'apac': not a defined region \(defined: eu, us\)"),
    ("a zone in an undefined region", _set("zones.1.region", "apac"),
     r"zones\[1\]\.region: 'apac': not a defined region"),
    ("a zone in a region with no DC",
     lambda d: (d["regions"].append("ap"), _set("zones.1.region", "ap")(d)),
     r"zones\[1\]\.region: 'ap': no DC is in region ap, so no DC could serve the zone"),
    ("a region listed twice", lambda d: d["regions"].append("eu"),
     r"regions\[2\]: 'eu': listed twice"),
    ("a hostname in two zones", _set("zones.1.hostnames", ["www.example.com"]),
     r"zones\[1\]\.hostnames\[0\]: 'www\.example\.com': already a hostname of zones\[0\]"),
    ("a dedicated address in two zones", _set("zones.1.addresses", ["198.51.100.10"]),
     r"zones\[1\]\.addresses\[0\]: '198\.51\.100\.10': already an address of zones\[0\]"),
    ("a zone name twice", _set("zones.1.name", "www"),
     r"zones\[1\]\.name: 'www': zone names must be unique"),
    ("a dedicated address that is a DC's", _set("zones.1.addresses", ["203.0.113.2"]),
     r"zones\[1\]\.addresses\[0\]: '203\.0\.113\.2': a DC's own address \(dcs\.fra\.public\[0\]\)"),
    ("two DCs on one backbone address", _set("dcs.fra.backbone", "198.18.0.1"),
     r"dcs\.fra\.backbone: '198\.18\.0\.1': already dcs\.dus\.backbone"),
    ("a firewall expression that does not parse",
     _set("zones.0.firewall.0.expression", 'http.request.uri.path matchez "x"'),
     r"zones\[0\]\.firewall\[0\]\.expression: .*expected an operator"),
    ("a deny prefix that does not parse", _set("deny.prefixes", ["203.0.113.300/32"]),
     r"deny\.prefixes\[0\]: '203\.0\.113\.300/32': .*not an IPv4 or IPv6 prefix"),
    ("a deny file that is not there", _set("deny.files", ["no-such-list.txt"]),
     r"deny\.files\[0\]: 'no-such-list\.txt': .*cannot read"),
    ("a regional zone without dedicated addresses", _set("zones.1.addresses", []),
     r"needs dedicated addresses"),
    ("a geo key policy without the zone's region",
     _set("zones.1.key_policy", {"mode": "geo", "regions": ["us"]}),
     r"zones\[1\]\.key_policy\.regions: \['us'\]: the zone is served only in eu"),
    ("a geo key policy in an undefined region",
     _set("zones.0.key_policy", {"mode": "geo", "regions": ["mars"]}),
     r"zones\[0\]\.key_policy\.regions\[0\]: 'mars': not a defined region"),
    ("a keyless zone without a key server", _set("zones.0.key_policy", {"mode": "keyless"}),
     r"zones\[0\]\.key_policy: a keyless zone names its key server"),
    ("a key server on plain HTTP",
     _set("zones.0.key_policy", {"mode": "keyless", "keyserver": "http://keys.example"}),
     r"names its key server as https"),
    ("logs kept longer than 7 days", _set("zones.0.logs.retention_days", 30),
     r"zones\[0\]\.logs\.retention_days: 30: must be at most 7"),
    ("a log region that is not defined", _set("zones.0.logs.log_region", "apac"),
     r"zones\[0\]\.logs\.log_region: 'apac': not a defined region"),
    ("a Logpush field that records do not have",
     _set("zones.0.logs.logpush.0.fields", ["time", "password"]),
     r"zones\[0\]\.logs\.logpush\[0\]\.fields: 'password' not a log record key"),
    ("a key-encryption key that is not a public key", _set("dcs.dus.kek", "not a key"),
     r"dcs\.dus\.kek: 'not a key': not a PEM public key"),
    ("an unknown setting", _set("zones.0.colour", "blue"),
     r"zones\[0\]\.colour: 'blue': Extra inputs are not permitted"),
    ("two L4 rules of one name",
     _set("l4_rules", [{"name": "r", "proto": 17, "action": "drop"},
                       {"name": "r", "proto": 6, "action": "drop"}]),
     r"l4_rules: .*rule names must be unique: r repeated"),
    ("no DC at all", _set("dcs", {}), r"dcs"),
]


@pytest.mark.parametrize(("what", "change", "why"), INVALID, ids=[c[0] for c in INVALID])
def test_an_invalid_config_is_refused_naming_the_path(what: str, change, why: str,
                                                     tmp_path: Path) -> None:
    doc = copy.deepcopy(example())
    change(doc)
    path = tmp_path / "network.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=why) as e:
        load_network(path)
    assert str(e.value).startswith(f"{path}:"), e.value


def test_every_problem_is_listed_at_once() -> None:
    doc = example()
    _set("dcs.iad.region", "apac")(doc)
    _set("zones.1.hostnames", ["www.example.com"])(doc)
    with pytest.raises(ConfigError) as e:
        parse_network(doc, "net.yaml")
    lines = str(e.value).splitlines()
    assert any("dcs.iad.region" in line for line in lines)
    assert any("zones[1].hostnames[0]" in line for line in lines)


def test_list_files_are_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "drop.txt").write_text("# reputation list\n192.0.2.0/24\n2001:db8:bad::/48\n")
    (tmp_path / "bad.txt").write_text("192.0.2.0/24\nnot-a-prefix\n")
    doc = example()
    doc["deny"]["files"] = ["drop.txt"]
    doc["dcs"]["dus"]["kek"] = _kek()
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(doc))
    assert load_network(tmp_path / "net.yaml").deny.files == ("drop.txt",)
    doc["deny"]["files"] = ["bad.txt"]
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"deny\.files\[0\]: 'bad\.txt': (.|\n)*bad\.txt:2: "):
        load_network(tmp_path / "net.yaml")


def test_the_json_schema_describes_the_file(tmp_path: Path) -> None:
    schema = json_schema()
    assert schema["title"] == "privedge network config"
    assert {"regions", "dcs", "zones", "deny", "allow", "l4_rules", "limits"} <= set(
        schema["properties"])
    assert schema["required"] == ["regions", "dcs"]
    out = tmp_path / "schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == schema


def test_a_bad_file_exits_1_with_the_reason(tmp_path: Path, capsys) -> None:
    doc = example()
    doc["zones"][1]["region"] = "apac"
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(doc))
    assert main(["validate", str(tmp_path / "net.yaml")]) == 1
    assert "zones[1].region: 'apac': not a defined region" in capsys.readouterr().err
