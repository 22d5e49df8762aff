"""SIGHUP for the TLS front end: a bad new config never leaves a DC without one."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest
import yaml

from agent.daemon import Agent
from agent.l7.status import read_status
from agent.logs.config import load_logs_config
from control import pki
from lab.certs import make_lab_pki

HOSTS = {"www": ["www.example.com"]}


@pytest.fixture()
def agent(tmp_path: Path):
    pki = make_lab_pki(tmp_path / "pki", HOSTS).parent
    link = tmp_path / "inet0.yaml"
    link.write_text("interface: inet0\n")
    serve = tmp_path / "serve.yaml"
    cfg = {"dc": "dus", "region": "eu", "listen": ["127.0.0.1"], "port": 0,
           "certs": str(pki), "status_socket": str(tmp_path / "l7.sock"),
           "zones": [{"name": "www", "hostnames": HOSTS["www"]}]}
    serve.write_text(yaml.safe_dump(cfg))
    a = Agent([str(link)], str(serve))
    a.start_front()
    yield a, serve, cfg, pki
    if a.front:
        a.front.stop()


def _serving(a: Agent) -> bool:
    return read_status(str(a.serve_cfg.status_socket))["dc"] == "dus"


def test_unloadable_certificate_keeps_the_old_front_end(agent, capsys) -> None:
    a, serve, cfg, pki = agent
    old = a.front
    broken = pki.parent / "broken"
    shutil.copytree(pki, broken)
    (broken / "www.key").write_text("not a key\n")
    serve.write_text(yaml.safe_dump({**cfg, "certs": str(broken)}))
    a.reload_front()
    assert "front end config refused, still serving the old one" in capsys.readouterr().out
    assert a.front is old and _serving(a)


def test_a_new_config_that_cannot_bind_falls_back_to_the_old(agent, capsys) -> None:
    a, serve, cfg, _ = agent
    # 192.0.2.55 is no address of this machine: the listener cannot bind.
    serve.write_text(yaml.safe_dump({**cfg, "listen": ["192.0.2.55"]}))
    a.reload_front()
    assert "serving the old config again" in capsys.readouterr().out
    assert a.front is not None and a.serve_cfg.listen == ("127.0.0.1",) and _serving(a)


def test_a_zone_made_regional_by_a_reload_may_not_keep_logging_to_the_global_core(
        agent, tmp_path: Path, capsys) -> None:
    """logs.yaml sends www's logs to the global core; a serve.yaml that now
    restricts www to the EU is refused (its logs would leave the region)."""
    a, serve, cfg, _ = agent
    net = tmp_path / "netpki"
    pki.run(net, pki.plan({"dus": [ipaddress.ip_address("127.0.0.1")]}, [], {}))
    logs = tmp_path / "logs.yaml"
    logs.write_text(yaml.safe_dump({
        "dc": "dus", "cert": str(net / "agents" / "dus.crt"),
        "key": str(net / "agents" / "dus.key"), "ca": str(net / "ca.crt"),
        "cores": {"global": {"url": "https://127.0.0.1:9"},
                  "core-eu": {"url": "https://127.0.0.1:10", "regions": ["eu"]}},
        "default_core": "global", "zones": {"www": {}}}))
    a.logs_cfg = load_logs_config(logs)
    a.start_logs()
    try:
        old = a.front
        regional = {**cfg["zones"][0], "region": "eu", "addresses": ["198.51.100.65"]}
        serve.write_text(yaml.safe_dump({**cfg, "zones": [regional]}))
        a.reload_front()
        out = capsys.readouterr().out
        assert "front end config refused, still serving the old one" in out
        assert "zone www" in out or "www" in out.split("refused", 1)[1]
        assert a.front is old and _serving(a) and a.serve_cfg.zone("www").region is None
    finally:
        a.logs.stop(1.0)
