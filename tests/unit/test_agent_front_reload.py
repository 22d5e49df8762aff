"""SIGHUP for the TLS front end: a bad new config never leaves a DC without one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from agent.daemon import Agent
from agent.l7.status import read_status
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
