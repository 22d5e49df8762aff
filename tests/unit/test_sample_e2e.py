"""The operations sample end to end on loopback, with real parts only.

A real L7 front end (agent/l7/server.py run_in_thread) serves zone www with
the lab's zone certificates; a real LogService (agent/logs/service.py) built
from a LogsConfig samples its requests and ships the sample over mTLS to a
real CoreServer (core/server.py) with its own data directory, master key
and the network PKI of control/pki.py. Clients speak HTTPS with keep-alive
from several loopback addresses (127.0.0.2 ...), asking the edge's own
/cdn-cgi/trace (no origin: the edge answers). The sample is read back the
way an operator reads it: GET /v1/sample?day= with a viewer's certificate.

Checked: the sample's size against the exact binomial interval and against
the shipper's own count (nothing lost); no client address anywhere in the
core's files or in the decrypted sample; pseudonyms stable per address
within a key period and new after the UTC day turns.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import math
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.l7.config import parse_serve_config
from agent.l7.server import ServerThread, run_in_thread
from agent.l7.status import read_status
from agent.logs.config import parse_logs_config
from agent.logs.records import SAMPLE, SAMPLE_FIELDS
from agent.logs.service import LogService
from control import pki
from core.config import core_config_dict, parse_config
from core.crypto import init_master_key
from core.records import day_of
from core.server import CoreServer
from lab.certs import make_lab_pki

DC = "dus"
ZONE = "www"
HOST = "www.example.com"
TRACE = "/cdn-cgi/trace"
EDGE_IP = "127.0.0.1"
CLIENTS = tuple(f"127.0.0.{i}" for i in range(2, 10))   # eight client addresses
CONNECTIONS_PER_CLIENT = 2      # 16 kept-alive connections, one client thread each
REQUESTS = 20_000
RATE = 0.01
CONFIDENCE = 0.999              # the count falls outside once in a thousand runs
ROTATION_REQUESTS = 23          # per address and phase, every one sampled
OPERATOR = "olga"               # a viewer: may read the sample
TIMEOUT = 10.0                  # per socket operation, flush, stop
LOAD_SECONDS = 45.0             # the whole load, whatever happens
DAY = 86_400


class Clock:
    """The pseudonymizer's clock, moved by the test (no sleeping till midnight)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the statistics


def binomial_interval(n: int, p: float, confidence: float) -> tuple[int, int]:
    """The central interval [lo, hi] of Binomial(n, p): P(X < lo) and
    P(X > hi) are each at most (1 - confidence) / 2, and neither bound can
    move inwards without breaking that. Exact: each tail summed from its
    smallest term, terms from lgamma (no scipy here)."""
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def pmf(k: int) -> float:
        return math.exp(log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * log_p + (n - k) * log_q)

    tail = (1 - confidence) / 2
    lo, below = 0, 0.0
    while below + (term := pmf(lo)) <= tail:
        below += term
        lo += 1
    hi, above = n, 0.0
    while above + (term := pmf(hi)) <= tail:
        above += term
        hi -= 1
    return lo, hi


def test_the_interval_is_exact_on_a_case_worked_by_hand() -> None:
    # Binomial(20, 1/2): P(X <= 2) = 211/2**20 = 0.000201 fits a 0.0005 tail,
    # P(X <= 3) = 1351/2**20 = 0.00129 does not; symmetric above.
    assert binomial_interval(20, 0.5, 0.999) == (3, 17)
    lo, hi = binomial_interval(REQUESTS, RATE, CONFIDENCE)
    sd = math.sqrt(REQUESTS * RATE * (1 - RATE))
    assert abs((REQUESTS * RATE - lo) / sd - 3.29) < 0.3   # the normal's z(0.9995) = 3.29
    assert abs((hi - REQUESTS * RATE) / sd - 3.29) < 0.3


# --------------------------------------------------------------------------- the parts


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The network's PKI: the agent dus, the core (127.0.0.1), a viewer."""
    d = tmp_path_factory.mktemp("net")
    loopback = ipaddress.ip_address(EDGE_IP)
    pki.run(d, pki.plan({DC: [loopback]}, [loopback], {OPERATOR: "viewer"}))
    return d


