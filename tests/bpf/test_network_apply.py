"""A network generation on a DC with two real links (pinned maps and
programs, packets through BPF_PROG_TEST_RUN) and a real front end: the
generation reaches both links; one link that cannot take it changes neither;
a failure after the links swapped puts both back (never half-applied); the
operator's own denies outlive a generation."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent import catalog
from agent.api import ApiError
from agent.config import Capacity
from agent.daemon import Agent
from agent.l7.server import ServeError
from agent.libbpf import XdpAction
from agent.netgen import render
from agent.standalone import StandaloneNode
from control import ops, pki
from control.genpack import pack
from lab.certs import make_lab_pki
from tests.bpf.cases import v4

XDP_DROP, XDP_PASS = XdpAction.DROP, XdpAction.PASS
SMALL = Capacity(deny4_exact=512, deny4_lpm=16)    # tr1's trie holds 16 prefixes
ATTACKER, OTHER = "192.0.2.77", "198.51.100.9"


@pytest.fixture(scope="module")
def links() -> Iterator[list[StandaloneNode]]:
    nodes = [StandaloneNode("net0", Capacity(deny4_exact=512), "tr0"),
             StandaloneNode("net1", SMALL, "tr1")]
    yield nodes
    for n in nodes:
        n.close()


@dataclass
class Dc:
    agent: Agent
    tmp: Path
    links: list[StandaloneNode]

    def network(self, name: str, deny: list[str]) -> dict:
        doc = {"regions": ["eu"],
               "dcs": {"dus": {"region": "eu", "backbone": "198.18.0.1",
                               "public": ["203.0.113.1"]}},
               "zones": [{"name": "www", "hostnames": ["www.example.com"]}],
               "deny": {"prefixes": deny}}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return pack(path, int(name[1:]))[0]

    def verdicts(self, src: str) -> list[int]:
        return [n.run(v4(src)).verdict for n in self.links]


@pytest.fixture()
def dc(links: list[StandaloneNode], tmp_path: Path) -> Iterator[Dc]:
    net = tmp_path / "pki"
    pki.run(net, pki.plan({"dus": [ipaddress.ip_address("127.0.0.1")]}, [], {}))
    zones = make_lab_pki(tmp_path / "zones", {"www": ["www.example.com"]}).parent
    paths = []
    for n in links:
        path = tmp_path / f"{n.ifname}.yaml"
        path.write_text(yaml.safe_dump({
            "interface": n.ifname, "role": "backbone", "bpffs": n.bpffs, "run_dir": n.run_root,
            "capacity": n.cap.model_dump()}))
        paths.append(str(path))
        n.apply(n.base_rules())
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({
        "dc": "dus", "region": "eu", "listen": ["127.0.0.1"], "port": 0, "certs": str(zones),
        "zones": [{"name": "www", "hostnames": ["www.example.com"]}]}))
    (tmp_path / "api.yaml").write_text(yaml.safe_dump({
        "listen": "127.0.0.1", "port": 0, "cert": str(net / "agents" / "dus.crt"),
        "key": str(net / "agents" / "dus.key"), "ca": str(net / "ca.crt"),
        "audit": str(tmp_path / "audit.jsonl")}))
    agent = Agent(paths, str(tmp_path / "serve.yaml"), api_path=str(tmp_path / "api.yaml"))
    for link, n in zip(agent.links, links, strict=True):
        link.node = n.node          # started: the standalone nodes stand in for attached links
    agent.start_front()
    yield Dc(agent, tmp_path, links)
    if agent.front:
        agent.front.stop()


def test_a_generation_reaches_every_link(dc: Dc) -> None:
    assert dc.verdicts(ATTACKER) == [XDP_PASS, XDP_PASS]
    report = dc.agent.apply_network(dc.network("g1", ["192.0.2.0/24"]))
    assert report["generation"] == 1 and report["front"] == "unchanged"
    assert set(report["links"]) == {"tr0", "tr1"}
    assert dc.verdicts(ATTACKER) == [XDP_DROP, XDP_DROP]
    assert dc.verdicts(OTHER) == [XDP_PASS, XDP_PASS]
    dc.agent.apply_network(dc.network("g2", []))        # and a generation takes it away
    assert dc.verdicts(ATTACKER) == [XDP_PASS, XDP_PASS]
    assert dc.agent.network_info()["generation"] == 2


def test_a_link_that_cannot_take_the_generation_changes_no_link(dc: Dc) -> None:
    dc.agent.apply_network(dc.network("g1", ["192.0.2.0/24"]))
    bpf_before = [n.node.active().generation for n in dc.links]
    # 20 prefixes of /25: over tr1's trie of 16, well within tr0's.
    many = [f"198.51.{i}.0/25" for i in range(20)]
    with pytest.raises(ApiError) as e:
        dc.agent.apply_network(dc.network("g2", many))
    assert e.value.status == 422 and "nothing changed" in str(e.value)
    assert "16" in str(e.value)                                    # names the capacity
    assert [n.node.active().generation for n in dc.links] == bpf_before
    assert dc.verdicts("198.51.3.1") == [XDP_PASS, XDP_PASS]
    assert dc.verdicts(ATTACKER) == [XDP_DROP, XDP_DROP]
    assert dc.agent.network_info()["generation"] == 1
    assert [p.name for p in (dc.tmp / "generations").iterdir() if "staging" in p.name] == []


def test_a_failure_after_the_links_swapped_puts_them_back(dc: Dc, monkeypatch) -> None:
    dc.agent.apply_network(dc.network("g1", ["192.0.2.0/24"]))

    def front_fails(cfg) -> None:
        raise ServeError("the front end did not start (injected)")

    monkeypatch.setattr(dc.agent, "swap_front", front_fails)
    monkeypatch.setattr(dc.agent, "check_front", lambda cfg: None)
    g2 = dc.network("g2", ["198.51.100.0/24"])
    g2_zones = {**g2["doc"], "zones": [*g2["doc"]["zones"],
                                       {"name": "shop", "hostnames": ["shop.example.com"]}]}
    g2 = pack_doc(dc.tmp, g2_zones, 2)
    with pytest.raises(ApiError) as e:
        dc.agent.apply_network(g2)
    assert e.value.status == 500 and "rolled back to generation 1" in str(e.value)
    # Both links enforce generation 1's rules again, not g2's, not a mix.
    assert dc.verdicts(OTHER) == [XDP_PASS, XDP_PASS]
    assert dc.verdicts(ATTACKER) == [XDP_DROP, XDP_DROP]
    assert dc.agent.network_info()["generation"] == 1
    assert (dc.tmp / "generations" / "current").resolve().name == "gen-1"


def test_the_operators_denies_outlive_a_generation(dc: Dc) -> None:
    dc.agent.apply_network(dc.network("g1", []))
    for n in dc.links:
        ops.deny_add(n.node, [OTHER + "/32"])
    dc.agent.apply_network(dc.network("g2", ["192.0.2.0/24"]))
    assert dc.verdicts(OTHER) == [XDP_DROP, XDP_DROP]
    assert dc.verdicts(ATTACKER) == [XDP_DROP, XDP_DROP]
    for n in dc.links:
        rules = catalog.load(n.node.run_dir)
        assert rules is not None and len(rules.deny["adhoc"]) == 1
        assert len(rules.deny["config"]) == 1


def pack_doc(tmp: Path, doc: dict, number: int) -> dict:
    path = tmp / f"doc{number}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return pack(path, number)[0]


def test_a_deny_added_between_the_check_and_the_swap_is_kept(dc: Dc) -> None:
    """The check compiles each link's rules; an operator's deny that lands
    before the swap makes the link compile again rather than lose it."""
    dc.agent.apply_network(dc.network("g1", []))
    staged = dc.agent.network.stage(dc.network("g2", ["192.0.2.0/24"]))
    try:
        rendered = render(staged, dc.agent.identity(), dc.agent.serve_local)
        plans = [dc.agent._plan_link(link, rendered.share) for link in dc.agent.links]
        for n in dc.links:
            ops.deny_add(n.node, [OTHER + "/32"])
        for plan in plans:
            plan.swap(rendered.share)
    finally:
        dc.agent.network.discard(staged)
    assert dc.verdicts(OTHER) == [XDP_DROP, XDP_DROP]
    assert dc.verdicts(ATTACKER) == [XDP_DROP, XDP_DROP]


def test_a_generation_that_cannot_be_kept_on_disk_is_rolled_back(dc: Dc, monkeypatch) -> None:
    """What a restart would apply is kept before an apply is reported done;
    a disk that refuses it leaves the DC on its generation before."""
    dc.agent.apply_network(dc.network("g1", ["192.0.2.0/24"]))

    def disk_full(staged) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dc.agent.network, "commit", disk_full)
    with pytest.raises(ApiError) as e:
        dc.agent.apply_network(dc.network("g2", ["198.51.100.0/24"]))
    assert e.value.status == 500 and "No space left" in str(e.value)
    assert dc.verdicts(OTHER) == [XDP_PASS, XDP_PASS]
    assert dc.verdicts(ATTACKER) == [XDP_DROP, XDP_DROP]
    assert dc.agent.network_info()["generation"] == 1


def test_a_link_that_cannot_be_put_back_is_named_half_applied(dc: Dc, monkeypatch) -> None:
    """The one case an apply cannot undo is said loudly, with each link's name."""
    import agent.daemon as daemon
    from agent.libbpf import BpfError

    dc.agent.apply_network(dc.network("g1", ["192.0.2.0/24"]))
    real, calls = daemon.apply_generation, []

    def swaps_then_fails(node, rules, **kw):
        calls.append(node.ifname)
        if len(calls) > len(dc.links):      # the rollback's
            raise BpfError("update pe_d4lpm slot 0", 12, "Cannot allocate memory (injected)")
        return real(node, rules, **kw)

    def front_fails(cfg) -> None:
        raise ServeError("the front end did not start (injected)")

    monkeypatch.setattr(daemon, "apply_generation", swaps_then_fails)
    monkeypatch.setattr(dc.agent, "swap_front", front_fails)
    monkeypatch.setattr(dc.agent, "check_front", lambda cfg: None)
    g2 = dc.network("g2", ["198.51.100.0/24"])
    g2 = pack_doc(dc.tmp, {**g2["doc"], "zones": [*g2["doc"]["zones"], {
        "name": "shop", "hostnames": ["shop.example.com"]}]}, 2)
    with pytest.raises(ApiError) as e:
        dc.agent.apply_network(g2)
    assert e.value.status == 500 and str(e.value).startswith("HALF-APPLIED")
    assert "tr0: BpfError" in str(e.value) and "tr1: BpfError" in str(e.value)
    assert dc.agent.network_info()["generation"] == 1     # not claimed as applied
