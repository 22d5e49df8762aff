"""control/pki.py: the network's CA and the certificates of every mTLS party,
issued from the lab topology, used in real TLS handshakes."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control import pki

OPERATORS = {"alice": "admin", "bob": "viewer"}
TOPOLOGY = Path(__file__).resolve().parents[2] / "lab" / "topology.yaml"


@pytest.fixture()
def issued(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    done = pki.run(d, pki.plan_from_topology(TOPOLOGY, OPERATORS))
    assert {p.path for p, why in done} == {"agents/dus", "agents/fra", "agents/iad",
                                            "core/core", "prometheus", "operators/alice",
                                            "operators/bob", "zones/www", "zones/shop-eu"}
    assert all(why == "missing" for _, why in done)
    return d


def _cert(d: Path, stem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((d / f"{stem}.crt").read_bytes())


def _uses(cert: x509.Certificate) -> set[str]:
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    return {{ExtendedKeyUsageOID.SERVER_AUTH: "server",
             ExtendedKeyUsageOID.CLIENT_AUTH: "client"}[u] for u in eku}


def test_every_party_gets_its_names_uses_and_role(issued: Path) -> None:
    dus = _cert(issued, "agents/dus")
    san = dus.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dus.dc.privedge.internal"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("203.0.113.1", "2001:db8:113::1", "198.18.0.1")}
    assert _uses(dus) == {"server", "client"}
    core = _cert(issued, "core/core")
    assert ipaddress.ip_address("198.18.0.10") in core.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert _uses(core) == {"server", "client"}
    assert _uses(_cert(issued, "prometheus")) == {"client"}
    alice = _cert(issued, "operators/alice")
    assert _uses(alice) == {"client"}
    assert alice.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value \
        == "admin"
    ca = _cert(issued, "ca")
    for stem in ("agents/dus", "core/core", "prometheus", "operators/bob"):
        _cert(issued, stem).verify_directly_issued_by(ca)


def test_keys_are_0600_and_certificates_0644(issued: Path) -> None:
    keys = sorted(issued.rglob("*.key"))
    assert len(keys) == 10  # the CA and nine parties
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for crt in issued.rglob("*.crt"):
        assert stat.S_IMODE(crt.stat().st_mode) == 0o644, crt
    assert not list(issued.rglob(".*.tmp")), "a temporary file was left behind"


def _serve_once(server_ctx: ssl.SSLContext) -> tuple[int, list, threading.Thread]:
    """A TLS server on loopback for one connection: (port, [peer cert or error],
    its thread)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list = []

    def accept() -> None:
        with listener:
            conn, _ = listener.accept()
            conn.settimeout(5)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.append(tls.getpeercert())
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as e:
                seen.append(e)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener.getsockname()[1], seen, thread


def _mtls(issued: Path, server: str, client: str | None, ca: Path | None = None
          ) -> tuple[bool, list]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(issued / f"{server}.crt", issued / f"{server}.key")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(issued / "ca.crt")
    port, seen, thread = _serve_once(server_ctx)
    client_ctx = ssl.create_default_context(cafile=ca or issued / "ca.crt")
    if client is not None:
        client_ctx.load_cert_chain(issued / f"{client}.crt", issued / f"{client}.key")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="dus.dc.privedge.internal") as tls:
            ok = tls.recv(2) == b"ok"
    except (ssl.SSLError, OSError):
        ok = False
    thread.join(10)
    return ok, seen


def test_an_operator_and_prometheus_reach_an_agent_over_mtls(issued: Path) -> None:
    ok, seen = _mtls(issued, "agents/dus", "operators/alice")
    assert ok
    subject = dict(x[0] for x in seen[0]["subject"])
    assert (subject["commonName"], subject["organizationalUnitName"]) == ("alice", "admin")
    assert _mtls(issued, "agents/dus", "prometheus")[0]
    assert _mtls(issued, "agents/dus", "agents/fra")[0]  # agent to agent (RTT probes)


def test_no_certificate_or_another_cas_is_refused(issued: Path, tmp_path: Path) -> None:
    assert not _mtls(issued, "agents/dus", None)[0]
    stranger = tmp_path / "other"
    pki.run(stranger, pki.plan({"dus": []}, [], {"mallory": "admin"}))
    (issued / "operators" / "mallory.crt").write_bytes(
        (stranger / "operators" / "mallory.crt").read_bytes())
    (issued / "operators" / "mallory.key").write_bytes(
        (stranger / "operators" / "mallory.key").read_bytes())
    ok, seen = _mtls(issued, "agents/dus", "operators/mallory")
    assert not ok and isinstance(seen[0], ssl.SSLError)


