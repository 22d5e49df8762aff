"""The L7 pipeline in the whole lab: curl from Katerina's namespace through
Düsseldorf's agent to the TLS origin in el-origin, and the privacy promise.

The lab (lab/topology.yaml: zone www's page rules, firewall, rate limits,
WAF, bots and login settings) comes up under a prefix of this run's own.
Every exchange is real: curl in el-client, anycast routing to dus, XDP,
TLS with the zone's certificate, the pipeline, verified TLS to the origin.

The last test is invariant 5: a thousand requests and responses that carry
a random marker, then every file written anywhere on this machine since the
test began (the lab's state, the agent's cache, /tmp, /var, /run, ...) is
searched for it. Only encrypted cache objects may exist, and none of them
may show it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.cluster import Lab
from tests.integration.labs import front, whole_lab

WWW, SHOP = "www.example.com", "shop.example.eu"
ADDRESS = {WWW: "198.51.100.10", SHOP: "198.51.100.65"}
CLIENT = "203.0.113.10"
CURL_TIMEOUT = 15


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from whole_lab("l")


def curl(lab: Lab, *args: str, name: str = WWW, stdin: str | None = None,
         timeout: float = CURL_TIMEOUT) -> subprocess.CompletedProcess:
    """curl from el-client, the name resolved to the zone's anycast address."""
    argv = ["curl", "-sS", "--max-time", str(timeout),
            "--cacert", str(lab.state_dir / "pki" / "ca.crt"),
            "--resolve", f"{name}:443:{ADDRESS[name]}", *args]
    return lab.exec("client", argv, capture_output=True, text=True, input=stdin,
                    timeout=timeout * 3 + 10)


