"""The L7 front end on 127.0.0.1/::1: TLS per zone, the regional guard, counters.

No root. Each server runs in its own thread (run_in_thread, as the daemon
uses it) on free ports; every socket operation has a timeout, so a bug shows
as a failure, never as a hung test run.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import yaml

from agent.l7.config import parse_serve_config
from agent.l7.server import ServeError, ServerThread, main, run_in_thread
from agent.l7.status import read_status
from lab.certs import make_lab_pki

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 5.0
HEAD_MAX = 16 * 1024  # the default http.head_bytes
HOSTS = {"shop-eu": ["shop.example.eu"], "www": ["www.example.com"],
         "shop-us": ["shop.example.us"]}


@pytest.fixture(scope="module", autouse=True)
def _ipv6_loopback() -> None:
    """The server listens on ::1 too; a machine without it fails here, by name."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.fail(f"these tests need an IPv6 loopback (::1): {e}", pytrace=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA and certificates for every zone; returns ca.crt."""
    return make_lab_pki(tmp_path_factory.mktemp("pki"), HOSTS)


def _config(tmp_path: Path, pki: Path, **patch: object) -> dict:
    listen = ["127.0.0.1", "::1"]
    return {
        "dc": "dus", "region": "eu", "listen": listen, "port": 0,
        "certs": str(pki.parent), "status_socket": str(tmp_path / "run" / "l7.sock"),
        "unknown_sni": "refuse",
        "zones": [
            {"name": "shop-eu", "hostnames": HOSTS["shop-eu"], "region": "eu",
             "addresses": ["198.51.100.65", "2001:db8:100::65"]},
            {"name": "www", "hostnames": HOSTS["www"],
             "addresses": ["198.51.100.10", "2001:db8:100::10"]},
            {"name": "shop-us", "hostnames": HOSTS["shop-us"], "region": "us",
             "addresses": ["198.51.100.66"]},
        ],
        **patch,
    }


@contextlib.contextmanager
def serving(tmp_path: Path, pki: Path, **patch: object) -> Iterator[ServerThread]:
    handle = run_in_thread(parse_serve_config(_config(tmp_path, pki, **patch)))
    try:
        yield handle
    finally:
        assert handle.stop(TIMEOUT), "server thread did not stop"


def _port(handle: ServerThread, address: str) -> int:
    return next(p for a, p in handle.addresses if a == address)


