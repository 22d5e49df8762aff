"""lab/topology.yaml: the valid file, an invalid example for every rule, and
the agent and serve configs generated from it (lab/agents.py). No root."""

from __future__ import annotations

import copy
import ipaddress

import pytest
import yaml

from lab.agents import (
    DENY4_EXACT,
    DcPaths,
    dc_configs,
    lab_paths,
    pki_zones,
    render,
    write_configs,
)
from lab.topology import DEFAULT_PATH, TopologyError, load_topology, parse_topology
from lab.twons import LAB_BOGONS

RAW = yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def topo():
    return load_topology()


def test_the_lab_topology_is_valid(topo) -> None:
    assert [s.name for s in topo.segments] == ["inet", "bb"]
    assert (topo.public.name, topo.public.ifname, topo.public.mtu) == ("inet", "inet0", 1500)
    assert (topo.backbone.name, topo.backbone.ifname, topo.backbone.mtu) == ("bb", "bb0", 1600)
    assert topo.regions == ("eu", "us")
    assert topo.dc_names() == ("dus", "fra", "iad")
    assert topo.dc_names("eu") == ("dus", "fra") and topo.dc_names("us") == ("iad",)
    assert [h.name for h in topo.hosts] == ["client", "attacker", "uscustomer", "origin", "core"]
    assert [h.name for h in topo.anycast_hosts()] == ["client", "attacker", "uscustomer"]
    assert topo.node("client").anycast_via == "dus"
    assert topo.node("core").segments == ("bb",)
    dus = topo.dc("dus")
    assert dus.region == "eu" and dus.city == "Düsseldorf"
    assert str(dus.link("inet").v6) == "2001:db8:113::1" and str(dus.link("bb").v4) == "198.18.0.1"
    assert dus.link("bb").v6 is None
    assert topo.anycast.loopback_v4 == "198.51.100.1/24"
    assert topo.anycast.loopback_v6 == "2001:db8:100::1/128"
    assert [z.name for z in topo.regional_zones()] == ["shop-eu"]
    assert topo.regional_zones("us") == ()
    assert [(str(s.address), s.region, s.zone) for s in topo.services()] == [
        ("198.51.100.65", "eu", "shop-eu"), ("2001:db8:100::65", "eu", "shop-eu")]
    assert topo.dc_by_public_address("203.0.113.2") == "fra"
    assert topo.dc_by_public_address("2001:db8:113::3") == "iad"
    assert topo.dc_by_public_address("203.0.113.10") is None
    assert topo.deny == ("203.0.113.66/32", "2001:db8:113::66/128")
    assert topo.maglev_slots == 65537


def test_lookups_name_what_exists(topo) -> None:
    with pytest.raises(TopologyError, match=r"no host or DC named 'lhr' \(defined: dus, fra"):
        topo.node("lhr")
    with pytest.raises(TopologyError, match=r"'client' is a host, not a DC \(DCs: dus, fra, iad"):
        topo.dc("client")


def test_the_topology_round_trips_through_yaml(topo, tmp_path) -> None:
    from lab.topology import dump_topology

    p = tmp_path / "t.yaml"
    p.write_text(dump_topology(topo), encoding="utf-8")
    again = load_topology(p)
    assert again == topo


