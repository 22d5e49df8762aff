"""The whole request path on loopback: edge → the lab's origin over verified TLS.

A real lab origin (lab/origin.py, its certificate from the test CA) and a
real front end (run_in_thread) on 127.0.0.1, driven by Python's
http.client and by curl: headers toward the origin, the cache (MISS, HIT,
REVALIDATED, purge), origin errors, streaming, WAF, bots and the
challenge, credential stuffing, rate limits. No root.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.l7.config import parse_serve_config
from agent.l7.observe import Sampling
from agent.l7.server import ServerThread, run_in_thread
from agent.l7.status import purge, read_status
from agent.logs.records import ENCODERS
from lab.certs import make_lab_pki
from lab.origin import GOOD_PASSWORD

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
HOST = "www.example.com"
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
           "Accept": "text/html,*/*", "Accept-Language": "en", "Accept-Encoding": "identity"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lab_pki(tmp_path_factory.mktemp("pki"), {"www": [HOST],
                                                         "origin": ["origin.example.net"]})


@pytest.fixture(scope="module")
def origin(pki: Path) -> Iterator[int]:
    """The lab origin over TLS on 127.0.0.1; yields its port."""
    d = pki.parent
    p = subprocess.Popen([sys.executable, "-m", "lab.origin", "--port", "0",
                          "--cert", str(d / "origin.crt"), "--key", str(d / "origin.key")],
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = p.stdout.readline()
        assert "listening on" in line, f"lab origin did not start: {line!r}"
        yield int(line.split("]:")[1].split()[0])
    finally:
        p.terminate()
        p.wait(TIMEOUT)


def _zone(origin_port: int, pki: Path, **extra: object) -> dict:
    return {
        "name": "www", "hostnames": [HOST], "addresses": ["198.51.100.10"],
        "origin": {"url": f"https://127.0.0.1:{origin_port}", "server_name": "origin.example.net",
                   "ca_file": str(pki), "response_timeout": 1.5},
        "page_rules": [{"pattern": f"{HOST}/cms/*", "disable_waf": True}],
        "firewall": [{"expression": 'http.request.uri.path eq "/members"',
                      "action": "challenge"}],
        "rate_limits": [{"name": "search", "requests": 3, "period": 60, "block": 30,
                         "path_prefix": "/search"}],
        "login": {"endpoints": [{"path": "/login"}, {"path": "/echo/login"}],
                  "client_failures": 3, "username_failures": 50},
        **extra,
    }


@contextlib.contextmanager
def edge(tmp_path: Path, pki: Path, origin_port: int, sinks: Recorder | None = None,
         **zone: object) -> Iterator[ServerThread]:
    cfg = {"dc": "dus", "region": "eu", "listen": ["127.0.0.1"], "port": 0,
           "certs": str(pki.parent), "status_socket": str(tmp_path / "l7.sock"),
           "cache_store": {"memory_bytes": 8 << 20, "disk_dir": str(tmp_path / "cache")},
           "zones": [_zone(origin_port, pki, **zone)]}
    handle = run_in_thread(parse_serve_config(cfg),
                           logs=None if sinks is None else {"www": sinks.logs.append},
                           sample=None if sinks is None else sinks.sampling)
    try:
        yield handle
    finally:
        assert handle.stop(TIMEOUT)


class Recorder:
    """Where the observer (agent/l7/observe.py) sends zone www's log records
    and the sample, kept in lists; every request is sampled."""

    def __init__(self) -> None:
        self.logs: list[tuple] = []
        self.sample: list[tuple] = []
        self.sampling = Sampling(lambda: True, lambda address: ("f" * 32, "2026-11-27"),
                                 self.sample.append)


class EdgeConnection(http.client.HTTPSConnection):
    """HTTPS to the edge on 127.0.0.1 with the zone's name as SNI and Host."""

    def __init__(self, port: int, ca: Path) -> None:
        super().__init__(HOST, port, timeout=TIMEOUT,
                         context=ssl.create_default_context(cafile=str(ca)))
        self._edge_port = port

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self._edge_port), TIMEOUT)
        self.sock = self._context.wrap_socket(raw, server_hostname=HOST)


