"""privedge-net apply and reconcile against two real agents (agent/daemon.py's
Agent with its front end and API, no XDP link: tests/bpf/test_network_apply.py
has the links) on loopback: a generation reaches both and changes what their
front ends serve; an invalid file sends nothing; a DC that is down is named
and brought level by reconcile or by its own pull at start; roles; stale and
conflicting generations; a restart starts with the stored generation."""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.daemon import Agent
from agent.l7.proxy import TRACE_PATH
from agent.metrics.server import TlsFiles
from control import audit, pki
from control.generations import GenerationStore
from control.genpack import pack
from control.genserver import GenerationServer
from control.netcli import main
from lab.certs import make_lab_pki
from tests.unit.test_agent_api import entries as entries_of

DCS = {"dus": "127.0.0.1", "fra": "127.0.0.2"}
HOSTS = {"www": ["www.example.com"], "shop": ["shop.example.com"]}
CONTROL = "127.0.0.3"
TIMEOUT = 5.0


@dataclass
class Net:
    tmp: Path
    pki: Path
    zones_ca: Path
    port: int
    agents: dict[str, Agent]

    def argv(self, operator: str = "carol") -> list[str]:
        return ["--pki", str(self.pki), "--operator", operator, "--port", str(self.port),
                "--store", str(self.tmp / "store"), "--audit", str(self.tmp / "audit.jsonl"),
                "--network", str(self.tmp / "v1.yaml")]

    def write(self, name: str, zones: list[str], deny: list[str]) -> Path:
        (self.tmp / f"{name}-deny.txt").write_text("".join(f"{p}\n" for p in deny))
        doc = {"regions": ["eu"],
               "dcs": {dc: {"region": "eu", "backbone": a, "public": [f"203.0.113.{i + 1}"]}
                       for i, (dc, a) in enumerate(DCS.items())},
               "zones": [{"name": z, "hostnames": HOSTS[z]} for z in zones],
               "deny": {"files": [f"{name}-deny.txt"]}}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path


def start_agent(tmp: Path, dc: str, port: int, control: bool = False) -> Agent:
    d = tmp / dc
    api = {"listen": DCS[dc], "port": port,
           "cert": str(tmp / "pki" / "agents" / f"{dc}.crt"),
           "key": str(tmp / "pki" / "agents" / f"{dc}.key"), "ca": str(tmp / "pki" / "ca.crt"),
           "audit": str(d / "audit.jsonl")}
    if control:
        api["control"] = {"address": CONTROL, "port": port + 1}
    (d / "api.yaml").write_text(yaml.safe_dump(api))
    a = Agent([], str(d / "serve.yaml"), api_path=str(d / "api.yaml"))
    a.load_stored_network()
    a.pull_network()
    a.start_front()
    a.keep_pulled()
    a.start_api()
    return a


def stop_agent(a: Agent) -> None:
    if a.api:
        a.api.stop()
    if a.front:
        a.front.stop()


@pytest.fixture()
def net(tmp_path: Path) -> Iterator[Net]:
    pki_dir = tmp_path / "pki"
    pki.run(pki_dir, pki.plan({dc: [ipaddress.ip_address(a)] for dc, a in DCS.items()},
                              [ipaddress.ip_address(CONTROL)],
                              {"alice": "viewer", "bob": "operator", "carol": "admin"}))
    zones_ca = make_lab_pki(tmp_path / "zones", HOSTS)
    for dc, address in DCS.items():
        (tmp_path / dc).mkdir()
        (tmp_path / dc / "serve.yaml").write_text(yaml.safe_dump({
            "dc": dc, "region": "eu", "listen": [address], "port": 0,
            "certs": str(zones_ca.parent), "status_socket": str(tmp_path / dc / "l7.sock"),
            "zones": [{"name": "www", "hostnames": HOSTS["www"]}]}))
    with socket.socket() as s:      # a port free on every loopback address, for both APIs
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = Net(tmp_path, pki_dir, zones_ca, port, {})
    try:
        for dc in DCS:
            n.agents[dc] = start_agent(tmp_path, dc, port)
        yield n
    finally:
        for a in n.agents.values():
            stop_agent(a)