@pytest.fixture(scope="module")
def zone_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab's zone certificates for www; returns the clients' trust anchor."""
    return make_lab_pki(tmp_path_factory.mktemp("zones"), {ZONE: [HOST]})


@dataclass
class Stack:
    core: CoreServer
    logs: LogService
    edge: ServerThread
    status: Path     # the edge's status socket
    net: Path
    zone_ca: Path

    @property
    def edge_port(self) -> int:
        return self.edge.addresses[0][1]


def _stop_edge(edge: ServerThread) -> None:
    assert edge.stop(TIMEOUT), "the L7 front end did not stop"


@pytest.fixture
def stack(tmp_path: Path, net: Path, zone_ca: Path) -> Iterator[Callable[..., Stack]]:
    """stack(rate, clock) starts core, log service and edge; all stop at the end
    (edge, then log service, then core), and no thread of theirs outlives them."""
    before = set(threading.enumerate())
    with contextlib.ExitStack() as stop:
        def start(rate: float, clock: Callable[[], float] = time.time) -> Stack:
            master = tmp_path / "secrets" / "master.key"
            init_master_key(master)
            core = CoreServer(parse_config(core_config_dict(
                [ZONE], listen=EDGE_IP, port=0, cert=net / "core" / "core.crt",
                key=net / "core" / "core.key", ca=net / "ca.crt", data_dir=tmp_path / "core",
                master_key=master, sweep_interval=3600))).start()
            stop.callback(core.stop)
            serve = parse_serve_config({
                "dc": DC, "region": "eu", "listen": [EDGE_IP], "port": 0,
                "certs": str(zone_ca.parent), "status_socket": str(tmp_path / "l7.sock"),
                "zones": [{"name": ZONE, "hostnames": [HOST]}]})
            logs_cfg = parse_logs_config({
                "dc": DC, "cert": str(net / "agents" / f"{DC}.crt"),
                "key": str(net / "agents" / f"{DC}.key"), "ca": str(net / "ca.crt"),
                "cores": {"core": {"url": f"https://{EDGE_IP}:{core.port}",
                                   "tls_name": "core.privedge.internal"}},
                "default_core": "core", "batch_seconds": 0.5,
                "sample": {"rate": rate, "core": "core"}})   # no customer logs: zones {}
            logs = LogService(logs_cfg, serve, clock=clock).start()
            stop.callback(logs.stop, TIMEOUT)
            edge = run_in_thread(serve, logs=logs.submitters(serve), sample=logs.sampling())
            stop.callback(_stop_edge, edge)
            return Stack(core, logs, edge, tmp_path / "l7.sock", net, zone_ca)

        yield start
    left = [t for t in threading.enumerate() if t not in before]
    for t in left:
        t.join(TIMEOUT)
    assert not [t.name for t in left if t.is_alive()], "threads left running"


# --------------------------------------------------------------------------- clients


class EdgeConnection(http.client.HTTPSConnection):
    """Kept-alive HTTPS to the edge on 127.0.0.1 from `source`, a loopback
    address of the client's, with the zone's name as SNI and Host."""

    def __init__(self, port: int, context: ssl.SSLContext, source: str) -> None:
        super().__init__(HOST, port, timeout=TIMEOUT, context=context,
                         source_address=(source, 0))
        self._edge = (EDGE_IP, port)

    def connect(self) -> None:
        raw = socket.create_connection(self._edge, self.timeout, self.source_address)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(raw, server_hostname=HOST)


def _keep_alive(port: int, context: ssl.SSLContext, source: str, count: int,
                deadline: float) -> Counter[int]:
    """`count` GETs of the trace over one connection; the statuses seen."""
    statuses: Counter[int] = Counter()
    conn = EdgeConnection(port, context, source)
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            conn.request("GET", TRACE)
            answer = conn.getresponse()
            answer.read()
            statuses[answer.status] += 1
            if answer.will_close:
                break
    finally:
        conn.close()
    return statuses


def load(s: Stack, plan: list[tuple[str, int]]) -> Counter[int]:
    """One client thread per (source address, requests) of `plan`, each on
    its own kept-alive connection, all bounded by LOAD_SECONDS together."""
    context = ssl.create_default_context(cafile=s.zone_ca)
    deadline = time.monotonic() + LOAD_SECONDS
    with ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="sample-client") as pool:
        futures = [pool.submit(_keep_alive, s.edge_port, context, source, count, deadline)
                   for source, count in plan]
        return sum((f.result(timeout=LOAD_SECONDS + TIMEOUT) for f in futures), Counter())


def settle(s: Stack, responses: int) -> None:
    """Wait until the edge has observed `responses` responses of the zone.

    The status socket is served on the edge's event loop, and an observer
    call (counters, sample draw, pseudonym, submit) is one synchronous step
    of that loop: once a status answer counts the last response, its sample
    record has been handed to the shipper. (A client can read a response
    before the observer that follows its write has run.)"""
    deadline = time.monotonic() + TIMEOUT
    seen = -1
    while time.monotonic() < deadline:
        zones = read_status(s.status)["responses"]
        assert isinstance(zones, dict)
        seen = sum(n for by_class in zones.get(ZONE, {}).values() for n in by_class.values())
        if seen == responses:
            return
        time.sleep(0.02)
    pytest.fail(f"the edge observed {seen} responses of zone {ZONE}, expected {responses}")


def flush_and_stats(s: Stack) -> dict[str, int | str]:
    """Flush the log service; the sample shipper's exact counts."""
    assert s.logs.router.flush(TIMEOUT), "the log service did not flush in time"
    (stream, core, stats), = s.logs.router.stats()   # no customer logs: one shipper
    assert (stream, core) == (SAMPLE, "core")
    return stats