def get(conn: EdgeConnection, path: str, method: str = "GET", body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers={**BROWSER, **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def origin_hits(port: int, pki: Path) -> dict[str, int]:
    ctx = ssl.create_default_context(cafile=str(pki))
    c = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=ctx)
    c.connect = lambda: setattr(c, "sock", ctx.wrap_socket(  # type: ignore[method-assign]
        socket.create_connection(("127.0.0.1", port), TIMEOUT),
        server_hostname="origin.example.net"))
    c.request("GET", "/__origin/hits")
    return json.loads(c.getresponse().read())


@pytest.fixture
def conn(tmp_path: Path, pki: Path, origin: int) -> Iterator[tuple[EdgeConnection, ServerThread]]:
    with edge(tmp_path, pki, origin) as handle:
        c = EdgeConnection(handle.addresses[0][1], pki)
        yield c, handle
        c.close()


# ------------------------------------------------------------------------ origin


def test_headers_toward_the_origin(conn) -> None:
    c, _ = conn
    status, headers, body = get(c, "/echo/a?x=1", headers={
        "Connection": "keep-alive, X-Secret", "X-Secret": "hop", "X-Forwarded-For": "192.0.2.7",
        "True-Client-IP": "192.0.2.99", "Exposed-Credential-Check": "1"})
    assert status == 200 and headers["cf-cache-status"] == "DYNAMIC"
    seen = dict(json.loads(body)["headers"])
    assert seen["host"].split(":")[0] == HOST   # as the client sent it
    assert seen["x-forwarded-for"] == "192.0.2.7, 127.0.0.1"
    assert seen["true-client-ip"] == "127.0.0.1"       # a client's own is replaced
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-request-id"] == headers["x-request-id"]
    assert seen["via"].endswith("1.1 privedge")
    assert "x-secret" not in seen and "exposed-credential-check" not in seen


def test_origin_errors_are_502_and_504(conn) -> None:
    c, handle = conn
    assert get(c, "/drop")[0] == 502
    c.close()
    assert get(c, "/slow?delay=3")[0] == 504
    actions = read_status(handle.server.cfg.status_socket)["actions"]["www"]
    assert actions["origin_error"] == 1 and actions["origin_timeout"] == 1


def test_large_bodies_stream_through(conn) -> None:
    c, _ = conn
    size = 24 << 20      # larger than anything the edge buffers or caches
    status, _, body = get(c, f"/big?size={size}")
    assert status == 200 and len(body) == size and body.count(b"b") == size


def test_request_bodies_reach_the_origin(conn) -> None:
    c, _ = conn
    doc = {"name": "O'Brien", "query": "mutation { rename(id: 4, to: \"x\") { id } }"}
    for method in ("PUT", "PATCH", "DELETE", "POST"):
        status, _, body = get(c, "/echo/api/users/4", method, json.dumps(doc).encode(),
                              {"Content-Type": "application/json"})
        assert status == 200, method
        seen = json.loads(body)
        assert seen["method"] == method and json.loads(seen["body"]) == doc


# ------------------------------------------------------------------------- cache


def test_cache_miss_hit_head_and_client_304(conn, origin, pki) -> None:
    c, _ = conn
    s1, h1, b1 = get(c, "/static/one.css")
    s2, h2, b2 = get(c, "/static/one.css")
    assert (s1, h1["cf-cache-status"]) == (200, "MISS")
    assert (s2, h2["cf-cache-status"], b2) == (200, "HIT", b1) and "age" in h2
    s3, h3, b3 = get(c, "/static/one.css", "HEAD")
    assert (s3, h3["cf-cache-status"], b3) == (200, "HIT", b"")
    assert h3["content-length"] == str(len(b1))
    s4, h4, _ = get(c, "/static/one.css", headers={"If-None-Match": h1["etag"]})
    assert (s4, h4["cf-cache-status"]) == (304, "HIT")
    assert origin_hits(origin, pki)["/static/one.css"] == 1


def test_stale_entry_is_revalidated_with_its_etag(conn, origin, pki) -> None:
    c, _ = conn
    # Two seconds, not one: Date has whole seconds, so a response's age on
    # arrival is up to a second, and a refreshed one-second entry could be
    # stale again before the HIT below.
    path = "/static/two.css?cc=max-age%3D2"
    assert get(c, path)[1]["cf-cache-status"] == "MISS"
    time.sleep(2.2)
    status, headers, body = get(c, path)
    assert (status, headers["cf-cache-status"]) == (200, "REVALIDATED") and len(body) == 1024
    assert get(c, path)[1]["cf-cache-status"] == "HIT"
    assert origin_hits(origin, pki)["/static/two.css"] == 2


def test_uncacheable_answers_bypass(conn) -> None:
    c, _ = conn
    for _ in range(2):
        assert get(c, "/static/three.css?cc=no-store")[1]["cf-cache-status"] == "BYPASS"
    assert get(c, "/api/x")[1]["cf-cache-status"] == "DYNAMIC"


def test_purge_by_url_prefix_and_zone(conn) -> None:
    c, handle = conn
    sock = handle.server.cfg.status_socket
    for p in ("/static/p1.css", "/static/p2.css", "/static/sub/p3.css"):
        assert get(c, p)[1]["cf-cache-status"] == "MISS"
    assert purge(sock, "www", url=f"https://{HOST}/static/p1.css") == 1
    assert get(c, "/static/p1.css")[1]["cf-cache-status"] == "MISS"
    assert purge(sock, "www", prefix=f"https://{HOST}/static/sub/") == 1
    assert get(c, "/static/sub/p3.css")[1]["cf-cache-status"] == "MISS"
    assert get(c, "/static/p2.css")[1]["cf-cache-status"] == "HIT"
    assert purge(sock, "www") == 3
    assert get(c, "/static/p2.css")[1]["cf-cache-status"] == "MISS"
    with pytest.raises(ValueError, match="not a hostname of zone www"):
        purge(sock, "www", url="https://other.example.net/x")


# -------------------------------------------------------------------- protection


def test_waf_blocks_attacks_and_passes_lookalikes(conn) -> None:
    c, handle = conn
    assert get(c, "/search?q=1%27%20OR%20%271%27%3D%271")[0] == 403
    assert get(c, "/echo/x?file=..%2F..%2F..%2Fetc%2Fpasswd")[0] == 403
    assert get(c, "/echo/comment", "POST", b"text=<script>alert(document.cookie)</script>",
               {"Content-Type": "application/x-www-form-urlencoded"})[0] == 403
    assert get(c, "/echo/x?name=O%27Brien&q=select+the+best+option+from+our+union")[0] == 200
    # A page rule may switch the WAF off for a path.
    assert get(c, "/cms/x?file=..%2F..%2F..%2Fetc%2Fpasswd")[0] == 200
    assert read_status(handle.server.cfg.status_socket)["actions"]["www"]["waf_block"] == 3


def test_attack_tools_are_refused(conn) -> None:
    c, _ = conn
    assert get(c, "/echo/x", headers={"User-Agent": "sqlmap/1.8#stable"})[0] == 403


def test_challenge_is_passed_by_a_client_that_keeps_the_cookie(conn) -> None:
    c, _ = conn
    status, headers, _ = get(c, "/members")
    assert status == 302 and headers["location"] == "/members"
    cookie = headers["set-cookie"].split(";")[0]
    assert get(c, "/members", headers={"Cookie": cookie})[0] == 200
    # Bound to the client: another user agent with the same cookie is asked again.
    assert get(c, "/members", headers={"Cookie": cookie, "User-Agent": "other"})[0] == 302


def test_browser_lookalike_without_browser_headers_is_challenged(conn) -> None:
    c, _ = conn
    c.putrequest("GET", "/echo/x", skip_accept_encoding=True)
    c.putheader("User-Agent", BROWSER["User-Agent"])
    c.endheaders()
    r = c.getresponse()
    r.read()
    # Mozilla without Accept, Accept-Language and Accept-Encoding: score 60.
    assert r.status == 302 and "__pe_bot=" in r.getheader("Set-Cookie", "")
    assert get(c, "/echo/x")[0] == 200   # with them: a browser


def test_rate_limit_answers_429_with_retry_after(conn) -> None:
    c, _ = conn
    got = [get(c, "/search?q=shoes") for _ in range(4)]
    assert [g[0] for g in got[:3]] == [200, 200, 200]
    assert got[3][0] == 429 and got[3][1]["retry-after"] == "30"


def test_failed_logins_are_limited_per_client(conn) -> None:
    c, handle = conn
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    statuses = [get(c, "/login", "POST", b"username=kat&password=wrong", form)[0]
                for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    good = f"username=kat&password={GOOD_PASSWORD.replace(' ', '+')}".encode()
    assert get(c, "/login", "POST", good, form)[0] == 429   # still blocked
    assert read_status(handle.server.cfg.status_socket)["actions"]["www"]["login_block"] >= 2


def test_a_leaked_password_is_flagged_to_the_origin(conn) -> None:
    c, _ = conn
    status, _, body = get(c, "/echo/login", "POST",
                          json.dumps({"username": "kat", "password": "password123"}).encode(),
                          {"Content-Type": "application/json"})
    assert status == 200
    assert dict(json.loads(body)["headers"]).get("exposed-credential-check") == "1"


# -------------------------------------------------------------------------- curl


def test_curl_with_a_cookie_jar_passes_the_challenge(conn, pki, tmp_path) -> None:
    _, handle = conn
    curl = shutil.which("curl")
    assert curl, "this test needs curl (apt install curl)"
    port = handle.addresses[0][1]
    jar = tmp_path / "jar"
    r = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code} %{num_redirects}",
                        "--cacert", str(pki), "--resolve", f"{HOST}:{port}:127.0.0.1",
                        "-b", str(jar), "-c", str(jar), "-L", f"https://{HOST}:{port}/members"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.stdout == "200 1", r.stderr
    r = subprocess.run([curl, "-s", "-D", "-", "-o", "/dev/null", "--cacert", str(pki),
                        "--resolve", f"{HOST}:{port}:127.0.0.1",
                        f"https://{HOST}:{port}/static/curl.css",
                        f"https://{HOST}:{port}/static/curl.css"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    statuses = [line.split(": ")[1].strip() for line in r.stdout.splitlines()
                if line.lower().startswith("cf-cache-status")]
    assert statuses == ["MISS", "HIT"], r.stdout


def test_hsts_when_the_zone_asks_for_it(tmp_path, pki, origin) -> None:
    with edge(tmp_path, pki, origin, hsts={"max_age": 600, "include_subdomains": True}) as h:
        c = EdgeConnection(h.addresses[0][1], pki)
        for path in ("/static/h.css", "/static/h.css", "/echo/h", "/admin-does-not-matter"):
            assert get(c, path)[1]["strict-transport-security"] == \
                "max-age=600; includeSubDomains", path
        c.close()


def test_an_http10_client_gets_a_streamed_body_to_the_close(conn, pki) -> None:
    """The origin sends /big chunked; HTTP/1.0 knows no chunks, so the edge
    sends the body bare and ends it by closing the connection."""
    _, handle = conn
    ctx = ssl.create_default_context(cafile=str(pki))
    with socket.create_connection(("127.0.0.1", handle.addresses[0][1]), TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as tls:
        tls.sendall(f"GET /big?size=100000 HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    assert b"transfer-encoding" not in head.lower() and body == b"b" * 100000


def test_the_zones_challenge_ttl_is_the_cookies_lifetime(tmp_path, pki, origin) -> None:
    with edge(tmp_path, pki, origin, bots={"mode": "challenge", "challenge_ttl": 600}) as h:
        c = EdgeConnection(h.addresses[0][1], pki)
        status, headers, _ = get(c, "/members")
        c.close()
    assert status == 302 and "Max-Age=600;" in headers["set-cookie"]


# ------------------------------------------------------------------------ observer


def test_each_answer_leaves_a_log_record_and_a_sample_record(tmp_path, pki, origin) -> None:
    sinks = Recorder()
    with edge(tmp_path, pki, origin, sinks) as handle:
        c = EdgeConnection(handle.addresses[0][1], pki)
        path = f"/static/obs-{time.time_ns()}.css?q=1"
        assert get(c, path)[0] == 200
        assert get(c, path)[0] == 200
        assert get(c, "/?id=1%27%20OR%20%271%27=%271")[0] == 403
        assert get(c, "/drop")[0] == 502
        c.close()
        deadline = time.monotonic() + TIMEOUT
        while len(sinks.logs) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    fields = ("zone", "method", "host", "path", "status", "cache_status", "action", "client_ip",
              "user_agent")
    # The Host header as received: this client names the port too.
    # The shipper lower-cases the cache status and spells the action out
    # (agent/logs/records.py); the event loop hands over what it has.
    got = [dict(zip(fields, (r[1], r[3], r[4].split(":")[0], r[5], r[6], str(r[8]).lower(),
                             str(r[9]), *r[10:12]), strict=True))
           for r in sinks.logs]
    common = {"zone": "www", "method": "GET", "host": HOST, "client_ip": "127.0.0.1",
              "user_agent": BROWSER["User-Agent"]}
    assert got == [
        {**common, "path": path, "status": 200, "cache_status": "miss", "action": ""},
        {**common, "path": path, "status": 200, "cache_status": "hit", "action": ""},
        {**common, "path": "/?id=1%27%20OR%20%271%27=%271", "status": 403,
         "cache_status": "", "action": "waf_block"},
        {**common, "path": "/drop", "status": 502, "cache_status": "dynamic",
         "action": "origin_error"},
    ]
    assert all(r[2] == "dus" and abs(r[0] - time.time()) < 60 for r in sinks.logs)
    assert sinks.logs[0][7] == sinks.logs[1][7] > 0          # bytes: the same body twice
    # What the shippers will make of them: records PROTOCOL.md allows.
    encoded = [json.loads(ENCODERS["logs"](r)) for r in sinks.logs]
    assert [(e["cache_status"], e["action"]) for e in encoded] == [
        ("miss", ""), ("hit", ""), ("", "waf_block"), ("dynamic", "origin_error")]
    assert all(json.loads(ENCODERS["sample"](r))["client"] == "f" * 32 for r in sinks.sample)
    # The sample: metadata and a pseudonym, never the address, host or path.
    assert len(sinks.sample) == 4
    for record in sinks.sample:
        assert "127.0.0.1" not in record and HOST not in record
        assert not any(isinstance(v, str) and v.startswith("/") for v in record)
        assert record[9] == "TLSv1.3" and record[10] == "f" * 32 and record[8] >= 0


def test_a_front_end_without_log_shippers_keeps_only_counts(conn) -> None:
    c, handle = conn
    assert get(c, "/cdn-cgi/trace")[0] == 200
    observer = handle.server.observer
    assert observer.logs == {} and observer.sample is None


def test_a_response_cut_short_is_observed_with_the_bytes_sent(tmp_path, pki, origin) -> None:
    sinks = Recorder()
    size = 24 << 20
    with edge(tmp_path, pki, origin, sinks) as handle:
        raw = socket.create_connection(("127.0.0.1", handle.addresses[0][1]), TIMEOUT)
        ctx = ssl.create_default_context(cafile=str(pki))
        with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
            tls.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            got = 0
            while got < 1 << 20:          # a megabyte, then the client is gone
                got += len(tls.recv(65536))
        deadline = time.monotonic() + TIMEOUT
        while not sinks.logs and time.monotonic() < deadline:
            time.sleep(0.02)
    [record] = sinks.logs
    assert record[5] == f"/big?size={size}" and record[6] == 200
    assert 0 < record[7] < size             # what went out before the cut