def _client_context(ca: Path, *, check_hostname: bool = True,
                    version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = check_hostname
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def tls_request(address: str, port: int, ctx: ssl.SSLContext, sni: str | None,
                request: bytes | None = None, host: str | None = None,
                ) -> tuple[dict, int, dict[str, str], bytes]:
    """Handshake, send one request, read to EOF: (peer cert, status, headers, body)."""
    if request is None:
        request = (f"GET /some/path?q=1 HTTP/1.1\r\nHost: {host or sni}\r\n"
                   "Connection: close\r\n\r\n").encode()
    with socket.create_connection((address, port), timeout=TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls:
        cert = tls.getpeercert()
        tls.sendall(request)
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return cert, int(lines[0].split(" ")[1]), headers, body


def handshake_fails(address: str, port: int, ctx: ssl.SSLContext, sni: str | None) -> bool:
    """True if the TLS handshake fails (a refusal may reset even the connect)."""
    try:
        with socket.create_connection((address, port), timeout=TIMEOUT) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni):
            return False
    except (ssl.SSLError, ConnectionError):
        return True


def received_before_close(address: str, port: int) -> bytes:
    """Connect and send the first byte of a TLS record (the listener defers
    a connection until its client speaks); what the server sends before closing."""
    data = b""
    with contextlib.suppress(ConnectionResetError), \
            socket.create_connection((address, port), timeout=TIMEOUT) as raw:
        raw.sendall(b"\x16")
        while chunk := raw.recv(1024):
            data += chunk
    return data


def eventually(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Counters are updated by the server thread; give it a moment."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _sans(cert: dict) -> list[str]:
    return [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]


# ------------------------------------------------------------------ serving zones


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_each_zone_gets_its_certificate_and_answer(tmp_path, pki, address) -> None:
    with serving(tmp_path, pki) as h:
        for zone in ("shop-eu", "www"):
            host = HOSTS[zone][0]
            cert, status, headers, body = tls_request(address, _port(h, address),
                                                      _client_context(pki), host)
            assert _sans(cert) == [host]
            assert status == 200
            doc = json.loads(body)
            assert (doc["dc"], doc["region"], doc["zone"]) == ("dus", "eu", zone)
            assert len(doc["request_id"]) == 32
            assert headers["X-Privedge-DC"] == "dus" and headers["X-Privedge-Zone"] == zone
            assert headers["Connection"] == "close"
            assert headers["Content-Type"] == "application/json"
        snap = h.counters.snapshot()
        assert snap["requests"] == {"shop-eu": 1, "www": 1, "shop-us": 0}
        assert snap["handshakes"]["TLSv1.3"] == 2
        assert snap["connections_accepted"] == 2
        assert sum(snap["refused"].values()) == 0


def test_request_ids_differ(tmp_path, pki) -> None:
    with serving(tmp_path, pki) as h:
        port = _port(h, "127.0.0.1")
        ids = {json.loads(tls_request("127.0.0.1", port, _client_context(pki),
                                      "www.example.com")[3])["request_id"] for _ in range(3)}
        assert len(ids) == 3


def test_tls12_is_accepted_and_counted(tmp_path, pki) -> None:
    with serving(tmp_path, pki) as h:
        ctx = _client_context(pki, version=ssl.TLSVersion.TLSv1_2)
        _, status, _, _ = tls_request("127.0.0.1", _port(h, "127.0.0.1"), ctx,
                                      "www.example.com")
        assert status == 200
        assert h.counters.snapshot()["handshakes"]["TLSv1.2"] == 1


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls11_is_refused(tmp_path, pki) -> None:
    with serving(tmp_path, pki) as h:
        ctx = _client_context(pki)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with contextlib.suppress(ssl.SSLError):
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        assert handshake_fails("127.0.0.1", _port(h, "127.0.0.1"), ctx, "www.example.com")
        eventually(lambda: h.counters.snapshot()["refused"]["handshake_error"] == 1)
        assert h.counters.snapshot()["requests"]["www"] == 0


# ------------------------------------------------------------------ the regional guard


def test_out_of_region_sni_is_refused_in_the_handshake(tmp_path, pki) -> None:
    with serving(tmp_path, pki, region="us") as h:
        port = _port(h, "127.0.0.1")
        assert handshake_fails("127.0.0.1", port, _client_context(pki), "shop.example.eu")
        eventually(lambda: h.counters.snapshot()["refused"]["region_sni"] == 1)
        # The global zone and the us zone are served by the same DC.
        for zone in ("www", "shop-us"):
            _, status, headers, _ = tls_request("127.0.0.1", port, _client_context(pki),
                                                HOSTS[zone][0])
            assert (status, headers["X-Privedge-Zone"]) == (200, zone)
        snap = h.counters.snapshot()
        assert snap["requests"] == {"shop-eu": 0, "www": 1, "shop-us": 1}
        assert snap["refused"]["handshake_error"] == 0


def test_out_of_region_zone_needs_no_key_here(tmp_path, pki) -> None:
    """A us DC never loads shop-eu's key, so its files need not exist."""
    certs = tmp_path / "certs"
    make_lab_pki(certs, {"www": HOSTS["www"], "shop-us": HOSTS["shop-us"]})
    cfg = parse_serve_config(_config(tmp_path, pki, region="us", certs=str(certs)))
    h = run_in_thread(cfg)
    try:
        assert h.server.guard.servable == ("www", "shop-us")
    finally:
        assert h.stop(TIMEOUT)
    with pytest.raises(ServeError, match=r"zone shop-eu: .*shop-eu.crt and shop-eu.key missing"):
        run_in_thread(parse_serve_config(_config(tmp_path, pki, certs=str(certs))))


def _regional_on_127_0_0_2(tmp_path: Path, pki: Path, region: str) -> dict:
    """shop-eu's dedicated IP is 127.0.0.2: local on Linux loopback (127/8)."""
    cfg = _config(tmp_path, pki, region=region, listen=["127.0.0.1", "127.0.0.2"])
    cfg["zones"][0]["addresses"] = ["127.0.0.2"]
    return cfg


def test_out_of_region_address_is_closed_before_tls(tmp_path, pki) -> None:
    cfg = _regional_on_127_0_0_2(tmp_path, pki, "us")
    h = run_in_thread(parse_serve_config(cfg))
    try:
        port = _port(h, "127.0.0.2")
        assert received_before_close("127.0.0.2", port) == b"", \
            "the server sent bytes to a refused connection"
        eventually(lambda: h.counters.snapshot()["refused"]["region_address"] == 1)
        # Even a SNI the DC may serve is not read on that address.
        assert handshake_fails("127.0.0.2", port, _client_context(pki), "www.example.com")
        eventually(lambda: h.counters.snapshot()["refused"]["region_address"] == 2)
        snap = h.counters.snapshot()
        assert snap["handshakes"] == {"TLSv1.2": 0, "TLSv1.3": 0, "other": 0}
        assert snap["connections_accepted"] == 2
        # Other local addresses still serve the global zone.
        _, status, _, _ = tls_request("127.0.0.1", _port(h, "127.0.0.1"),
                                      _client_context(pki), "www.example.com")
        assert status == 200
    finally:
        assert h.stop(TIMEOUT)


def test_in_region_address_is_served(tmp_path, pki) -> None:
    cfg = _regional_on_127_0_0_2(tmp_path, pki, "eu")
    h = run_in_thread(parse_serve_config(cfg))
    try:
        _, status, headers, body = tls_request("127.0.0.2", _port(h, "127.0.0.2"),
                                               _client_context(pki), "shop.example.eu")
        assert (status, headers["X-Privedge-Zone"], json.loads(body)["zone"]) == \
            (200, "shop-eu", "shop-eu")
        assert h.counters.snapshot()["refused"]["region_address"] == 0
    finally:
        assert h.stop(TIMEOUT)


def test_host_of_another_zone_is_misdirected(tmp_path, pki) -> None:
    """SNI www, Host shop.example.eu: the request is not answered as shop-eu."""
    with serving(tmp_path, pki, region="us") as h:
        _, status, headers, _ = tls_request("127.0.0.1", _port(h, "127.0.0.1"),
                                            _client_context(pki), "www.example.com",
                                            host="shop.example.eu")
        assert status == 421 and "X-Privedge-Zone" not in headers
        snap = h.counters.snapshot()
        assert snap["refused"]["misdirected"] == 1
        assert snap["requests"] == {"shop-eu": 0, "www": 0, "shop-us": 0}


# ------------------------------------------------------------------ unknown SNI


def test_unknown_and_missing_sni_are_refused(tmp_path, pki) -> None:
    with serving(tmp_path, pki) as h:
        port = _port(h, "127.0.0.1")
        assert handshake_fails("127.0.0.1", port, _client_context(pki), "nope.example.com")
        assert handshake_fails("127.0.0.1", port, _client_context(pki, check_hostname=False),
                               None)
        eventually(lambda: h.counters.snapshot()["refused"]["unknown_sni"] == 2)
        assert h.counters.snapshot()["refused"]["handshake_error"] == 0


def test_unknown_sni_served_by_the_default_zone(tmp_path, pki) -> None:
    with serving(tmp_path, pki, unknown_sni="www") as h:
        port = _port(h, "127.0.0.1")
        ctx = _client_context(pki, check_hostname=False)
        cert, status, headers, _ = tls_request("127.0.0.1", port, ctx, None,
                                               host="198.51.100.10")
        assert _sans(cert) == ["www.example.com"]
        assert (status, headers["X-Privedge-Zone"]) == (200, "www")
        cert, status, _, _ = tls_request("127.0.0.1", port, ctx, "other.example.org")
        assert _sans(cert) == ["www.example.com"] and status == 200
        assert h.counters.snapshot()["requests"]["www"] == 2


def test_foreign_regional_default_zone_is_still_refused(tmp_path, pki) -> None:
    with serving(tmp_path, pki, region="us", unknown_sni="shop-eu") as h:
        ctx = _client_context(pki, check_hostname=False)
        assert handshake_fails("127.0.0.1", _port(h, "127.0.0.1"), ctx, None)
        eventually(lambda: h.counters.snapshot()["refused"]["region_sni"] == 1)


# ------------------------------------------------------------------ bad clients


def test_garbage_instead_of_tls_is_a_handshake_error(tmp_path, pki) -> None:
    with serving(tmp_path, pki) as h:
        with socket.create_connection(("127.0.0.1", _port(h, "127.0.0.1")),
                                      timeout=TIMEOUT) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                while raw.recv(1024):
                    pass
        eventually(lambda: h.counters.snapshot()["refused"]["handshake_error"] == 1)


@pytest.mark.parametrize(("request_bytes", "status", "error"), [
    (b"GET / HTTP/1.1\r\n\r\n", 400, "malformed"),
    (b"GET / HTTP/1.1\r\nHost : www.example.com\r\n\r\n", 400, "malformed"),
    (b"GET / HTTP/1.1\r\nHost: www.example.com\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431,
     "too_large"),
    (b"GET / HTTP/1.1\r\nHost: www.example.com\r\nX: " + b"a" * HEAD_MAX + b"\r\n\r\n",
     431, "too_large"),
])
def test_bad_request_heads_are_answered_and_counted(tmp_path, pki, request_bytes, status,
                                                    error) -> None:
    with serving(tmp_path, pki) as h:
        _, got, headers, _ = tls_request("127.0.0.1", _port(h, "127.0.0.1"),
                                         _client_context(pki), "www.example.com",
                                         request=request_bytes)
        assert got == status and headers["Connection"] == "close"
        snap = h.counters.snapshot()
        assert snap["request_errors"][error] == 1
        assert snap["requests"]["www"] == 0


def test_a_head_that_never_ends_times_out(tmp_path, pki) -> None:
    with serving(tmp_path, pki, http={"head_timeout": 0.3}) as h:
        _, status, _, _ = tls_request("127.0.0.1", _port(h, "127.0.0.1"),
                                      _client_context(pki), "www.example.com",
                                      request=b"GET / HTTP/1.1\r\n")
        assert status == 408
        assert h.counters.snapshot()["request_errors"]["timeout"] == 1


def test_a_client_that_sends_nothing_times_out(tmp_path, pki) -> None:
    with serving(tmp_path, pki, idle_timeout=0.3) as h:
        _, status, _, _ = tls_request("127.0.0.1", _port(h, "127.0.0.1"),
                                      _client_context(pki), "www.example.com", request=b"")
        assert status == 408


def test_head_requests_get_no_body(tmp_path, pki) -> None:
    with serving(tmp_path, pki) as h:
        _, status, headers, body = tls_request(
            "127.0.0.1", _port(h, "127.0.0.1"), _client_context(pki), "www.example.com",
            request=b"HEAD / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


# ------------------------------------------------------------------ request heads (pure)




# ------------------------------------------------------------------ status socket, lifecycle


def test_status_socket_answers_counters_and_is_private(tmp_path, pki) -> None:
    sock_path = tmp_path / "run" / "l7.sock"
    with serving(tmp_path, pki) as h:
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        tls_request("127.0.0.1", _port(h, "127.0.0.1"), _client_context(pki),
                    "shop.example.eu")
        status = read_status(sock_path, timeout=TIMEOUT)
        assert (status["dc"], status["region"]) == ("dus", "eu")
        assert status["requests"] == {"shop-eu": 1, "www": 0, "shop-us": 0}
        assert status["connections_accepted"] == 1
        assert status["handshakes"]["TLSv1.3"] == 1
        assert status["refused"]["region_sni"] == 0
    assert not sock_path.exists(), "status socket left behind after stop"


def test_stale_status_socket_is_replaced(tmp_path, pki) -> None:
    sock_path = tmp_path / "run" / "l7.sock"
    sock_path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock_path))  # bound, never listening: like a crashed server's
    with serving(tmp_path, pki):
        assert read_status(sock_path, timeout=TIMEOUT)["dc"] == "dus"


def test_startup_problems_are_reported_and_leave_nothing(tmp_path, pki) -> None:
    with serving(tmp_path, pki) as h:
        busy = _port(h, "127.0.0.1")
        cfg = parse_serve_config(_config(tmp_path / "second", pki, listen=["127.0.0.1"],
                                         port=busy))
        with pytest.raises(ServeError, match=rf"cannot listen on \[127.0.0.1\]:{busy}"):
            run_in_thread(cfg)
        assert not (tmp_path / "second" / "run" / "l7.sock").exists()
        # The first server's status socket is live: a second one must not take it.
        cfg = parse_serve_config(_config(tmp_path, pki, listen=["127.0.0.1"]))
        with pytest.raises(ServeError, match="another server answers there"):
            run_in_thread(cfg)
        assert read_status(tmp_path / "run" / "l7.sock", timeout=TIMEOUT)["dc"] == "dus"


def test_readable_key_is_refused(tmp_path) -> None:
    certs = tmp_path / "certs"
    ca = make_lab_pki(certs, {"www": HOSTS["www"]})
    os.chmod(certs / "www.key", 0o644)
    cfg = _config(tmp_path, ca, zones=[{"name": "www", "hostnames": HOSTS["www"]}])
    with pytest.raises(ServeError, match=r"www.key: mode 0644 lets others read"):
        run_in_thread(parse_serve_config(cfg))


def test_lab_pki_modes_and_ca_reuse(tmp_path) -> None:
    ca = make_lab_pki(tmp_path, {"www": HOSTS["www"]})
    assert ca == tmp_path / "ca.crt"
    for name in ("ca.key", "www.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    before = ca.read_bytes()
    make_lab_pki(tmp_path, {"shop-eu": HOSTS["shop-eu"]})
    assert ca.read_bytes() == before and (tmp_path / "shop-eu.crt").is_file()


def test_check_mode_starts_nothing(tmp_path, pki, capsys) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(yaml.safe_dump(_config(tmp_path, pki)))
    assert main(["--config", str(p), "--check"]) == 0
    assert "valid; nothing was started" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    p.write_text(yaml.safe_dump(_config(tmp_path, pki, unknown_sni="nope")))
    assert main(["--config", str(p), "--check"]) == 1


def _lines(stream: IO[str]) -> queue.Queue[str]:
    """Lines of `stream` from a reader thread, so each wait can be bounded."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put("")  # EOF

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_module_entry_serves_until_sigterm(tmp_path, pki) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(yaml.safe_dump(_config(tmp_path, pki, listen=["127.0.0.1"])))
    with subprocess.Popen([sys.executable, "-m", "agent.l7.server", "--config", str(p)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out = _lines(proc.stdout)
            seen: list[str] = []
            while not seen or "[listen]" not in seen[-1]:
                seen.append(out.get(timeout=20))
                assert seen[-1], f"server exited: {seen} {proc.stderr.read()}"
            port = int(seen[-1].split("]:")[1].split(";")[0])
            _, status, _, _ = tls_request("127.0.0.1", port, _client_context(pki),
                                          "www.example.com")
            assert status == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT * 2) == 0
            assert not (tmp_path / "run" / "l7.sock").exists()
            while seen[-1]:
                seen.append(out.get(timeout=TIMEOUT))
            assert any("[exit]" in line for line in seen)
            assert "/some/path" not in "".join(seen) + proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)

def test_a_closed_connection_leaves_nothing_for_the_garbage_collector(tmp_path, pki) -> None:
    """A connection's objects (protocol, parser, TLS state with its buffers)
    go when it closes, by reference counting: a cycle among them would keep
    them all, the 256 KiB TLS read buffer included, until a collection."""
    with serving(tmp_path, pki) as h:
        port = _port(h, "127.0.0.1")
        tls_request("127.0.0.1", port, _client_context(pki), "www.example.com")  # warm up
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(5):
                _, status, _, _ = tls_request("127.0.0.1", port, _client_context(pki),
                                              "www.example.com")
                assert status == 200
            eventually(lambda: not h.server._open)  # every connection has been lost
            gc.collect()
            kept = {type(o).__name__ for o in gc.garbage}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not kept & {"Http1Protocol", "HttpRequestParser", "SSLProtocol", "SSLObject"}, \
            f"cyclic garbage per connection: {sorted(kept)}"


def test_stop_ends_open_connections_promptly(tmp_path, pki) -> None:
    """A client stuck in the TLS handshake and one stuck after it do not hold
    stop() up. (One that never speaks is not even accepted: TCP_DEFER_ACCEPT.)"""
    h = run_in_thread(parse_serve_config(_config(tmp_path, pki)))
    port = _port(h, "127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as silent, \
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            _client_context(pki).wrap_socket(raw, server_hostname="www.example.com") as idle:
        silent.sendall(b"\x16")  # the first byte of a TLS record, and no more
        eventually(lambda: h.counters.snapshot()["connections_accepted"] == 2)
        t0 = time.monotonic()
        assert h.stop(TIMEOUT)
        assert time.monotonic() - t0 < 3
        for s in (silent, idle):
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                assert s.recv(1024) == b""
    assert h.stop(TIMEOUT), "stop() is idempotent"


# ------------------------------------------------------------------ plain HTTP (port 80)


def _plain_get(port: int, host: str, target: str = "/p?q=1") -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                  .encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split(" ")[1]), dict(x.split(": ", 1) for x in lines[1:]), body


def test_plain_http_redirects_or_serves_per_zone(tmp_path, pki) -> None:
    zones = _config(tmp_path, pki)["zones"]
    zones[1] = {**zones[1], "plain_http": "serve"}       # www serves plain HTTP
    with serving(tmp_path, pki, plain_port=0, listen=["127.0.0.1"], zones=zones) as h:
        port = h.server.plain_addresses[0][1]
        status, headers, _ = _plain_get(port, "shop.example.eu")
        assert status == 301 and headers["Location"] == "https://shop.example.eu/p?q=1"
        status, _, body = _plain_get(port, "www.example.com:80")
        assert status == 200 and json.loads(body)["zone"] == "www"
        status, _, _ = _plain_get(port, "shop.example.us")   # another region's zone
        assert status == 421
        status, _, _ = _plain_get(port, "nobody.example")
        assert status == 421
        snap = h.counters.snapshot()
        assert snap["refused"]["region_sni"] == 1 and snap["refused"]["unknown_sni"] == 1
        # Each answer counts for the zone its Host named; refused ones for none.
        responses = snap["responses"]
        assert responses["shop-eu"]["3xx"]["none"] == 1
        assert responses["www"]["2xx"]["none"] == 1
        assert sum(n for z in responses.values() for c in z.values() for n in c.values()) == 2


def test_zone_rules_answer_through_tls(tmp_path, pki) -> None:
    """A firewall block and a rate limit reached over real TLS."""
    zones = _config(tmp_path, pki)["zones"]
    zones[1] = {**zones[1],
                "firewall": [{"expression": 'http.request.uri.path eq "/blocked"',
                              "action": "block"}],
                "rate_limits": [{"name": "all", "requests": 2, "period": 60, "block": 60}]}
    with serving(tmp_path, pki, listen=["127.0.0.1"], zones=zones) as h:
        port, ctx = _port(h, "127.0.0.1"), _client_context(pki)

        def get(path: str) -> tuple[int, dict]:
            req = (f"GET {path} HTTP/1.1\r\nHost: www.example.com\r\n"
                   "Connection: close\r\n\r\n").encode()
            _, status, headers, _ = tls_request("127.0.0.1", port, ctx, "www.example.com", req)
            return status, headers

        assert get("/blocked")[0] == 403
        assert [get("/")[0] for _ in range(2)] == [200, 200]
        status, headers = get("/")
        assert status == 429 and headers["Retry-After"] == "60"
        actions = h.counters.snapshot()["actions"]["www"]
        assert actions["fw_block"] == 1 and actions["rate_limited"] == 1