def read_sample(s: Stack, days: set[str]) -> tuple[bytes, list[dict]]:
    """The stored sample of these UTC days as an operator reads it:
    (the raw NDJSON answers, the records)."""
    ctx = ssl.create_default_context(cafile=s.net / "ca.crt")
    ctx.load_cert_chain(s.net / "operators" / f"{OPERATOR}.crt",
                        s.net / "operators" / f"{OPERATOR}.key")
    conn = http.client.HTTPSConnection(EDGE_IP, s.core.port, context=ctx, timeout=TIMEOUT)
    raw = b""
    try:
        for day in sorted(days):
            conn.request("GET", f"/v1/sample?day={day}")
            answer = conn.getresponse()
            body = answer.read()
            assert answer.status == 200, f"GET /v1/sample?day={day}: {answer.status} {body!r}"
            raw += body
    finally:
        conn.close()
    return raw, [json.loads(line) for line in raw.splitlines()]


def days_between(start: float) -> set[str]:
    """The UTC days records stamped from `start` until now are filed under
    (the core files the sample by the day of each record's wall-clock time)."""
    return {day_of(start), day_of(time.time())}


# --------------------------------------------------------------------------- addresses


def address_texts(ip: str) -> list[str]:
    """The ways an IPv4 address can be written as text."""
    a = ipaddress.IPv4Address(ip)
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    return [ip, f"::ffff:{ip}", str(mapped), mapped.exploded, f"{int(a):08x}", f"{int(a):08X}",
            str(int(a)), a.reverse_pointer]


_TOKEN = re.compile(r"[0-9A-Za-z.:%]+")


def address_tokens(text: str) -> list[str]:
    """Every token of `text`, and every JSON string in it, that parses as an
    IPv4 or IPv6 address."""
    candidates = set(_TOKEN.findall(text))
    for line in text.splitlines():
        candidates.update(v for v in json.loads(line).values() if isinstance(v, str))
    found = []
    for token in candidates:
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(token)
            found.append(token)
    return found


def assert_no_client_address(s: Stack, raw_sample: bytes, clients: tuple[str, ...]) -> None:
    """Not in the core's files (names and bytes), not in the decrypted sample."""
    data_dir = s.core.config.data_dir
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pec" for p in files), "no sealed chunk: nothing was scanned"
    needles = [t.encode() for ip in clients for t in address_texts(ip)]
    for p in files:
        data = p.read_bytes()
        name = str(p.relative_to(data_dir)).encode()
        for needle in needles:
            assert needle not in data, f"{p} holds {needle!r}"
            assert needle not in name, f"file name {p} holds {needle!r}"
    for needle in needles:
        assert needle not in raw_sample, f"the decrypted sample holds {needle!r}"
    assert address_tokens(raw_sample.decode()) == []


# --------------------------------------------------------------------------- the tests


