"""privedge-agent --metrics: the daemon serves its front end's counters over
mTLS with the network's certificates, and SIGHUP picks up reissued ones."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path

import pytest
import yaml

from agent.config import ConfigError
from agent.daemon import Agent
from agent.metrics.config import load_metrics_config
from control import pki
from lab.certs import make_lab_pki

HOSTS = {"www": ["www.example.com"]}
TIMEOUT = 5


def _get(port: int, ca: Path, cert: Path | None, key: Path | None, sni: str,
         path: str = "/metrics") -> tuple[bytes, int]:
    """(body, the server certificate's serial) of one GET over TLS."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        serial = int(tls.getpeercert()["serialNumber"], 16)
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2], serial


@pytest.fixture()
def agent(tmp_path: Path):
    zone_pki = make_lab_pki(tmp_path / "zones", HOSTS).parent
    serve = tmp_path / "serve.yaml"
    serve.write_text(yaml.safe_dump({
        "dc": "dus", "region": "eu", "listen": ["127.0.0.1"], "port": 0,
        "certs": str(zone_pki), "zones": [{"name": "www", "hostnames": HOSTS["www"]}]}))
    net = tmp_path / "pki"
    parties = pki.plan({"dus": [ipaddress.ip_address("127.0.0.1")]}, [], {})
    pki.run(net, parties)
    metrics = tmp_path / "metrics.yaml"
    metrics.write_text(yaml.safe_dump({
        "listen": "127.0.0.1", "port": 0, "cert": str(net / "agents" / "dus.crt"),
        "key": str(net / "agents" / "dus.key"), "ca": str(net / "ca.crt")}))
    a = Agent([], str(serve), str(metrics))
    a.start_front()
    a.start_metrics()
    yield a, zone_pki, net, parties
    a.metrics.stop()
    if a.front:
        a.front.stop()


def _scrape(a: Agent, net: Path) -> tuple[str, int]:
    body, serial = _get(a.metrics.address[1], net / "ca.crt", net / "prometheus.crt",
                        net / "prometheus.key", "dus.dc.privedge.internal")
    return body.decode(), serial


def test_the_front_ends_requests_reach_the_scrape(agent) -> None:
    a, zone_pki, net, _ = agent
    before, _ = _scrape(a, net)
    assert 'privedge_l7_requests_total{zone="www"} 0.0' in before
    _get(a.front.addresses[0][1], zone_pki / "ca.crt", None, None, "www.example.com",
         "/cdn-cgi/trace")
    after, _ = _scrape(a, net)
    assert 'privedge_l7_requests_total{zone="www"} 1.0' in after
    assert 'privedge_l7_tls_handshakes_total{tls_version="TLSv1.3"} 1.0' in after
    # The trace is the edge's own answer: no cache stage.
    assert ('privedge_l7_responses_total{cache_status="none",status_class="2xx",zone="www"} 1.0'
            in after)
    assert 'privedge_l7_response_seconds_count{zone="www"} 1.0' in after


def test_sighup_serves_reissued_certificates_and_follows_a_new_front_end(agent) -> None:
    a, _, net, parties = agent
    _, first = _scrape(a, net)
    pki.run(net, parties, rotate=True)
    a.reload_front()   # what SIGHUP does, in its order
    a.reload_certificates()
    text, second = _scrape(a, net)
    assert second != first
    assert 'privedge_l7_requests_total{zone="www"}' in text


def test_unloadable_certificates_keep_the_old_ones(agent, capsys) -> None:
    a, _, net, _ = agent
    (net / "agents" / "dus.key").write_text("not a key\n")
    a.reload_certificates()
    assert "metrics certificates refused, the old ones stay" in capsys.readouterr().out
    assert "privedge_l7" in _scrape(a, net)[0]


@pytest.mark.parametrize(("doc", "why"), [
    ({"listen": "dus", "cert": "a", "key": "b", "ca": "c"}, "listen"),
    ({"listen": "127.0.0.1", "port": 70000, "cert": "a", "key": "b", "ca": "c"}, "port"),
    ({"listen": "127.0.0.1", "cert": "a", "key": "b"}, "ca"),
    ({"listen": "127.0.0.1", "cert": "a", "key": "b", "ca": "c",
      "rtt": {"peers": {"fra": "fra.example"}}}, r"rtt\.peers: 'fra\.example'"),
    ({"listen": "127.0.0.1", "cert": "a", "key": "b", "ca": "c", "rtt": {"peers": {}}},
     r"rtt\.peers"),
])
def test_a_bad_metrics_config_names_the_field(tmp_path: Path, doc: dict, why: str) -> None:
    path = tmp_path / "metrics.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=why):
        load_metrics_config(path)