def _set(data: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        data = data[int(k)] if isinstance(data, list) else data[k]
    last = keys[-1]
    if value is _DELETE:
        del data[last]
    elif isinstance(data, list):
        data[int(last)] = value
    else:
        data[last] = value


_DELETE = object()

INVALID = [
    ("region_not_defined", "dcs.fra.region", "apac",
     'dcs.fra.region: "apac" is not a region (defined: eu, us)'),
    ("segment_role", "segments.inet.role", "edge",
     'segments.inet.role: "edge" is not a role (one of public, backbone)'),
    ("two_public_segments", "segments.bb.role", "public",
     "segments: need exactly one segment with role public (have: inet, bb)"),
    ("segment_mtu", "segments.bb.mtu", 100, "segments.bb.mtu: 100 must be an integer from 576"),
    ("segment_v4_host_bits", "segments.inet.v4", "203.0.113.1/24",
     'segments.inet.v4: "203.0.113.1/24" is not a network'),
    ("segment_v6_is_v4", "segments.inet.v6", "192.0.2.0/24",
     'segments.inet.v6: "192.0.2.0/24" is not an IPv6 network'),
    ("unknown_key", "dcs.dus.colour", "blue",
     "dcs.dus.colour: unknown key (known: inet, bb, region, city)"),
    ("dc_off_backbone", "dcs.iad.bb", _DELETE,
     "dcs.iad: a DC needs an address on every segment (missing: bb)"),
    ("dc_without_region", "dcs.iad.region", _DELETE, "dcs.iad.region: is required"),
    ("address_outside_segment", "hosts.client.inet.v4", "192.0.2.10",
     'hosts.client.inet.v4: "192.0.2.10" is not in segment inet (203.0.113.0/24)'),
    ("broadcast_address", "hosts.client.inet.v4", "203.0.113.255",
     'hosts.client.inet.v4: "203.0.113.255" is the network or broadcast address'),
    ("v6_where_segment_has_none", "hosts.core.bb", "2001:db8:113::99",
     'hosts.core.bb: "2001:db8:113::99" segment bb has no IPv6 network'),
    ("v4_key_holds_v6", "hosts.client.inet.v4", "2001:db8:113::10",
     'hosts.client.inet.v4: "2001:db8:113::10" is not an IPv4 address'),
    ("duplicate_address", "hosts.attacker.inet.v4", "203.0.113.10",
     'hosts.attacker.inet: "203.0.113.10" is already the address of client'),
    ("anycast_via_not_a_dc", "hosts.client.anycast_via", "lhr",
     'hosts.client.anycast_via: "lhr" is not a DC (DCs: dus, fra, iad)'),
    ("anycast_via_off_public", "hosts.core.anycast_via", "dus",
     "hosts.core.anycast_via: needs the host on the public segment (inet)"),
    ("host_on_no_segment", "hosts.origin.inet", _DELETE,
     "hosts.origin: is on no segment (segments: inet, bb)"),
    ("host_named_like_a_segment", "hosts.inet", {"inet": "203.0.113.99"},
     'hosts.inet: "inet" has the name of a segment'),
    ("host_name_too_long", "hosts.averyveryverylongname", {"inet": "203.0.113.99"},
     'hosts.averyveryverylongname: "averyveryverylongname" is not a host name'),
    ("maglev_not_prime", "maglev_slots", 65536,
     "maglev_slots: 65536 is not prime (Maglev needs a prime table size, e.g. 65537)"),
    ("maglev_too_big", "maglev_slots", 16777259, "maglev_slots: 16777259 must be a prime from 7"),
    ("anycast_overlaps_segment", "anycast.v4", "203.0.113.0/25",
     'anycast.v4: "203.0.113.0/25" overlaps segment inet (203.0.113.0/24)'),
    ("zone_region_not_defined", "zones.1.region", "apac",
     'zones[1].region: "apac" is not a region (defined: eu, us)'),
    ("zone_address_outside_anycast", "zones.0.addresses", ["203.0.113.1"],
     'zones[0].addresses[0]: "203.0.113.1" is not in the anycast range'),
    ("regional_zone_on_shared_ip", "zones.1.addresses", ["198.51.100.10"],
     'zones[1].addresses[0]: "198.51.100.10" is also an address of zone www (region none)'),
    ("zone_bad_hostname", "zones.0.hostnames", ["not a host"],
     'zones[0].hostnames[0]: "not a host" is not a host name'),
    ("zone_duplicate_name", "zones.1.name", "www", 'zones[1].name: "www" is used by another zone'),
    ("deny_host_bits", "deny.0", "203.0.113.66/24", 'deny[0]: "203.0.113.66/24" is not a prefix'),
    ("regions_empty", "regions", [], "regions: must be a non-empty list of region names"),
]


@pytest.mark.parametrize(("name", "path", "value", "message"), INVALID,
                         ids=[c[0] for c in INVALID])
def test_invalid_topology_says_where_and_why(name, path, value, message) -> None:
    data = copy.deepcopy(RAW)
    _set(data, path, value)
    with pytest.raises(TopologyError) as e:
        parse_topology(data, "topology.yaml")
    assert f"topology.yaml: {message}" in str(e.value), f"{name}: got\n{e.value}"


def test_zone_region_without_a_dc() -> None:
    data = copy.deepcopy(RAW)
    data["regions"].append("apac")
    data["zones"][1]["region"] = "apac"
    with pytest.raises(TopologyError, match=r'zones\[1\].region: "apac" has no DC to serve it'):
        parse_topology(data, "topology.yaml")


def test_every_problem_is_reported_at_once() -> None:
    data = copy.deepcopy(RAW)
    data["dcs"]["fra"]["region"] = "apac"
    data["maglev_slots"] = 100
    data["deny"] = ["nonsense"]
    with pytest.raises(TopologyError) as e:
        parse_topology(data, "topology.yaml")
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("topology.yaml: ") for line in lines)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(TopologyError, match="expected a mapping at the top level"):
        parse_topology(["segments"], "topology.yaml")


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(TopologyError, match=r"missing.yaml: cannot read"):
        load_topology(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("segments: [\n")
    with pytest.raises(TopologyError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_topology(bad)


# -- generated configs -------------------------------------------------------


@pytest.fixture(scope="module")
def iad(topo, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    return state, dc_configs(topo, "iad", lab_paths("iad", "el-", state, topo))


def test_dc_gets_two_link_configs_and_a_serve_config(iad) -> None:
    assert list(iad[1]) == ["inet0.yaml", "bb0.yaml", "serve.yaml", "metrics.yaml", "logs.yaml",
                            "api.yaml"]


def test_metrics_listen_on_the_backbone_and_probe_the_other_dcs(iad) -> None:
    from agent.metrics.config import MetricsConfig

    state, cfgs = iad
    m = MetricsConfig.model_validate(cfgs["metrics.yaml"])
    assert m.listen == "198.18.0.3" and m.cert == state / "netpki" / "agents" / "iad.crt"
    assert m.rtt is not None and m.rtt.peers == {"dus": "198.18.0.1", "fra": "198.18.0.2"}


def test_logs_go_to_the_core_and_a_regional_zone_names_its_region(iad) -> None:
    from agent.logs.config import parse_logs_config

    state, cfgs = iad
    logs = parse_logs_config(cfgs["logs.yaml"], "logs.yaml")
    assert logs.dc == "iad" and logs.cert == state / "netpki" / "agents" / "iad.crt"
    assert logs.cores["core"].url == "https://198.18.0.10:8443"
    assert logs.log_core("www") == logs.log_core("shop-eu") == "core"
    assert logs.zones["shop-eu"].log_region == "eu" and logs.sample.rate == 0.01


def test_link_configs(iad) -> None:
    state, cfgs = iad
    inet, bb = cfgs["inet0.yaml"], cfgs["bb0.yaml"]
    assert inet == {
        "interface": "inet0",
        "role": "public",
        "netns": "el-iad",
        "bpffs": "/sys/fs/bpf/privedge-el-iad",
        "run_dir": str(state / "iad" / "run"),
        "bogons": LAB_BOGONS,
        "deny": {"prefixes": ["203.0.113.66/32", "2001:db8:113::66/128"]},
        "capacity": {"maglev_slots": 65537, "deny4_exact": DENY4_EXACT},
        "steering": {
            "dc": "iad",
            "region": "us",
            "backbone_interface": "bb0",
            "backbone_address": "198.18.0.3",
            "dcs": [{"name": "dus", "region": "eu", "backbone": "198.18.0.1"},
                    {"name": "fra", "region": "eu", "backbone": "198.18.0.2"},
                    {"name": "iad", "region": "us", "backbone": "198.18.0.3"}],
            "services": [{"address": "198.51.100.65", "region": "eu", "zone": "shop-eu"},
                         {"address": "2001:db8:100::65", "region": "eu", "zone": "shop-eu"}],
        },
    }
    assert bb == {**inet, "interface": "bb0", "role": "backbone"}


def test_link_configs_are_valid_agent_configs(topo, iad) -> None:
    """The agent's own validation accepts what the lab writes (agent/config.py)."""
    from agent.config import parse_config

    for name in ("inet0.yaml", "bb0.yaml"):
        data = yaml.safe_load(render(iad[1][name]))
        cfg = parse_config(data, name)
        assert cfg.interface == name.removesuffix(".yaml")
        assert cfg.steering.dc == "iad" and cfg.capacity.maglev_slots == topo.maglev_slots


def test_serve_config(iad) -> None:
    """What the lab writes for a DC's front end is a valid serve config: the
    zones with their topology l7 settings, the lab CA trusted for the origin."""
    from agent.l7.config import parse_serve_config

    state, cfgs = iad
    serve = cfgs["serve.yaml"]
    assert (serve["dc"], serve["region"], serve["port"], serve["plain_port"]) == \
        ("iad", "us", 443, 80)
    assert serve["status_socket"] == str(state / "iad" / "l7.sock")
    assert serve["cache_store"]["disk_dir"] == str(state / "iad" / "cache")
    cfg = parse_serve_config(yaml.safe_load(render(serve)), "serve.yaml")
    www, shop = cfg.zone("www"), cfg.zone("shop-eu")
    assert www.hostnames == ("www.example.com",) and shop.region == "eu"
    assert www.origin.url == "https://203.0.113.80"
    assert www.origin.ca_file == str(state / "pki" / "ca.crt")
    assert www.login.endpoints and www.firewall and www.rate_limits and www.page_rules


def test_vm_configs_use_the_vm_interfaces_and_no_namespace(topo) -> None:
    paths = DcPaths(ifnames={"inet": "eth1", "bb": "eth2"}, netns=None,
                    bpffs="/sys/fs/bpf/privedge", run_dir="/run/privedge",
                    certs="/etc/privedge/pki", status_socket="/run/privedge/l7.sock",
                    cache_dir="/run/privedge/cache")
    cfgs = dc_configs(topo, "dus", paths)
    inet, bb = cfgs["inet0.yaml"], cfgs["bb0.yaml"]
    assert inet["interface"] == "eth1" and bb["interface"] == "eth2"
    assert "netns" not in inet and inet["steering"]["backbone_interface"] == "eth2"
    assert inet["steering"]["region"] == "eu"


def test_every_address_in_the_configs_is_a_lab_address(iad) -> None:
    doc = [ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("198.51.100.0/24"),
           ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32")]
    steering = iad[1]["inet0.yaml"]["steering"]
    addrs = [steering["backbone_address"], *(d["backbone"] for d in steering["dcs"]),
             *(s["address"] for s in steering["services"])]
    for a in addrs:
        assert any(ipaddress.ip_address(a) in n for n in doc), a


def test_pki_zones(topo) -> None:
    assert pki_zones(topo) == {"www": ["www.example.com"], "shop-eu": ["shop.example.eu"]}


def test_write_configs_writes_only_what_changed(iad, tmp_path) -> None:
    _, cfgs = iad
    assert write_configs(tmp_path, cfgs) == ["inet0.yaml", "bb0.yaml", "serve.yaml",
                                            "metrics.yaml", "logs.yaml", "api.yaml"]
    assert write_configs(tmp_path, cfgs) == []
    assert yaml.safe_load((tmp_path / "serve.yaml").read_text()) == cfgs["serve.yaml"]


# -- the CLI's no-root parts ---------------------------------------------------


def test_cli_usage_errors_exit_2(capsys) -> None:
    from lab.__main__ import main

    for argv in (["provision", "client", "--if", "inet"], ["frobnicate"],
                 ["generate", "dus", "--out", "/nonexistent", "--if", "inet=eth1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert "expected SEGMENT=IFNAME" in err and "give --if for exactly inet and bb" in err


def test_cli_reports_an_invalid_topology_and_exits_1(tmp_path, capsys) -> None:
    from lab.__main__ import main

    data = copy.deepcopy(RAW)
    data["dcs"]["fra"]["region"] = "apac"
    bad = tmp_path / "topology.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["--topology", str(bad), "status"]) == 1
    assert f'lab: {bad}: dcs.fra.region: "apac" is not a region' in capsys.readouterr().err


def test_cli_generate_writes_a_vms_configs(tmp_path, capsys) -> None:
    from lab.__main__ import main

    out = tmp_path / "etc"
    assert main(["generate", "fra", "--out", str(out), "--if", "inet=eth1",
                 "--if", "bb=eth2"]) == 0
    inet = yaml.safe_load((out / "inet0.yaml").read_text())
    serve = yaml.safe_load((out / "serve.yaml").read_text())
    assert (inet["interface"], inet["bpffs"], inet["run_dir"]) == \
        ("eth1", "/sys/fs/bpf/privedge", "/run/privedge")
    assert inet["steering"]["backbone_interface"] == "eth2" and "netns" not in inet
    assert serve["certs"] == str(out / "pki") and serve["status_socket"] == "/run/privedge/l7.sock"
    assert "wrote" in capsys.readouterr().out


def test_cli_generate_issues_missing_certificates_once(tmp_path) -> None:
    from lab.__main__ import main

    certs = tmp_path / "pki"
    argv = ["generate", "dus", "--out", str(tmp_path / "etc"), "--certs", str(certs),
            "--make-pki", "--if", "inet=eth1", "--if", "bb=eth2"]
    assert main(argv) == 0
    assert {p.name for p in certs.iterdir()} >= {"ca.crt", "ca.key", "www.crt", "www.key",
                                                 "shop-eu.crt", "shop-eu.key"}
    stamp = (certs / "www.crt").stat().st_mtime_ns
    assert main(argv) == 0
    assert (certs / "www.crt").stat().st_mtime_ns == stamp
    (certs / "shop-eu.crt").unlink()          # a CA copied in, zone certificates missing
    ca = (certs / "ca.crt").read_bytes()
    assert main(argv) == 0
    assert (certs / "shop-eu.crt").exists() and (certs / "ca.crt").read_bytes() == ca


def test_a_dc_of_its_own_gets_only_the_keys_it_may_serve() -> None:
    """On VMs each DC has its own PKI directory: the EU zone's key is issued
    to dus and fra, never to iad; the shared namespace lab issues all."""
    from lab.agents import pki_zones

    topo = load_topology()
    assert set(pki_zones(topo)) == {"www", "shop-eu"}
    assert set(pki_zones(topo, "dus")) == {"www", "shop-eu"}
    assert set(pki_zones(topo, "iad")) == {"www"}


def test_the_api_listens_on_the_backbone_and_the_lab_network_is_a_valid_network_config(
        iad, topo) -> None:
    from agent.api import ApiConfig
    from control.network import parse_network
    from lab.agents import network_doc

    state, cfgs = iad
    api = ApiConfig.model_validate(cfgs["api.yaml"])
    assert api.listen == "198.18.0.3" and api.audit == state / "iad" / "audit.jsonl"
    assert api.control is not None and api.control.address == "198.18.0.10"
    net = parse_network(network_doc(topo, str(state / "pki")), "lab network")
    assert {dc: d.backbone for dc, d in net.dcs.items()} == {
        "dus": "198.18.0.1", "fra": "198.18.0.2", "iad": "198.18.0.3"}
    assert net.deny.prefixes == ("203.0.113.66/32", "2001:db8:113::66/128")


def test_applying_the_lab_network_as_it_is_changes_no_zone_and_no_list(iad, topo,
                                                                        tmp_path) -> None:
    """The lab's network config renders, for a DC, exactly the zones of its
    serve config and the lists and steering of its link configs."""
    import yaml

    from agent.config import parse_config
    from agent.l7.config import parse_serve_config
    from agent.netgen import Identity, NetworkState, render
    from agent.rules import ruleset_from_config
    from control.genpack import pack
    from lab.agents import network_doc

    state, cfgs = iad
    path = tmp_path / "network.yaml"
    path.write_text(yaml.safe_dump(network_doc(topo, str(state / "pki"))))
    staged = NetworkState(tmp_path / "gens").stage(pack(path, 1)[0])
    serve = parse_serve_config(cfgs["serve.yaml"])
    link = parse_config(cfgs["inet0.yaml"])
    r = render(staged, Identity("iad", "us", link.steering.backbone_address), serve)
    assert r.serve == serve and r.left_out == ()
    mine, theirs = ruleset_from_config(link), ruleset_from_config(link, network=r.share)
    assert mine.steering == theirs.steering
    assert mine.deny["config"].changes(theirs.deny["config"]) == (0, 0)
    assert (mine.l4_rules, mine.limits, len(mine.allow)) == (theirs.l4_rules, theirs.limits,
                                                             len(theirs.allow))
