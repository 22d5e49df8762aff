"""agent/api.py over real mTLS: roles from the certificate, every change
audited in a hash chain (control/audit.py). The deny verbs on a real XDP
node are in tests/bpf/test_api.py."""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import AgentApi, ApiServer
from agent.l7.config import parse_serve_config
from agent.metrics.server import TlsFiles
from control import audit, pki
from lab.certs import make_lab_pki

TIMEOUT = 5.0
DC = "dus.dc.privedge.internal"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("netpki")
    pki.run(d, pki.plan({"dus": [ipaddress.ip_address("127.0.0.1")]}, [],
                        {"alice": "viewer", "bob": "operator", "carol": "admin"}))
    return d


@pytest.fixture()
def api(tmp_path: Path, net: Path) -> Iterator[tuple[ApiServer, Path]]:
    from agent.l7.server import run_in_thread

    zones = make_lab_pki(tmp_path / "zones", {"www": ["www.example.com"]}).parent
    front = run_in_thread(parse_serve_config({
        "dc": "dus", "region": "eu", "listen": ["127.0.0.1"], "port": 0, "certs": str(zones),
        "status_socket": str(tmp_path / "l7.sock"),
        "zones": [{"name": "www", "hostnames": ["www.example.com"]}]}))
    log = tmp_path / "audit.jsonl"
    server = ApiServer(AgentApi("dus", "eu", {}, str(tmp_path / "l7.sock"),
                                audit.AuditLog(log)),
                       "127.0.0.1", 0, TlsFiles(net / "agents" / "dus.crt",
                                                net / "agents" / "dus.key", net / "ca.crt")
                       ).start()
    try:
        yield server, log
    finally:
        server.stop()
        front.stop()


def call(server: ApiServer, net: Path, party: str | None, method: str, path: str,
         body: dict | None = None, ca: Path | None = None) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(ca or net / "ca.crt"))
    if party is not None:
        ctx.load_cert_chain(net / f"{party}.crt", net / f"{party}.key")
    conn = http.client.HTTPSConnection(DC, server.address[1], timeout=TIMEOUT, context=ctx)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.address[1]),
                                                         TIMEOUT), server_hostname=DC)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data,
                 headers={"Content-Type": "application/json"} if data else {})
    r = conn.getresponse()
    answer = json.loads(r.read())
    conn.close()
    return r.status, answer


def entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_viewer_reads_status_and_the_read_is_audited(api, net: Path) -> None:
    server, log = api
    status, answer = call(server, net, "operators/alice", "GET", "/v1/status")
    assert status == 200 and answer["dc"] == "dus" and answer["front"]["dc"] == "dus"
    assert answer["links"] == {}
    assert [(e["who"], e["action"], e["results"]["dus"]["status"]) for e in entries(log)] == [
        ("alice", "read status", 200)]


def test_roles_decide_and_every_change_is_audited(api, net: Path) -> None:
    server, log = api
    assert call(server, net, "operators/alice", "POST", "/v1/purge", {"zone": "www"}) == (
        403, {"error": "purge needs the role operator or higher; this certificate's is viewer"})
    assert call(server, net, "operators/bob", "POST", "/v1/purge", {"zone": "www"}) == (
        200, {"purged": 0})
    assert call(server, net, "operators/carol", "POST", "/v1/purge",
                {"zone": "shop"})[0] == 400
    status, _ = call(server, net, "agents/dus", "POST", "/v1/purge", {"zone": "www"})
    assert status == 403       # an agent's certificate carries no operator role
    got = entries(log)
    assert [(e["who"], e["action"], e["results"]["dus"]["status"]) for e in got] == [
        ("alice", "purge", 403), ("bob", "purge", 200), ("carol", "purge", 400),
        (DC, "purge", 403)]
    assert got[1]["diff"] == {"zone": "www"}
    assert audit.verify(log).ok


def test_deny_on_an_agent_without_links_and_bad_bodies_are_refused(api, net: Path) -> None:
    server, _ = api
    assert call(server, net, "operators/bob", "POST", "/v1/deny",
                {"prefixes": ["192.0.2.0/24"]})[0] == 409
    assert call(server, net, "operators/bob", "POST", "/v1/deny", {"prefixes": "x"})[0] == 400
    assert call(server, net, "operators/bob", "GET", "/v1/nothing")[0] == 404


def test_no_certificate_or_another_cas_is_refused_at_the_handshake(api, net: Path,
                                                                  tmp_path: Path) -> None:
    server, log = api
    with pytest.raises((ssl.SSLError, ConnectionError)):
        call(server, net, None, "GET", "/v1/status")
    other = tmp_path / "other"
    pki.run(other, pki.plan({"dus": []}, [], {"mallory": "admin"}))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _with_foreign_cert(server, net, other)
    assert entries(log) == []


def _with_foreign_cert(server: ApiServer, net: Path, other: Path) -> None:
    ctx = ssl.create_default_context(cafile=str(net / "ca.crt"))
    ctx.load_cert_chain(other / "operators" / "mallory.crt", other / "operators" / "mallory.key")
    with socket.create_connection(("127.0.0.1", server.address[1]), TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname=DC) as tls:
        tls.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        if not tls.recv(1024):
            raise ConnectionError("closed")


def test_privedge_agent_run_api_serves_it(tmp_path: Path, net: Path) -> None:
    """The daemon's --api file: the API of its front end, audited where it says."""
    import yaml

    from agent.daemon import Agent

    zones = make_lab_pki(tmp_path / "zones", {"www": ["www.example.com"]}).parent
    serve = tmp_path / "serve.yaml"
    serve.write_text(yaml.safe_dump({
        "dc": "dus", "region": "eu", "listen": ["127.0.0.1"], "port": 0, "certs": str(zones),
        "status_socket": str(tmp_path / "l7.sock"),
        "zones": [{"name": "www", "hostnames": ["www.example.com"]}]}))
    api_yaml = tmp_path / "api.yaml"
    api_yaml.write_text(yaml.safe_dump({
        "listen": "127.0.0.1", "port": 0, "cert": str(net / "agents" / "dus.crt"),
        "key": str(net / "agents" / "dus.key"), "ca": str(net / "ca.crt"),
        "audit": str(tmp_path / "audit" / "api.jsonl")}))
    a = Agent([], str(serve), None, None, str(api_yaml))
    a.start_front()
    a.start_api()
    try:
        status, answer = call(a.api, net, "operators/alice", "GET", "/v1/status")
        assert status == 200 and answer["region"] == "eu"
        assert call(a.api, net, "operators/bob", "POST", "/v1/purge", {"zone": "www"})[0] == 200
        assert audit.verify(tmp_path / "audit" / "api.jsonl").entries == 2   # read, purge
    finally:
        a.api.stop()
        a.front.stop()


def test_a_change_that_cannot_be_audited_says_so(api, net: Path) -> None:
    server, log = api
    assert call(server, net, "operators/bob", "POST", "/v1/purge", {"zone": "www"})[0] == 200
    with open(log, "ab") as f:
        f.write(b'{"seq": 2, "torn')          # a crash mid-write
    status, answer = call(server, net, "operators/bob", "POST", "/v1/purge", {"zone": "www"})
    assert status == 500 and answer["error"].startswith("not audited")
    assert "the change was made" in answer["error"] and answer["result"] == {"purged": 0}
    status, answer = call(server, net, "operators/alice", "GET", "/v1/status")
    assert status == 500 and answer["error"].endswith("nothing was changed")
