"""agent/metrics: the label allowlist, the L7 collector, /metrics over mTLS
with the network's own certificates (control/pki.py)."""

from __future__ import annotations

import ipaddress
import re
import select
import socket
import ssl
import time
from pathlib import Path

import pytest
from prometheus_client import Counter, generate_latest
from prometheus_client.core import CounterMetricFamily

from agent.l7.counters import Counters, Refusal, RequestError, RuleAction
from agent.metrics.l7 import L7Collector
from agent.metrics.registry import AllowlistRegistry, MetricsError
from agent.metrics.rtt import RttCollector, RttProber
from agent.metrics.server import MetricsServer, TlsFiles
from control import pki
from control.tlshttp import TlsHttpServer

TIMEOUT = 5


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    local = [ipaddress.ip_address("127.0.0.1")]
    pki.run(d, pki.plan({"dus": local, "fra": local}, [], {"alice": "viewer"}))
    return d


def _busy_counters() -> Counters:
    c = Counters(["www", "shop-eu"])
    for _ in range(3):
        c.accepted()
        c.served("www")
    c.refused(Refusal.UNKNOWN_SNI)
    c.handshake("TLSv1.3")
    c.request_error(RequestError.TOO_LARGE)
    c.action("shop-eu", RuleAction.WAF_BLOCK)
    c.action("www", RuleAction.ORIGIN_TIMEOUT)
    c.response("www", 200, "HIT", 0.0003)
    c.response("www", 200, "HIT", 0.004)
    c.response("www", 504, "MISS", 5.5)
    c.response("shop-eu", 403, "", 0.002)
    return c


def test_a_metric_with_a_label_off_the_allowlist_is_refused() -> None:
    registry = AllowlistRegistry()
    registry.register(Counter("ok_total", "fine", ["zone"], registry=None))
    with pytest.raises(MetricsError, match="client_ip not on the allowlist"):
        registry.register(Counter("peers_total", "by client", ["client_ip"], registry=None))

    class Paths:
        def collect(self):
            family = CounterMetricFamily("hits", "by path", labels=["path"])
            family.add_metric(["/login"], 1)
            yield family

    with pytest.raises(MetricsError, match=r"metric hits: label\(s\) path"):
        registry.register(Paths())


def test_a_collector_that_changes_its_labels_fails_the_scrape() -> None:
    class Sneaky:
        calls = 0

        def collect(self):
            Sneaky.calls += 1
            name = "zone" if Sneaky.calls == 1 else "user_agent"
            family = CounterMetricFamily("sneaky", "changes", labels=[name])
            family.add_metric(["x"], 1)
            yield family

    registry = AllowlistRegistry()
    registry.register(Sneaky())
    with pytest.raises(MetricsError, match="user_agent"):
        generate_latest(registry)


def test_the_l7_collector_exports_the_counters_by_closed_labels() -> None:
    registry = AllowlistRegistry()
    counters = _busy_counters()
    registry.register(L7Collector(lambda: counters))
    text = generate_latest(registry).decode()
    assert "privedge_l7_connections_accepted_total 3.0" in text
    assert 'privedge_l7_requests_total{zone="www"} 3.0' in text
    assert 'privedge_l7_connections_refused_total{reason="unknown_sni"} 1.0' in text
    assert 'privedge_l7_tls_handshakes_total{tls_version="TLSv1.3"} 1.0' in text
    assert 'privedge_l7_request_errors_total{error="too_large"} 1.0' in text
    assert 'privedge_l7_rule_actions_total{action="waf_block",zone="shop-eu"} 1.0' in text
    assert 'privedge_l7_origin_errors_total{error="timeout",zone="www"} 1.0' in text
    assert 'privedge_l7_origin_errors_total{error="error",zone="www"} 0.0' in text


def test_responses_are_counted_by_status_class_and_cache_status_with_a_latency_histogram(
        ) -> None:
    registry = AllowlistRegistry()
    counters = _busy_counters()
    registry.register(L7Collector(lambda: counters))
    text = generate_latest(registry).decode()
    assert ('privedge_l7_responses_total{cache_status="hit",status_class="2xx",zone="www"} 2.0'
            in text)
    assert ('privedge_l7_responses_total{cache_status="miss",status_class="5xx",zone="www"} 1.0'
            in text)
    assert ('privedge_l7_responses_total{cache_status="none",status_class="4xx",'
            'zone="shop-eu"} 1.0' in text)
    # Buckets are cumulative: 0.3 ms falls under 0.5 ms, 4 ms under 5 ms,
    # 5.5 s only under 10 s.
    assert 'privedge_l7_response_seconds_bucket{le="0.0005",zone="www"} 1.0' in text
    assert 'privedge_l7_response_seconds_bucket{le="0.005",zone="www"} 2.0' in text
    assert 'privedge_l7_response_seconds_bucket{le="5.0",zone="www"} 2.0' in text
    assert 'privedge_l7_response_seconds_bucket{le="10.0",zone="www"} 3.0' in text
    assert 'privedge_l7_response_seconds_bucket{le="+Inf",zone="www"} 3.0' in text
    assert 'privedge_l7_response_seconds_count{zone="www"} 3.0' in text
    total = float(re.search(r'privedge_l7_response_seconds_sum\{zone="www"\} (\S+)',
                            text).group(1))
    assert total == pytest.approx(5.5043)