def handshake(a: Agent, ca: Path, host: str) -> bool:
    """Does the agent's front end complete a TLS handshake for `host`?"""
    ctx = ssl.create_default_context(cafile=str(ca))
    address, port = a.front.addresses[0]
    try:
        with socket.create_connection((address, port), TIMEOUT) as raw, \
                ctx.wrap_socket(raw, server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def call(server, net: Path, party: str, method: str, path: str, body: dict | None = None,
         ca: Path | None = None) -> tuple[int, dict]:
    """One request to an agent's API at its own address, as `party`."""
    address, port = server.address
    name = f"{next(dc for dc, a in DCS.items() if a == address)}.dc.privedge.internal"
    ctx = ssl.create_default_context(cafile=str(ca or net / "ca.crt"))
    ctx.load_cert_chain(net / f"{party}.crt", net / f"{party}.key")
    conn = http.client.HTTPSConnection(name, port, timeout=TIMEOUT, context=ctx)
    conn.sock = ctx.wrap_socket(socket.create_connection((address, port), TIMEOUT),
                                server_hostname=name)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data)
    r = conn.getresponse()
    answer = json.loads(r.read())
    conn.close()
    return r.status, answer


def generation_of(n: Net, dc: str) -> int:
    status, answer = call(n.agents[dc].api, n.pki, "operators/alice", "GET", "/v1/generation")
    assert status == 200 and answer["dc"] == dc
    return answer["generation"]


def test_apply_reaches_every_dc_and_changes_what_they_serve(net: Net, capsys) -> None:
    v1 = net.write("v1", ["www"], ["192.0.2.0/24"])
    assert main([*net.argv(), "apply", str(v1)]) == 0
    out = capsys.readouterr()
    assert "new DC: everything" in out.err
    assert [line.split()[0] for line in out.out.splitlines()
            if line.endswith("generation 1") and " ok " in line] == ["dus", "fra"]
    assert all(generation_of(net, dc) == 1 for dc in DCS)
    assert not handshake(net.agents["dus"], net.zones_ca, "shop.example.com")

    v2 = net.write("v2", ["www", "shop"], ["192.0.2.0/24", "198.51.100.0/24"])
    assert main([*net.argv(), "apply", str(v2)]) == 0
    err = capsys.readouterr().err
    assert "deny +1 -0 prefixes; zones added: shop" in err
    for dc, a in net.agents.items():
        assert generation_of(net, dc) == 2
        assert handshake(a, net.zones_ca, "shop.example.com"), dc
        assert handshake(a, net.zones_ca, "www.example.com"), dc
    store = GenerationStore(net.tmp / "store")
    assert store.numbers() == [1, 2] and store.current_number() == 2
    entries = entries_of(net.tmp / "audit.jsonl")
    assert [(e["action"], e["diff"]["generation"]) for e in entries] == [("apply", 1),
                                                                       ("apply", 2)]
    assert all(entries[-1]["results"][dc]["generation"] == 2 for dc in DCS)
    assert entries[-1]["diff"]["diff"] == dict.fromkeys(
        DCS, "deny +1 -0 prefixes; zones added: shop; keys added: shop")
    assert audit.verify(net.tmp / "audit.jsonl").ok
    # The agents audited it too, by number and hash, not by its lists.
    applies = [e for e in entries_of(net.tmp / "dus" / "audit.jsonl")
               if e["action"] == "apply generation"]
    assert [e["diff"]["number"] for e in applies] == [1, 2]
    assert set(applies[-1]["diff"]) == {"number", "sha256"}