def fetch(lab: Lab, path: str, *args: str, name: str = WWW) -> tuple[int, dict, str]:
    """(status, headers, body) of one request."""
    r = curl(lab, "-D", "-", *args, f"https://{name}{path}", name=name)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers = {n.lower(): v for n, _, v in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


# ------------------------------------------------------------------------ zones


@pytest.mark.parametrize("name,zone", [(WWW, "www"), (SHOP, "shop-eu")])
def test_each_zone_answers_with_its_certificate_in_dus(lab: Lab, name: str, zone: str) -> None:
    status, _, body = fetch(lab, "/cdn-cgi/trace", name=name)  # curl verifies the name
    assert status == 200 and json.loads(body) | {"request_id": ""} == \
        {"dc": "dus", "region": "eu", "zone": zone, "request_id": ""}


def test_requests_reach_the_origin_with_forwarding_headers(lab: Lab) -> None:
    status, headers, body = fetch(lab, "/echo/hello?x=1", "-H", "X-Forwarded-For: 192.0.2.1")
    assert status == 200
    seen = dict(json.loads(body)["headers"])
    assert seen["x-forwarded-for"] == f"192.0.2.1, {CLIENT}"
    assert seen["true-client-ip"] == CLIENT and seen["x-forwarded-proto"] == "https"
    assert seen["x-request-id"] == headers["x-request-id"]


def test_cache_miss_hit_revalidated_and_purge(lab: Lab) -> None:
    path = f"/static/lab-{secrets.token_hex(4)}.css?cc=max-age%3D2"
    assert fetch(lab, path)[1]["cf-cache-status"] == "MISS"
    assert fetch(lab, path)[1]["cf-cache-status"] == "HIT"
    time.sleep(2.5)
    assert fetch(lab, path)[1]["cf-cache-status"] == "REVALIDATED"
    sock = str(lab.dc_dir("dus") / "l7.sock")
    r = lab.exec("dus", [lab.python, "-m", "agent.l7.status", sock, "purge", "www", "--url",
                         f"https://{WWW}{path}"], capture_output=True, text=True, timeout=30,
                 env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert r.returncode == 0 and "purged 1 object" in r.stdout, r.stdout + r.stderr
    assert fetch(lab, path)[1]["cf-cache-status"] == "MISS"


PY_CLIENT = """
import http.client, json, socket, ssl, sys
ca, host, address = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=ca)
conn = http.client.HTTPSConnection(host, 443, timeout=10, context=ctx)
conn.sock = ctx.wrap_socket(socket.create_connection((address, 443), 10), server_hostname=host)
out = []
for method, path in (("GET", sys.argv[4]), ("GET", sys.argv[4]),
                     ("GET", "/echo/p?q=%3Cscript%3Ealert(1)%3C/script%3E"),
                     ("GET", "/cdn-cgi/trace")):
    conn.request(method, path)
    r = conn.getresponse()
    body = r.read()
    out.append([r.status, r.getheader("cf-cache-status"), len(body)])
print(json.dumps({"answers": out, "version": conn.sock.version()}))
"""


def test_a_python_client_on_one_kept_alive_connection(lab: Lab) -> None:
    """Python's own TLS and HTTP client, four requests on one connection."""
    path = f"/static/py-{secrets.token_hex(4)}.css"
    r = lab.exec("client", [lab.python, "-c", PY_CLIENT, str(lab.state_dir / "pki" / "ca.crt"),
                            WWW, ADDRESS[WWW], path],
                 capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["version"] == "TLSv1.3"
    assert got["answers"][:2] == [[200, "MISS", 1024], [200, "HIT", 1024]]
    assert got["answers"][2][:2] == [403, None]          # the WAF, before the cache
    assert got["answers"][3][0] == 200                   # the connection goes on after a 403


# ------------------------------------------------------------------------ rules


def test_page_rule_redirect_and_firewall_block(lab: Lab) -> None:
    status, headers, _ = fetch(lab, "/old/page?a=1")
    assert (status, headers["location"]) == (301, f"https://{WWW}/new/page?a=1")
    assert fetch(lab, "/admin/users")[0] == 403


def test_waf_blocks_an_attack_and_passes_an_api_call(lab: Lab) -> None:
    assert fetch(lab, "/echo/q?id=1%20UNION%20SELECT%20password%20FROM%20users--")[0] == 403
    status, _, body = fetch(lab, "/echo/api/orders/7", "-X", "PATCH", "-H",
                            "Content-Type: application/json", "--data",
                            json.dumps({"note": "Deliver to Mr O'Brien; drop it at the door"}))
    assert status == 200 and "O'Brien" in json.loads(body)["body"]


def test_rate_limit(lab: Lab) -> None:
    statuses = [fetch(lab, f"/search?q=boots{i}")[0] for i in range(7)]
    assert statuses[:5] == [200] * 5 and statuses[5] == 429


def test_challenge_with_a_cookie_jar(lab: Lab) -> None:
    jar = "/dev/shm/privedge-test-jar"  # memory, not disk; removed below
    try:
        r = curl(lab, "-o", "/dev/null", "-w", "%{http_code} %{num_redirects}", "-b", jar,
                 "-c", jar, "-L", f"https://{WWW}/members")
        assert r.stdout == "200 1", r.stderr
        assert fetch(lab, "/members")[0] == 302   # without the cookie: asked again
    finally:
        Path(jar).unlink(missing_ok=True)


def test_credential_stuffing_is_limited(lab: Lab) -> None:
    statuses = [fetch(lab, "/login", "--data", "username=katerina&password=guess")[0]
                for _ in range(7)]
    assert statuses[0] == 401 and statuses[-1] == 429, statuses


def test_origin_errors_and_body_limit(lab: Lab) -> None:
    assert fetch(lab, "/drop")[0] == 502
    assert fetch(lab, "/slow?delay=8")[0] == 504
    r = curl(lab, "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@-",
             "-H", "Content-Type: application/octet-stream", f"https://{WWW}/echo/upload",
             stdin="x" * (2 << 20))
    assert r.stdout == "413"


# --------------------------------------------------------------- nothing on disk


def _written_since(start: float, roots: list[str]) -> list[Path]:
    """Regular files under roots (one filesystem each) modified since start."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames
                           if not os.path.ismount(os.path.join(dirpath, d))]
            for f in filenames:
                p = Path(dirpath, f)
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if p.is_file() and not p.is_symlink() and st.st_mtime >= start:
                    found.append(p)
    return found


def test_nothing_about_requests_is_written_to_disk(lab: Lab) -> None:
    marker = f"pemarker{secrets.token_hex(12)}"
    start = time.time()
    # 1,000 requests on keep-alive connections, the marker in query, header,
    # body and (echoed, or as the content of cached objects) in responses.
    # curl reads its request list from stdin: the test writes no file of it.
    common = [f'cacert = "{lab.state_dir / "pki" / "ca.crt"}"',
              f'resolve = "{WWW}:443:{ADDRESS[WWW]}"', "silent", "show-error",
              'write-out = "%{http_code}\\n"', "output = /dev/null", "max-time = 30"]
    blocks = []
    for i in range(600):
        blocks.append([f'url = "https://{WWW}/echo/{i}?m={marker}"',
                       f'header = "X-Note: {marker}"',
                       *([f'data = "comment={marker}"'] if i % 2 else []), *common])
    for i in range(400):   # 100 objects of 64 KiB: more than the lab's 4 MiB in memory
        blocks.append([f'url = "https://{WWW}/static/{marker}-{i % 100}.css'
                       f'?size=65536&fill={marker}"', *common])
    # One curl, one connection reused: "next" starts each request's own options.
    config = "\nnext\n".join("\n".join(b) for b in blocks) + "\n"
    r = lab.exec("client", ["curl", "-K", "-"], capture_output=True, text=True, input=config,
                 timeout=300)
    codes = r.stdout.split()
    assert r.returncode == 0 and len(codes) == 1000 and set(codes) == {"200"}, r.stderr[-500:]
    st = front(lab, "dus")
    assert st["cache"]["disk"]["objects"] > 0, "nothing spilled: the test proves less than it says"

    roots = ["/"] + [m for m in ("/tmp", "/var", "/run", "/dev/shm", "/home", "/root", "/work")
                     if os.path.ismount(m)]
    files = _written_since(start, roots)
    agent = lab.agent_pid("dus")
    opened = [Path(os.readlink(f"/proc/{agent}/fd/{fd}")) for fd in os.listdir(f"/proc/{agent}/fd")]
    files += [p for p in opened if p.is_file()]
    cache_dir = lab.dc_dir("dus") / "cache"
    hits = []
    for p in set(files):
        try:
            with open(p, "rb") as f:
                if marker.encode() in f.read(256 << 20):
                    hits.append(p)
        except OSError:
            continue
    assert hits == [], f"the marker is in plaintext in {hits}"
    in_cache = [p for p in files if cache_dir in p.parents]
    assert in_cache, "no cache object was written at all"
    # Besides cache objects, the DC wrote only its operational state: the
    # log of its phases and the XDP rule state (nothing of a request).
    others = {str(p.relative_to(lab.dc_dir("dus"))) for p in files
              if lab.dc_dir("dus") in p.parents and cache_dir not in p.parents}
    assert others <= {"agent.log", *(f"run/{link}/{f}" for link in ("inet0", "bb0")
                                     for f in ("rules.npz", "last_apply.json"))}, others