def test_a_response_of_an_unknown_zone_or_cache_status_is_a_bug() -> None:
    c = Counters(["www"])
    with pytest.raises(KeyError):
        c.response("elsewhere", 200, "", 0.1)
    with pytest.raises(KeyError):
        c.response("www", 200, "WARM", 0.1)


def _scrape(port: int, certs: Path, client: str | None) -> str:
    ctx = ssl.create_default_context(cafile=certs / "ca.crt")
    if client is not None:
        ctx.load_cert_chain(certs / f"{client}.crt", certs / f"{client}.key")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="dus.dc.privedge.internal") as tls:
        tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: dus\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


@pytest.fixture()
def served(certs: Path):
    registry = AllowlistRegistry()
    counters = _busy_counters()
    registry.register(L7Collector(lambda: counters))
    tls = TlsFiles(certs / "agents" / "dus.crt", certs / "agents" / "dus.key", certs / "ca.crt")
    server = MetricsServer(registry, "127.0.0.1", 0, tls).start()
    try:
        yield server
    finally:
        server.stop()


def test_prometheus_and_operators_scrape_over_mtls(served: MetricsServer, certs: Path) -> None:
    port = served.address[1]
    text = _scrape(port, certs, "prometheus")
    assert 'privedge_l7_requests_total{zone="www"} 3.0' in text
    assert "privedge_l7_requests_total" in _scrape(port, certs, "operators/alice")


def test_a_scrape_holds_no_address_and_no_path(served: MetricsServer, certs: Path) -> None:
    text = _scrape(served.address[1], certs, "prometheus")
    values = [v for line in text.splitlines() if not line.startswith("#")
              for v in re.findall(r'"([^"]*)"', line)]
    assert values, "no labelled sample to check"
    for value in values:
        assert "/" not in value, f"a path-like label value: {value!r}"
        with pytest.raises(ValueError):
            ipaddress.ip_address(value)
    assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", text), "an IPv4 address in the scrape"


def test_no_client_certificate_or_a_strangers_is_refused(served: MetricsServer, certs: Path,
                                                         tmp_path: Path) -> None:
    port = served.address[1]
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        _scrape(port, certs, None)
    stranger = tmp_path / "other"
    pki.run(stranger, pki.plan({}, [], {"mallory": "admin"}))
    ctx = ssl.create_default_context(cafile=certs / "ca.crt")
    ctx.load_cert_chain(stranger / "operators" / "mallory.crt",
                        stranger / "operators" / "mallory.key")
    with pytest.raises((ssl.SSLError, ConnectionError)), \
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="dus.dc.privedge.internal") as tls:
        tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: dus\r\n\r\n")
        tls.recv(1)
    # The server still serves after the refusals.
    assert "privedge_l7" in _scrape(port, certs, "prometheus")


def test_slow_clients_are_cut_at_the_head_deadline_and_connections_bounded(
        certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """control/tlshttp.py: a client that says nothing, or trickles its request
    head, holds a thread for head_timeout in all, not per read; at most
    max_connections are served at once."""
    monkeypatch.setattr(TlsHttpServer, "head_timeout", 0.4, raising=False)
    monkeypatch.setattr(TlsHttpServer, "max_connections", 1, raising=False)
    registry = AllowlistRegistry()
    counters = _busy_counters()
    registry.register(L7Collector(lambda: counters))
    tls = TlsFiles(certs / "agents" / "dus.crt", certs / "agents" / "dus.key", certs / "ca.crt")
    served = MetricsServer(registry, "127.0.0.1", 0, tls).start()
    try:
        _slow_clients(served, certs)
    finally:
        served.stop()


def _slow_clients(served: MetricsServer, certs: Path) -> None:
    port = served.address[1]
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as idle:
        with pytest.raises(OSError):   # the one connection is taken
            _scrape(port, certs, "prometheus")
        assert idle.recv(1) == b""     # cut at its handshake's deadline
    assert time.monotonic() - t0 < 2
    ctx = ssl.create_default_context(cafile=certs / "ca.crt")
    ctx.load_cert_chain(certs / "prometheus.crt", certs / "prometheus.key")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="dus.dc.privedge.internal") as tls:
        t0 = time.monotonic()
        tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: dus\r\nX-Slow: ")
        closed = False
        while not closed and time.monotonic() - t0 < TIMEOUT:
            try:
                tls.sendall(b"x")
                if select.select([tls], [], [], 0.05)[0]:
                    closed = tls.recv(100) == b""
            except OSError:
                closed = True
        assert closed and time.monotonic() - t0 < 2
    # Served again once the cut connection's thread has let its slot go.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            assert "privedge_l7" in _scrape(port, certs, "prometheus")
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert served._httpd.connections_refused >= 1 and served._httpd.handler_errors == 0