def test_a_one_percent_sample_of_20000_requests_is_whole_and_holds_no_address(stack) -> None:
    s = stack(RATE)
    start = time.time()
    per_connection = REQUESTS // (len(CLIENTS) * CONNECTIONS_PER_CLIENT)
    plan = [(ip, per_connection) for ip in CLIENTS for _ in range(CONNECTIONS_PER_CLIENT)]
    assert sum(n for _, n in plan) == REQUESTS
    t0 = time.monotonic()
    assert load(s, plan) == {200: REQUESTS}, "every request is answered 200 by the edge"
    seconds = time.monotonic() - t0
    settle(s, REQUESTS)
    stats = flush_and_stats(s)
    raw, records = read_sample(s, days_between(start))

    lo, hi = binomial_interval(REQUESTS, RATE, CONFIDENCE)
    print(f"{REQUESTS} requests in {seconds:.1f}s; sample {len(records)} records, "
          f"{CONFIDENCE:.1%} interval [{lo}, {hi}]; shipper {stats}")
    assert lo <= len(records) <= hi, \
        f"{len(records)} sample records of {REQUESTS} at rate {RATE}: outside [{lo}, {hi}]"
    # Nothing lost between the edge and the store: every record the edge
    # drew was sent and acknowledged, and the store holds exactly those.
    assert stats["submitted"] == stats["sent"] == len(records)
    assert (stats["dropped"], stats["rejected"], stats["pending_records"]) == (0, 0, 0)
    core = s.core.stats()
    assert core["received"][SAMPLE] == {"all": {"records": len(records),
                                                "batches": stats["batches_sent"]}}
    assert sum(d["records"] for d in core["stored"][SAMPLE].values()) == len(records)
    assert (core["rejected"][SAMPLE], core["duplicates"][SAMPLE], core["unreadable_chunks"]) \
        == ({}, 0, 0)

    for r in records:
        assert tuple(r) == SAMPLE_FIELDS
        assert (r["dc"], r["zone"], r["method"], r["status"]) == (DC, ZONE, "GET", 200)
        assert (r["cache_status"], r["action"], r["tls_version"]) == ("", "", "TLSv1.3")
        assert r["bytes"] > 0 and r["latency_ms"] >= 0
        assert start - 1 <= r["time"] <= time.time() + 1
        assert r["period"] in days_between(start)
    # Eight addresses, each sampled about 25 times (none missed but once in
    # 10**10 runs): eight pseudonyms per key period, however the connections
    # interleaved.
    periods: dict[str, set[str]] = {}
    for r in records:
        periods.setdefault(r["period"], set()).add(r["client"])
    assert all(len(p) <= len(CLIENTS) for p in periods.values()), periods
    assert len({r["client"] for r in records}) >= len(CLIENTS)

    assert_no_client_address(s, raw, CLIENTS)


def test_pseudonyms_are_stable_per_address_within_a_day_and_new_after_midnight(stack) -> None:
    start = time.time()
    clock = Clock(start)
    s = stack(1.0, clock)   # every request sampled
    n = ROTATION_REQUESTS
    today = day_of(clock.now)
    tomorrow = day_of(clock.now + DAY)
    seen = 0

    def phase(source: str) -> list[dict]:
        """n requests from `source` over two connections; the new records."""
        nonlocal seen
        assert load(s, [(source, n // 2), (source, n - n // 2)]) == {200: n}
        settle(s, seen + n)
        stats = flush_and_stats(s)
        _, records = read_sample(s, days_between(start))
        assert stats["sent"] == len(records) == seen + n
        new, seen = records[seen:], seen + n
        return new

    a = phase("127.0.0.2")
    b = phase("127.0.0.3")
    clock.now = (clock.now // DAY + 1) * DAY + 1   # one second into the next UTC day
    a2 = phase("127.0.0.2")
    b2 = phase("127.0.0.3")

    def pseudonyms(records: list[dict]) -> Counter[tuple[str, str]]:
        return Counter((r["client"], r["period"]) for r in records)

    # One address, two connections: one pseudonym, in today's period.
    (pa, period_a), = pseudonyms(a)
    (pb, period_b), = pseudonyms(b)
    assert period_a == period_b == today
    assert pa != pb
    assert pseudonyms(a + b) == {(pa, today): n, (pb, today): n}
    # Past midnight the key is new: the same addresses get pseudonyms that
    # match neither of yesterday's, still one per address.
    (pa2, period_a2), = pseudonyms(a2)
    (pb2, period_b2), = pseudonyms(b2)
    assert period_a2 == period_b2 == tomorrow
    assert len({pa, pb, pa2, pb2}) == 4
    # The records keep the edge's wall-clock time: the core files them by
    # it, whatever day the pseudonym's period names.
    assert all(start - 1 <= r["time"] <= time.time() + 1 for r in a + b + a2 + b2)

    raw, _ = read_sample(s, days_between(start))
    assert_no_client_address(s, raw, ("127.0.0.2", "127.0.0.3"))
