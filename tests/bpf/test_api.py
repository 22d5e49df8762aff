"""agent/api.py's deny verbs on a real node: an operator denies a prefix over
mTLS and the program drops it (BPF_PROG_TEST_RUN); a prefix one link refuses
changes nothing; every change is in the audit chain."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from agent.api import AgentApi, ApiServer
from agent.libbpf import XdpAction
from agent.metrics.server import TlsFiles
from control import audit, pki
from tests.bpf.cases import v4
from tests.unit.test_agent_api import call

XDP_DROP, XDP_PASS = XdpAction.DROP, XdpAction.PASS


@pytest.fixture()
def served(edge, tmp_path: Path):
    net = tmp_path / "netpki"
    pki.run(net, pki.plan({"dus": [ipaddress.ip_address("127.0.0.1")]}, [],
                          {"bob": "operator", "alice": "viewer"}))
    edge.apply(edge.base_rules())
    log = tmp_path / "audit.jsonl"
    server = ApiServer(AgentApi("dus", "eu", {"tr0": edge.node}, None, audit.AuditLog(log)),
                       "127.0.0.1", 0, TlsFiles(net / "agents" / "dus.crt",
                                                net / "agents" / "dus.key", net / "ca.crt")
                       ).start()
    yield server, net, log
    server.stop()
    edge.apply(edge.base_rules())     # the shared node as the next test expects it


def test_an_operator_denies_and_undenies_a_prefix_on_the_link(edge, served) -> None:
    server, net, log = served
    src = "192.0.2.77"
    assert edge.run(v4(src)).verdict == XDP_PASS
    status, _ = call(server, net, "operators/bob", "POST", "/v1/deny",
                     {"prefixes": ["192.0.2.0/24"], "expires": 3600})
    assert status == 200 and edge.run(v4(src)).verdict == XDP_DROP
    status, _ = call(server, net, "operators/bob", "DELETE", "/v1/deny",
                     {"prefixes": ["192.0.2.0/24"]})
    assert status == 200 and edge.run(v4(src)).verdict == XDP_PASS
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["who"], e["action"], e["results"]["dus"]["ok"]) for e in entries] == [
        ("bob", "deny add", True), ("bob", "deny remove", True)]
    assert entries[0]["diff"] == {"prefixes": ["192.0.2.0/24"], "expires": 3600}
    assert audit.verify(log).ok


def test_a_bad_prefix_or_a_viewer_changes_nothing(edge, served) -> None:
    server, net, log = served
    status, answer = call(server, net, "operators/bob", "POST", "/v1/deny",
                          {"prefixes": ["192.0.2.0/24", "192.0.2.300/32"]})
    assert status == 400 and "192.0.2.300" in answer["error"]
    assert edge.run(v4("192.0.2.77")).verdict == XDP_PASS
    assert call(server, net, "operators/alice", "POST", "/v1/deny",
                {"prefixes": ["192.0.2.0/24"]})[0] == 403
    assert edge.run(v4("192.0.2.77")).verdict == XDP_PASS
    status, answer = call(server, net, "operators/alice", "GET", "/v1/status")
    assert status == 200 and answer["links"]["tr0"]["deny"]["adhoc"] == 0
    assert audit.verify(log).ok


def test_an_allowed_prefix_wins_over_a_deny_and_its_removal_restores_the_drop(edge,
                                                                              served) -> None:
    server, net, log = served
    src = "192.0.2.77"
    assert call(server, net, "operators/bob", "POST", "/v1/deny",
                {"prefixes": ["192.0.2.0/24"]})[0] == 200
    assert edge.run(v4(src)).verdict == XDP_DROP
    assert call(server, net, "operators/bob", "POST", "/v1/allow?dry_run=1",
                {"prefixes": ["192.0.2.77/32"]})[0] == 200
    assert edge.run(v4(src)).verdict == XDP_DROP          # a dry run changes nothing
    assert call(server, net, "operators/bob", "POST", "/v1/allow",
                {"prefixes": ["192.0.2.77/32"]})[0] == 200
    assert edge.run(v4(src)).verdict == XDP_PASS
    assert edge.run(v4("192.0.2.78")).verdict == XDP_DROP  # only the allowed /32
    status, answer = call(server, net, "operators/bob", "DELETE", "/v1/allow",
                          {"prefixes": ["198.51.100.0/24"]})
    assert status == 400 and "not on the allowlist" in answer["error"]
    assert call(server, net, "operators/bob", "DELETE", "/v1/allow",
                {"prefixes": ["192.0.2.77/32"]})[0] == 200
    assert edge.run(v4(src)).verdict == XDP_DROP
    actions = [(e["action"], "dry_run" in e["diff"])
               for e in map(json.loads, log.read_text().splitlines())]
    assert actions == [("deny add", False), ("allow add", True), ("allow add", False),
                       ("allow remove", False), ("allow remove", False)]
    assert audit.verify(log).ok
