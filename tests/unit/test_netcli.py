"""privedge-net against two real agent APIs (agent/api.py) on loopback: the
same verb to every DC in parallel, each DC's result by name, a DC that is
down reported while the others stay done, dry runs that change nothing, and
the control plane's audit chain (control/audit.py)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.api import AgentApi, ApiServer
from agent.l7.config import parse_serve_config
from agent.l7.server import run_in_thread
from agent.metrics.server import TlsFiles
from control import audit, pki
from control.netcli import main
from lab.certs import make_lab_pki

DCS = {"dus": "127.0.0.1", "fra": "127.0.0.2"}


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[tuple[dict[str, ApiServer], list[str]]]:
    net = tmp_path / "pki"
    pki.run(net, pki.plan({dc: [ipaddress.ip_address(a)] for dc, a in DCS.items()}, [],
                          {"alice": "viewer", "bob": "operator"}))
    zones = make_lab_pki(tmp_path / "zones", {"www": ["www.example.com"]}).parent
    front = run_in_thread(parse_serve_config({
        "dc": "dus", "region": "eu", "listen": ["127.0.0.1"], "port": 0, "certs": str(zones),
        "status_socket": str(tmp_path / "l7.sock"),
        "zones": [{"name": "www", "hostnames": ["www.example.com"]}]}))
    servers: dict[str, ApiServer] = {}
    port = 0
    for dc, address in DCS.items():
        tls = TlsFiles(net / "agents" / f"{dc}.crt", net / "agents" / f"{dc}.key",
                       net / "ca.crt")
        api = AgentApi(dc, "eu", {}, str(tmp_path / "l7.sock"),
                       audit.AuditLog(tmp_path / f"{dc}-audit.jsonl"))
        servers[dc] = ApiServer(api, address, port, tls).start()
        port = servers[dc].address[1]          # the same port on each address
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "network.yaml")
                         .read_text())
    doc["dcs"] = {dc: {"region": "eu", "backbone": a, "public": [f"203.0.113.{i + 1}"]}
                  for i, (dc, a) in enumerate(DCS.items())}
    doc["zones"] = doc["zones"][:1]
    (tmp_path / "network.yaml").write_text(yaml.safe_dump(doc))
    argv = ["--network", str(tmp_path / "network.yaml"), "--pki", str(net), "--port", str(port),
            "--audit", str(tmp_path / "audit.jsonl")]
    try:
        yield servers, argv
    finally:
        for s in servers.values():
            s.stop()
        front.stop()


def test_status_of_every_dc(fleet, capsys) -> None:
    _, argv = fleet
    assert main([*argv, "--operator", "alice", "status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["dus", "fra"]
    assert all("region eu; network generation 0; no link; front end answered 0 requests"
               in line for line in out)


def test_a_purge_reaches_every_dc_and_is_audited_once_with_each_result(fleet, tmp_path: Path,
                                                                      capsys) -> None:
    _, argv = fleet
    assert main([*argv, "--operator", "bob", "--json", "purge", "www"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {dc: (r["ok"], r["purged"]) for dc, r in results.items()} == {
        "dus": (True, 0), "fra": (True, 0)}
    [entry] = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert entry["who"] == "bob" and entry["action"] == "purge"
    assert set(entry["results"]) == {"dus", "fra"} and all(
        r["ok"] for r in entry["results"].values())
    assert audit.verify(tmp_path / "audit.jsonl").ok


def test_a_dc_that_is_down_is_named_and_the_others_stay_done(fleet, tmp_path: Path,
                                                            capsys) -> None:
    servers, argv = fleet
    servers["fra"].stop()
    assert main([*argv, "--operator", "bob", "purge", "www"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dus") and " ok " in out[0]
    assert out[1].startswith("fra") and "FAILED" in out[1] and "no answer from 127.0.0.2" in out[1]
    [entry] = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert entry["results"]["dus"]["ok"] and not entry["results"]["fra"]["ok"]


def test_dry_runs_and_refusals(fleet, tmp_path: Path, capsys) -> None:
    _, argv = fleet
    assert main([*argv, "--operator", "bob", "purge", "www", "--dry-run"]) == 0
    assert main([*argv, "--operator", "bob", "purge", "shop", "--dry-run"]) == 1
    assert "zone 'shop' is not served here" in capsys.readouterr().out
    assert not (tmp_path / "audit.jsonl").exists()        # dry runs change nothing
    assert main([*argv, "--operator", "alice", "purge", "www"]) == 1   # a viewer
    assert "needs the role operator" in capsys.readouterr().out
    assert main([*argv, "--operator", "bob", "deny", "add", "192.0.2.0/24"]) == 1
    assert "this agent protects no link" in capsys.readouterr().out
    assert main([*argv, "--operator", "bob", "allow", "add", "192.0.2.1/32", "--dry-run"]) == 1
    assert "this agent protects no link" in capsys.readouterr().out