def test_a_second_run_issues_nothing_and_rotate_reissues_all_with_the_same_ca(
        issued: Path) -> None:
    parties = pki.plan_from_topology(TOPOLOGY, OPERATORS)
    before = {p.path: _cert(issued, p.path).serial_number for p in parties}
    ca_before = (issued / "ca.crt").read_bytes()
    assert pki.run(issued, parties) == []
    key_before = (issued / "agents" / "dus.key").read_bytes()
    done = pki.run(issued, parties, rotate=True)
    assert [why for _, why in done] == ["rotate"] * len(parties)
    assert all(_cert(issued, p.path).serial_number != before[p.path] for p in parties)
    assert (issued / "agents" / "dus.key").read_bytes() != key_before
    assert (issued / "ca.crt").read_bytes() == ca_before
    assert _mtls(issued, "agents/dus", "operators/alice")[0]


def test_a_certificate_near_its_end_is_reissued(issued: Path) -> None:
    ca, ca_key = pki.load_or_make_ca(issued)
    cert, key = pki.issue(ca, ca_key, "prometheus.core.privedge.internal", server=False,
                          client=True, days=10)
    pki.write_pair(issued / "prometheus", cert, key)
    parties = pki.plan({"dus": []}, [], {})
    due = pki.run(issued, [p for p in parties if p.path == "prometheus"], dry_run=True)
    assert [why for _, why in due] == ["expires soon"]
    assert _cert(issued, "prometheus").serial_number == cert.serial_number  # dry run


@pytest.mark.parametrize(("spec", "why"), [
    ("alice", "expected NAME=ROLE"),
    ("Alice=admin", "expected NAME=ROLE"),
    ("eve=root", "role 'root' is not one of viewer, operator, admin"),
])
def test_bad_operator_specs_are_named(spec: str, why: str) -> None:
    with pytest.raises(pki.PkiError, match=why):
        pki.operator_roles([spec])


def test_an_operator_named_twice_is_refused() -> None:
    with pytest.raises(pki.PkiError, match="named twice"):
        pki.operator_roles(["bob=viewer", "bob=admin"])


def test_half_a_ca_is_refused_not_replaced(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.load_or_make_ca(d)
    (d / "ca.key").unlink()
    crt = (d / "ca.crt").read_bytes()
    with pytest.raises(pki.PkiError, match=r"one of ca\.crt and ca\.key is missing"):
        pki.run(d, pki.plan({"dus": []}, [], {}))
    assert (d / "ca.crt").read_bytes() == crt


def test_the_cli_issues_shows_and_refuses(tmp_path: Path, capsys) -> None:
    d = tmp_path / "pki"
    assert pki.main([str(d), "--operator", "carol=operator", "--dry-run"]) == 0
    assert "would issue operators/carol (missing)" in capsys.readouterr().out
    assert not d.exists(), "a dry run wrote something"
    assert pki.main([str(d), "--operator", "carol=operator"]) == 0
    assert "issued agents/iad (missing)" in capsys.readouterr().out
    assert pki.main([str(d), "--show"]) == 0
    assert "CN=carol,OU=operator,O=privedge [client] role=operator" in capsys.readouterr().out
    assert pki.main([str(d), "--topology", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml" in capsys.readouterr().err


def test_every_topology_zone_gets_a_reader_certificate(issued: Path) -> None:
    for zone in ("www", "shop-eu"):
        cert = _cert(issued, f"zones/{zone}")
        assert _uses(cert) == {"client"}
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value \
            == "zone"
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value \
            == f"{zone}.zone.privedge.internal"
        cert.verify_directly_issued_by(_cert(issued, "ca"))
    ok, seen = _mtls(issued, "agents/dus", "zones/www")
    assert ok
    assert dict(x[0] for x in seen[0]["subject"])["organizationalUnitName"] == "zone"


def test_zone_readers_by_name_and_bad_names_refused(tmp_path: Path, capsys) -> None:
    parties = pki.plan({"dus": []}, [], {}, ["b-zone", "a", "b-zone"])
    zones = [p for p in parties if p.path.startswith("zones/")]
    assert [(p.path, p.common_name, p.role, p.client, p.server) for p in zones] == [
        ("zones/a", "a.zone.privedge.internal", "zone", True, False),
        ("zones/b-zone", "b-zone.zone.privedge.internal", "zone", True, False)]
    with pytest.raises(pki.PkiError, match=r"'Bad\.Zone': a zone name is"):
        pki.plan({"dus": []}, [], {}, ["Bad.Zone"])
    d = tmp_path / "pki"
    assert pki.main([str(d), "--zone", "extra"]) == 0
    out = capsys.readouterr().out
    assert "issued zones/extra (missing)" in out and "issued zones/www (missing)" in out
    assert pki.main([str(d), "--show"]) == 0
    assert "CN=extra.zone.privedge.internal,OU=zone,O=privedge [client] role=zone" in \
        capsys.readouterr().out
    assert pki.main([str(d), "--zone", "no/slash"]) == 1
    assert "a zone name is" in capsys.readouterr().err