def test_an_invalid_file_is_sent_nowhere_and_changes_nothing(net: Net, capsys) -> None:
    assert main([*net.argv(), "apply", str(net.write("v1", ["www"], ["192.0.2.0/24"]))]) == 0
    bad = net.write("v2", ["www", "shop"], ["192.0.2.0/24", "198.51.100.300/32"])
    assert main([*net.argv(), "apply", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "198.51.100.300" in err and "nothing was sent" in err
    assert GenerationStore(net.tmp / "store").numbers() == [1]
    for dc, a in net.agents.items():
        assert generation_of(net, dc) == 1
        assert not handshake(a, net.zones_ca, "shop.example.com")


def test_a_dc_that_is_down_is_named_and_reconcile_brings_it_level(net: Net, capsys) -> None:
    assert main([*net.argv(), "apply", str(net.write("v1", ["www"], []))]) == 0
    net.agents["fra"].api.stop()
    net.agents["fra"].api = None
    v2 = net.write("v2", ["www", "shop"], ["192.0.2.0/24"])
    assert main([*net.argv(), "apply", str(v2)]) == 1
    out = capsys.readouterr().out
    assert "fra" in out and "FAILED" in out and "no answer" in out
    assert generation_of(net, "dus") == 2             # the others stay applied
    net.agents["fra"].start_api()
    assert generation_of(net, "fra") == 1
    assert main([*net.argv(), "reconcile", "--dry-run"]) == 0
    assert generation_of(net, "fra") == 1             # a dry run changes nothing
    assert main([*net.argv(), "reconcile"]) == 0
    err = capsys.readouterr().err
    assert "dus: at generation 2" in err and "fra: at generation 1; wants 2" in err
    assert generation_of(net, "fra") == 2
    assert handshake(net.agents["fra"], net.zones_ca, "shop.example.com")
    assert main([*net.argv(), "reconcile"]) == 0      # nothing left to do
    assert "fra: at generation 2" in capsys.readouterr().err


def test_only_an_admin_applies_and_a_dry_run_changes_nothing(net: Net) -> None:
    payload, _ = pack(net.write("v1", ["www", "shop"], []), 1)
    a = net.agents["dus"]
    for who, status in (("operators/alice", 403), ("operators/bob", 403), ("agents/fra", 403)):
        assert call(a.api, net.pki, who, "POST", "/v1/generation", payload,
                    ca=net.pki / "ca.crt")[0] == status
    status, answer = call(a.api, net.pki, "operators/carol", "POST",
                          "/v1/generation?dry_run=1", payload, ca=net.pki / "ca.crt")
    assert status == 200 and answer["dry_run"] and answer["front"] == "new zones"
    assert generation_of(net, "dus") == 0 and not handshake(a, net.zones_ca, "shop.example.com")
    log = [(e["who"], e["action"], e["results"]["dus"]["status"], e["diff"].get("dry_run"))
           for e in entries_of(net.tmp / "dus" / "audit.jsonl")]
    assert log == [("alice", "apply generation", 403, None), ("bob", "apply generation", 403, None),
                   ("fra.dc.privedge.internal", "apply generation", 403, None),
                   ("carol", "apply generation", 200, True),     # audited, marked a dry run
                   ("alice", "read generation", 200, None)]


def test_stale_conflicting_and_damaged_generations_are_refused(net: Net) -> None:
    a = net.agents["dus"]
    v1, _ = pack(net.write("v1", ["www"], []), 5)
    ca = net.pki / "ca.crt"
    assert call(a.api, net.pki, "operators/carol", "POST", "/v1/generation", v1, ca=ca)[0] == 200
    again = call(a.api, net.pki, "operators/carol", "POST", "/v1/generation", v1, ca=ca)
    assert again[0] == 200 and again[1]["changed"] is False        # idempotent
    other, _ = pack(net.write("v2", ["www", "shop"], []), 5)
    status, answer = call(a.api, net.pki, "operators/carol", "POST", "/v1/generation", other,
                          ca=ca)
    assert status == 409 and "other content" in answer["error"]
    old, _ = pack(net.write("v3", ["www", "shop"], []), 4)
    status, answer = call(a.api, net.pki, "operators/carol", "POST", "/v1/generation", old,
                          ca=ca)
    assert status == 409 and "stale" in answer["error"]
    damaged, _ = pack(net.write("v4", ["www", "shop"], []), 6)
    damaged["files"]["lists/deny-0.txt"] = "0.0.0.0/0\n"
    status, answer = call(a.api, net.pki, "operators/carol", "POST", "/v1/generation", damaged,
                          ca=ca)
    assert status == 422 and "sha256" in answer["error"]
    assert generation_of(net, "dus") == 5


def test_a_generation_for_another_network_is_refused_whole(net: Net) -> None:
    doc = yaml.safe_load(net.write("v1", ["www", "shop"], []).read_text())
    doc["dcs"]["dus"]["region"] = "us"
    doc["regions"] = ["eu", "us"]
    (net.tmp / "other.yaml").write_text(yaml.safe_dump(doc))
    payload, _ = pack(net.tmp / "other.yaml", 1)
    status, answer = call(net.agents["dus"].api, net.pki, "operators/carol", "POST",
                          "/v1/generation", payload, ca=net.pki / "ca.crt")
    assert status == 422 and "puts dus in region us" in answer["error"]
    assert generation_of(net, "dus") == 0


def test_a_restarted_agent_starts_with_its_stored_generation(net: Net) -> None:
    assert main([*net.argv(), "apply", str(net.write("v1", ["www", "shop"], []))]) == 0
    stop_agent(net.agents["dus"])
    net.agents["dus"] = a = start_agent(net.tmp, "dus", net.port)
    assert generation_of(net, "dus") == 1
    assert handshake(a, net.zones_ca, "shop.example.com")   # not serve.yaml's www alone


def test_an_agent_pulls_the_current_generation_at_start(net: Net) -> None:
    assert main([*net.argv(), "apply", str(net.write("v1", ["www"], []))]) == 0
    stop_agent(net.agents["fra"])
    del net.agents["fra"]
    assert main([*net.argv(), "apply", str(net.write("v2", ["www", "shop"], []))]) == 1
    server = GenerationServer(GenerationStore(net.tmp / "store"), CONTROL, net.port + 1,
                              TlsFiles(net.pki / "core" / "core.crt",
                                       net.pki / "core" / "core.key",
                                       net.pki / "ca.crt")).start()
    try:
        net.agents["fra"] = a = start_agent(net.tmp, "fra", net.port, control=True)
    finally:
        server.stop()
    assert generation_of(net, "fra") == 2
    assert handshake(a, net.zones_ca, "shop.example.com")
    [pulled] = [e for e in entries_of(net.tmp / "fra" / "audit.jsonl")
                if e["action"] == "pull generation"]
    assert pulled["diff"]["number"] == 2
    assert pulled["who"] == "control plane core.privedge.internal"
    assert pulled["certificate"] == audit.fingerprint((net.pki / "core" / "core.crt").read_text())


def test_status_finds_the_dcs_in_the_last_generation_and_names_one_behind(net: Net,
                                                                          capsys) -> None:
    """Without --network, the network as last applied says where the DCs are."""
    assert main([*net.argv(), "apply", str(net.write("v1", ["www"], []))]) == 0
    net.agents["fra"].api.stop()
    net.agents["fra"].api = None
    assert main([*net.argv(), "apply", str(net.write("v2", ["www", "shop"], []))]) == 1
    net.agents["fra"].start_api()
    capsys.readouterr()
    argv = net.argv()
    i = argv.index("--network")
    assert main([*argv[:i], *argv[i + 2:], "status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dus: region eu; network generation 2; no link")
    assert out[1].startswith("fra: region eu; network generation 1 (behind: the network is "
                             "at 2); no link")


def test_new_zones_are_adopted_without_cutting_a_connection(net: Net) -> None:
    """A generation that changes zones reaches the running front end: the
    listener stays, an open kept-alive connection goes on being answered
    (421 once its zone is gone), and the counters go on."""
    a = net.agents["dus"]
    assert main([*net.argv(), "apply", str(net.write("v1", ["www"], []))]) == 0
    address, port = a.front.addresses[0]
    ctx = ssl.create_default_context(cafile=str(net.zones_ca))
    conn = http.client.HTTPSConnection("www.example.com", port, timeout=TIMEOUT, context=ctx)
    conn.sock = ctx.wrap_socket(socket.create_connection((address, port), TIMEOUT),
                                server_hostname="www.example.com")
    sock = conn.sock

    def trace() -> int:
        conn.request("GET", TRACE_PATH)
        r = conn.getresponse()
        r.read()
        return r.status

    assert trace() == 200
    assert main([*net.argv(), "apply", str(net.write("v2", ["www", "shop"], []))]) == 0
    assert a.front.addresses[0] == (address, port)
    assert trace() == 200 and conn.sock is sock          # the same connection
    assert handshake(a, net.zones_ca, "shop.example.com")
    assert main([*net.argv(), "apply", str(net.write("v3", ["shop"], []))]) == 0
    assert trace() == 421 and conn.sock is sock
    assert not handshake(a, net.zones_ca, "www.example.com")
    conn.close()
    counts = a.front.counters.snapshot()
    assert counts["requests"]["www"] == 2 and counts["requests"]["shop"] == 0


def test_a_zone_whose_origin_settings_do_not_load_is_refused_everywhere(net: Net,
                                                                        capsys) -> None:
    """An origin CA file missing on the agents: each refuses the generation
    whole (422, nothing changed) and the store's current stays."""
    assert main([*net.argv(), "apply", str(net.write("v1", ["www"], []))]) == 0
    path = net.write("v2", ["www", "shop"], [])
    doc = yaml.safe_load(path.read_text())
    doc["zones"][1]["origin"] = {"url": "https://203.0.113.80",
                                 "ca_file": str(net.tmp / "no-such-ca.crt")}
    path.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert main([*net.argv(), "apply", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.count("FAILED") == 2 and "nothing changed" in out and "shop" in out, out
    assert "refused by every DC" in err
    assert GenerationStore(net.tmp / "store").current_number() == 1
    assert all(generation_of(net, dc) == 1 for dc in DCS)
    assert not handshake(net.agents["dus"], net.zones_ca, "shop.example.com")
