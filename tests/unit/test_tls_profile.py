"""The TLS front end against Mozilla's "intermediate" profile, judged by sslyze.

The server runs as its own process (`python -m agent.l7.server`), as the
agent does, so OpenSSL starts with the agent's settings (agent/__init__.py,
agent/l7/openssl.cnf): Python's own defaults would offer X448 and
secp521r1, which the profile leaves out. Loopback only, no root.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab.certs import make_lab_pki

ROOT = Path(__file__).resolve().parents[2]
HOST = "www.example.com"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    d = tmp_path_factory.mktemp("tls")
    ca = make_lab_pki(d / "pki", {"www": [HOST]})
    cfg = d / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"dc": "dus", "region": "eu", "listen": ["127.0.0.1"],
                                   "port": 0, "certs": str(ca.parent),
                                   "zones": [{"name": "www", "hostnames": [HOST]}]}))
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    proc = subprocess.Popen([sys.executable, "-m", "agent.l7.server", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "the server did not start"
            m = re.search(r"\[listen\] \[127\.0\.0\.1\]:(\d+)", line)
            port = int(m.group(1)) if m else None
        yield port, ca
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _sslyze(port: int, ca: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslyze", *args, "--certinfo_ca_file",
                           str(ca), f"{HOST}:{port}{{127.0.0.1}}"],
                          capture_output=True, text=True, timeout=300)


def test_mozilla_intermediate_compliant(server) -> None:
    port, ca = server
    r = _sslyze(port, ca, "--mozilla_config=intermediate")
    assert r.returncode == 0 and "OK - Compliant" in r.stdout, r.stdout[-3000:] + r.stderr


def test_only_the_profiles_curves_and_both_certificate_kinds(server) -> None:
    port, ca = server
    r = _sslyze(port, ca, "--elliptic_curves", "--certinfo")
    curves = re.search(r"Supported curves:\s+(.*)", r.stdout)
    assert curves, r.stdout[-3000:]
    assert set(curves.group(1).replace(",", " ").split()) == {"X25519", "secp256r1",
                                                              "secp384r1"}
    # One certificate deployment per key kind: RSA 2048 and ECDSA P-256.
    kinds = re.findall(r"Public Key Algorithm:\s+(\w+)", r.stdout)
    assert sorted(kinds) == ["ECPublicKey", "RSAPublicKey"], r.stdout[-3000:]


def test_alpn_http11_and_tls13(server) -> None:
    port, ca = server
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_sock, \
            ctx.wrap_socket(raw_sock, server_hostname=HOST) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
        assert tls.version() == "TLSv1.3"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sessions_resume_from_the_servers_cache(server, version) -> None:
    """A second connection resumes the first one's session (no full
    handshake), from the server's own cache: no ticket keys to share."""
    import socket

    port, ca = server
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ctx.maximum_version = version
    session, reused = None, []
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw_sock:
            tls = ctx.wrap_socket(raw_sock, server_hostname=HOST, session=session)
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                        .encode())
            while tls.recv(65536):
                pass  # to the server's close_notify: a clean end keeps the session
            reused.append(tls.session_reused)
            session = tls.session
            tls.close()
    assert reused == [False, True]