def test_reload_serves_a_reissued_certificate_without_a_restart(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    parties = pki.plan({"dus": [ipaddress.ip_address("127.0.0.1")]}, [], {})
    pki.run(d, parties)
    registry = AllowlistRegistry()
    counters = Counters(["www"])
    registry.register(L7Collector(lambda: counters))
    tls = TlsFiles(d / "agents" / "dus.crt", d / "agents" / "dus.key", d / "ca.crt")
    server = MetricsServer(registry, "127.0.0.1", 0, tls).start()
    try:
        def serial() -> int:
            ctx = ssl.create_default_context(cafile=d / "ca.crt")
            ctx.load_cert_chain(d / "prometheus.crt", d / "prometheus.key")
            with socket.create_connection(("127.0.0.1", server.address[1]), TIMEOUT) as raw, \
                    ctx.wrap_socket(raw, server_hostname="dus.dc.privedge.internal") as t:
                return int(t.getpeercert()["serialNumber"], 16)

        first = serial()
        pki.run(d, parties, rotate=True)
        assert serial() == first, "the new certificate was served before a reload"
        server.reload()
        assert serial() != first
        assert "privedge_l7" in _scrape(server.address[1], d, "prometheus")
    finally:
        server.stop()


def test_no_front_end_no_l7_metrics() -> None:
    registry = AllowlistRegistry()
    registry.register(L7Collector(lambda: None))
    assert "privedge_l7" not in generate_latest(registry).decode()


def test_a_bad_certificate_path_fails_at_construction(certs: Path, tmp_path: Path) -> None:
    tls = TlsFiles(tmp_path / "none.crt", certs / "agents" / "dus.key", certs / "ca.crt")
    with pytest.raises(OSError):
        MetricsServer(AllowlistRegistry(), "127.0.0.1", 0, tls)


def _agent_tls(certs: Path, dc: str) -> TlsFiles:
    return TlsFiles(certs / "agents" / f"{dc}.crt", certs / "agents" / f"{dc}.key",
                    certs / "ca.crt")


def test_rtt_probes_count_a_peer_only_when_its_certificate_names_it(certs: Path) -> None:
    fra = MetricsServer(AllowlistRegistry(), "127.0.0.1", 0, _agent_tls(certs, "fra")).start()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))   # bound, never listening: connections are refused
        try:
            port = fra.address[1]
            # "iad" is served by fra's certificate here: an impostor, a failure.
            prober = RttProber({"fra": "127.0.0.1", "iad": "127.0.0.1"}, port,
                               _agent_tls(certs, "dus"), timeout=TIMEOUT)
            for _ in range(3):
                prober.probe_all()
            gone = RttProber({"fra": "127.0.0.1"}, closed.getsockname()[1],
                             _agent_tls(certs, "dus"), timeout=TIMEOUT)
            gone.probe_all()
        finally:
            fra.stop()
    registry = AllowlistRegistry()
    registry.register(RttCollector(prober))
    text = generate_latest(registry).decode()
    assert 'privedge_dc_rtt_seconds_count{peer_dc="fra"} 3.0' in text
    assert 'privedge_dc_rtt_seconds_bucket{le="1.0",peer_dc="fra"} 3.0' in text
    assert 'privedge_dc_rtt_probe_failures_total{peer_dc="fra"} 0.0' in text
    assert 'privedge_dc_rtt_seconds_count{peer_dc="iad"} 0.0' in text
    assert 'privedge_dc_rtt_probe_failures_total{peer_dc="iad"} 3.0' in text
    assert gone.snapshot()["fra"]["failures"] == 1
