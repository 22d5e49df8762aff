"""agent/logs: records reach a core over real mTLS exactly as core/PROTOCOL.md
says, through outages, overflows, rejections and certificate rotation, with
exact counts and nothing written to disk.

FakeCore below is a small core: stdlib HTTPS on 127.0.0.1 (an ephemeral
port, client certificate required, certificates from control/pki.py in
tmp_path) that answers as PROTOCOL.md's table does, stores each batch id
once and can be scripted (answer 503/400, stop, restart on the same port).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import ipaddress
import json
import os
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from prometheus_client.registry import CollectorRegistry

import core.records as core_records
from agent.config import ConfigError
from agent.logs import config as logs_config
from agent.logs import records as edge_records
from agent.logs import router as router_mod
from agent.logs import shipper as shipper_mod
from agent.logs.config import LogsConfig, load_logs_config, parse_logs_config
from agent.logs.metrics import LogsCollector
from agent.logs.records import ENCODERS, FIELDS, LOG_FIELDS, SAMPLE_FIELDS, RecordError
from agent.logs.router import LogRouter, check_identity
from agent.logs.sampler import Pseudonymizer
from agent.logs.shipper import RECORD_BYTES, Shipper
from agent.metrics import rtt, tls
from agent.metrics.registry import LABELS, AllowlistRegistry, MetricsError
from agent.metrics.server import TlsFiles
from control import pki

LOOPBACK = ipaddress.ip_address("127.0.0.1")
CORE_NAME = "core.privedge.internal"
BATCH_ID = re.compile(r"^([a-z0-9-]+):(logs|sample):([0-9a-f]{16}):([1-9][0-9]*)$")
FAST = (0.05, 0.4)  # backoff for tests: first delay, cap


# --------------------------------------------------------------------------- a core


class FakeCore:
    """The core's side of PROTOCOL.md, enough to test an edge against."""

    def __init__(self, pki_dir: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(pki_dir / "ca.crt")
        self.ctx.load_cert_chain(pki_dir / "core" / "core.crt", pki_dir / "core" / "core.key")
        self.lock = threading.Lock()
        self.stored: dict[str, list[dict]] = {}    # batch id → records, once
        self.order: list[str] = []                 # ids in the order first stored
        self.attempts: Counter[str] = Counter()    # every request, per id
        self.bodies: dict[str, set[str]] = {}      # id → sha256 of each body received
        self.raw: dict[str, bytes] = {}
        self.duplicates = 0
        self.answers: deque[int] = deque()         # scripted statuses for the next requests
        self.always: int | None = None             # answer this to everything
        self.serials: list[int] = []               # the client certificate of each request
        self.connections = 0
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()

    # -- life cycle

    def start(self) -> FakeCore:
        core = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def server_bind(self) -> None:
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = self.server_address[:2]

            def get_request(self):
                conn, addr = self.socket.accept()
                conn.settimeout(5)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms stalls
                tls = core.ctx.wrap_socket(conn, server_side=True,
                                           do_handshake_on_connect=False)
                with core.lock:
                    core._open.add(tls)
                    core.connections += 1
                return tls, addr

            def shutdown_request(self, request) -> None:
                with core.lock:
                    core._open.discard(request)
                super().shutdown_request(request)

            def handle_error(self, request, client_address) -> None:
                pass

        class Handler(_CoreHandler):
            fake = core

        self._httpd = Server(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True, name="fake-core")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Like a core going away: listener closed, every connection cut."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self.lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self._open.clear()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None

    def restart(self) -> None:
        self.stop()
        self.start()  # same port: allow_reuse_address

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- what arrived

    def records(self, stream: str | None = None) -> list[dict]:
        with self.lock:
            return [r for i in self.order if stream is None or i.split(":")[1] == stream
                    for r in self.stored[i]]

    def answer(self, cn: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        """PROTOCOL.md's table; (status, JSON body)."""
        stream = {"/v1/ingest/logs": "logs", "/v1/ingest/sample": "sample"}.get(path)
        if stream is None:
            return 404, {"error": f"no such path {path}"}
        batch = headers.get("X-Privedge-Batch", "")
        m = BATCH_ID.match(batch)
        if not m or m.group(2) != stream:
            return 400, {"error": f"bad batch id {batch!r}"}
        if f"{m.group(1)}.dc.privedge.internal" != cn:
            return 403, {"error": "batch id names another DC"}
        with self.lock:
            self.attempts[batch] += 1
            self.bodies.setdefault(batch, set()).add(hashlib.sha256(body).hexdigest())
            scripted = self.answers.popleft() if self.answers else self.always
        if scripted is not None and scripted != 200:
            return scripted, {"error": f"scripted {scripted}"}
        if (headers.get("Content-Type") != "application/x-ndjson"
                or headers.get("Content-Encoding") != "gzip"):
            return 400, {"error": "content type or encoding"}
        try:
            text = gzip.decompress(body).decode()
        except (OSError, UnicodeDecodeError):
            return 400, {"error": "not gzip"}
        if not text.endswith("\n"):
            return 400, {"error": "last line has no newline"}
        records = []
        for n, line in enumerate(text[:-1].split("\n"), 1):
            rec = json.loads(line)
            if list(rec) != list(FIELDS[stream]):
                return 400, {"error": f"line {n}: keys {sorted(rec)}"}
            if stream == "sample":
                for k, v in rec.items():
                    if isinstance(v, str) and core_records.is_ip(v):
                        return 400, {"error": f"line {n}: {k} is an address"}
            records.append(rec)
        with self.lock:
            if batch in self.stored:
                self.duplicates += 1
                return 200, {"stored": len(records), "duplicate": True}
            self.stored[batch] = records
            self.raw[batch] = body
            self.order.append(batch)
        return 200, {"stored": len(records), "duplicate": False}


class _CoreHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real core would
    fake: FakeCore

    def setup(self) -> None:
        super().setup()
        self.connection.do_handshake()

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        cert = self.connection.getpeercert()
        cn = dict(x[0] for x in cert["subject"])["commonName"]
        with self.fake.lock:
            self.fake.serials.append(int(cert["serialNumber"], 16))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status, answer = self.fake.answer(cn, self.path, self.headers, body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The network's PKI: agents dus and fra, the core (SAN name + 127.0.0.1)."""
    d = tmp_path_factory.mktemp("pki")
    pki.run(d, pki.plan({"dus": [LOOPBACK], "fra": [LOOPBACK]}, [LOOPBACK], {}))
    return d


def tls_of(net: Path, dc: str = "dus") -> TlsFiles:
    return TlsFiles(net / "agents" / f"{dc}.crt", net / "agents" / f"{dc}.key", net / "ca.crt")


@pytest.fixture()
def core(net: Path) -> Iterator[FakeCore]:
    c = FakeCore(net).start()
    yield c
    c.stop()


@pytest.fixture()
def make_shipper(net: Path) -> Iterator[Callable[..., Shipper]]:
    made: list[Shipper] = []

    def make(url: str, *, start: bool = True, **kw) -> Shipper:
        settings = dict(dc="dus", stream="logs", core="core", url=url, tls=tls_of(net),
                        tls_name=CORE_NAME, batch_records=10, batch_seconds=0.2,
                        backoff=FAST, timeout=3.0)
        settings.update(kw)
        s = Shipper(**settings)
        made.append(s)
        return s.start() if start else s

    yield make
    for s in made:
        s.stop(0.5)
        for t in s.threads:
            assert not t.is_alive(), f"{t.name} still running"


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def log_record(i: int, zone: str = "www") -> tuple:
    return (1_700_000_000.1234 + i, zone, "dus", "GET", "WWW.Example.com", f"/p/{i}?q=é",
            200, 1000 + i, "HIT", "waf_scored", "203.0.113.10", "curl/8.5")


def as_received(i: int, zone: str = "www") -> dict:
    """log_record(i) as the core must decode it."""
    return {"time": round(1_700_000_000.1234 + i, 3), "zone": zone, "dc": "dus",
            "method": "GET", "host": "www.example.com", "path": f"/p/{i}?q=é",
            "status": 200, "bytes": 1000 + i, "cache_status": "hit", "action": "waf_scored",
            "client_ip": "203.0.113.10", "user_agent": "curl/8.5"}


def accounted(st: dict) -> bool:
    """PROTOCOL accounting: every submitted record is in exactly one bucket."""
    return st["submitted"] == st["sent"] + st["dropped"] + st["rejected"] + st["pending_records"]


# --------------------------------------------------------------------------- delivery


def test_records_arrive_in_order_with_exact_fields(core: FakeCore, make_shipper) -> None:
    s = make_shipper(core.url, batch_seconds=30)  # batches by count, the rest by flush
    for i in range(25):
        s.submit(log_record(i))
    assert s.flush(5)
    assert core.records() == [as_received(i) for i in range(25)]
    assert [len(core.stored[i]) for i in core.order] == [10, 10, 5]
    ids = [BATCH_ID.match(i) for i in core.order]
    assert all(ids), core.order
    assert {(m.group(1), m.group(2)) for m in ids} == {("dus", "logs")}
    assert len({m.group(3) for m in ids}) == 1  # one boot
    seqs = [int(m.group(4)) for m in ids]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    for body in core.raw.values():
        assert body[:2] == b"\x1f\x8b"  # gzip
        text = gzip.decompress(body).decode()
        assert text.endswith("\n") and "\n\n" not in text
        assert all(" " not in line.split('"path"')[0] for line in text.splitlines())
    assert core.connections == 1  # one kept-alive connection carried every batch
    st = s.stats()
    assert st == {"submitted": 25, "sent": 25, "batches_sent": 3, "dropped": 0, "rejected": 0,
                  "pending_records": 0, "pending_bytes": 0, "retries": 0, "last_error": ""}


def test_a_partial_batch_goes_after_batch_seconds(core: FakeCore, make_shipper) -> None:
    s = make_shipper(core.url, batch_records=1000, batch_seconds=0.3)
    t0 = time.monotonic()
    for i in range(3):
        s.submit(log_record(i))
    assert wait_for(lambda: len(core.records()) == 3, 3)
    assert 0.25 <= time.monotonic() - t0 < 2.0


def test_sample_records_travel_on_their_own_path(core: FakeCore, make_shipper) -> None:
    s = make_shipper(core.url, stream="sample")
    client, period = Pseudonymizer().pseudonym("203.0.113.10")
    good = (1_700_000_000.5, "dus", "www", "GET", 200, 512, "MISS", "", 12.3456, "TLSv1.3",
            client, period)
    leaky = (*good[:7], "203.0.113.10", *good[8:])  # an address in a sample: never sent
    for rec in (good, leaky, good):
        s.submit(rec)
    assert s.flush(5)
    got = core.records("sample")
    assert len(got) == 2 and list(got[0]) == list(SAMPLE_FIELDS)
    assert got[0]["cache_status"] == "miss" and got[0]["latency_ms"] == 12.346
    assert got[0]["client"] == client and len(client) == 32
    st = s.stats()
    assert (st["sent"], st["rejected"]) == (2, 1) and accounted(st)
    with pytest.raises(RecordError) as e:  # the error names the field, not the address
        ENCODERS["sample"](leaky)
    assert "'action'" in str(e.value) and "203.0.113" not in str(e.value)


def test_a_malformed_record_is_refused_alone(core: FakeCore, make_shipper) -> None:
    s = make_shipper(core.url)
    bad_type = (*log_record(1)[:6], "200", *log_record(1)[7:])
    for rec in (log_record(0), bad_type, ("short",), log_record(2)):
        s.submit(rec)
    assert s.flush(5)
    assert core.records() == [as_received(0), as_received(2)]
    st = s.stats()
    assert (st["submitted"], st["sent"], st["rejected"], st["dropped"]) == (4, 2, 2, 0)
    assert st["last_error"] == ""  # the acked batch after the refusal cleared it
    assert s._in_bytes == s._out_bytes > 0  # submit's size estimate and the encoder's agree


@pytest.mark.parametrize(("index", "value", "field", "why"), [
    (6, "200", "status", "expected an HTTP status"),
    (6, True, "status", "expected an HTTP status"),
    (0, float("nan"), "time", "expected a finite number"),
    (8, "STALE", "cache_status", "expected one of bypass, dynamic, expired"),
    (9, "drop_it", "action", "expected one of"),
    (10, "198.51.100.999", "client_ip", "expected an IPv4 or IPv6 address"),
    (11, None, "user_agent", "expected a string"),
    (7, 2**63, "bytes", "expected an integer from 0 to 2**63 - 1"),
    (0, 2.0**63, "time", "expected a finite number"),
])
def test_the_encoder_names_the_field_and_never_the_value(index: int, value: object,
                                                          field: str, why: str) -> None:
    rec = list(log_record(0))
    rec[index] = value
    with pytest.raises(RecordError) as e:
        ENCODERS["logs"](tuple(rec))
    assert str(e.value).startswith(f"field {field!r}: {why}"), str(e.value)
    assert repr(value) not in str(e.value) or value is None


def _core_rules() -> core_records.Rules:
    return core_records.Rules(dc="dus", now=2_000_000_000.0, zones={"www": {}},
                              retention_days=lambda zone: 100_000)


def test_raw_bytes_in_strings_arrive_as_valid_utf8_percent_escaped() -> None:
    """A string decoded with surrogateescape holds each undecodable byte as a
    lone surrogate, which JSON writes as \\udcXX and the core cannot store as
    UTF-8 (it refuses the whole batch): the edge sends the byte as %XX."""
    raw_path = b"/caf\xc3\xa9/\xff?q=\xe9".decode("utf-8", "surrogateescape")
    rec = list(log_record(0))
    rec[4] = b"www.ex\xe4mple.com".decode("utf-8", "surrogateescape")
    rec[5] = raw_path
    rec[11] = "bot/1 \ud83d"   # a lone high surrogate, not from a byte: U+FFFD
    line = ENCODERS["logs"](tuple(rec))
    assert "\\ud" not in line.lower()
    parsed = core_records.parse_batch("logs", (line + "\n").encode(), _core_rules())
    (records,) = parsed.groups.values()
    stored = core_records.dump_records(records).decode("utf-8")  # the core's store encodes
    got = json.loads(stored)
    assert got["path"] == "/caf\u00e9/%FF?q=%E9"   # valid UTF-8 stays text, the rest %XX
    assert got["host"] == "www.ex%e4mple.com"      # lowercased, like every host
    assert got["user_agent"] == "bot/1 \ufffd"
    # Valid text is left alone, surrogate pairs included (JSON escapes them in pairs).
    assert edge_records.valid_text("é 😀 /x") == "é 😀 /x"
    sample = (1.0, "dus", "w\udcff", "GET", 200, 1, "", "", 1.0, "", "0" * 32, "2024-01-01")
    assert json.loads(ENCODERS["sample"](sample))["zone"] == "w%FF"


def test_integers_the_core_refuses_are_refused_alone_at_the_edge() -> None:
    biggest = (*log_record(0)[:7], 2**63 - 1, *log_record(0)[8:])
    line = ENCODERS["logs"](biggest)
    assert core_records.parse_batch("logs", (line + "\n").encode(), _core_rules()).records == 1
    with pytest.raises(RecordError, match="field 'bytes'"):
        ENCODERS["logs"]((*biggest[:7], 2**63, *biggest[8:]))
    for latency in (float("inf"), 2.0**64, 10**30):
        sample = (1.0, "dus", "www", "GET", 200, 1, "", "", latency, "", "0" * 32,
                  "2024-01-01")
        with pytest.raises(RecordError, match="field 'latency_ms'"):
            ENCODERS["sample"](sample)


def test_the_edges_schema_is_the_cores() -> None:
    """core/records.py checks what agent/logs/records.py writes: one schema,
    declared twice, so held equal here."""
    assert edge_records.LOG_FIELDS == core_records.LOG_KEYS
    assert edge_records.SAMPLE_FIELDS == core_records.SAMPLE_KEYS
    assert edge_records.CACHE_STATUSES == core_records.CACHE_STATUSES
    assert edge_records.TLS_VERSIONS == core_records.TLS_VERSIONS
    # The core checks actions by shape (a newer edge's action is not refused).
    assert all(core_records._ACTION_RE.match(a) for a in edge_records.ACTIONS)


# --------------------------------------------------------------------------- failures


def test_outage_every_record_delivered_exactly_once(core: FakeCore, make_shipper) -> None:
    s = make_shipper(core.url, batch_records=50, batch_seconds=0.1)
    total = 0
    stop = threading.Event()

    def produce() -> None:  # steady submissions, as the event loop would make them
        nonlocal total
        while not stop.is_set():
            for _ in range(20):
                s.submit(log_record(total))
                total += 1
            time.sleep(0.01)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        time.sleep(0.8)
        core.stop()
        time.sleep(3.0)  # the core is away; the edge keeps submitting
        assert s.stats()["retries"] > 0 and s.stats()["last_error"]
        core.start()     # the same port
        time.sleep(0.8)
    finally:
        stop.set()
        producer.join(2)
    assert s.flush(8)
    got = core.records()
    assert len(got) == total and got == [as_received(i) for i in range(total)]
    assert sum(len(core.stored[i]) for i in core.order) == total  # each id stored once
    st = s.stats()
    assert st["dropped"] == 0 and st["sent"] == total == st["submitted"]
    assert st["pending_records"] == 0 and st["last_error"] == ""
    for batch, n in core.attempts.items():
        assert len(core.bodies[batch]) == 1, f"{batch}: {n} attempts, different bodies"


def test_overflow_drops_the_oldest_and_counts_exactly(core: FakeCore, make_shipper) -> None:
    core.stop()  # down from the start: batches pile up in memory
    s = make_shipper(core.url, batch_records=10, batch_seconds=0.05, buffer_bytes=2048)
    n = 400
    for i in range(n):
        s.submit(log_record(i))
        if i % 10 == 9:
            time.sleep(0.002)
    assert wait_for(lambda: not s._records and s._encoding == 0, 5)  # all encoded
    st = s.stats()
    assert st["dropped"] > 0 and st["pending_bytes"] <= 2048 and accounted(st)
    core.start()
    assert s.flush(8)
    got = core.records()
    st = s.stats()
    assert st["dropped"] == n - len(got) and st["sent"] == len(got) > 0
    assert st["pending_records"] == 0 and st["rejected"] == 0 and accounted(st)
    # The oldest went first: what arrived is in order, without repeats.
    paths = [r["path"] for r in got]
    assert paths == sorted(set(paths), key=paths.index)
    assert [int(p.split("/")[2].split("?")[0]) for p in paths] == \
        sorted(int(p.split("/")[2].split("?")[0]) for p in paths)


def test_the_record_queue_is_bounded_in_bytes_too(net: Path, make_shipper) -> None:
    """Records with long request heads reach max_pending_bytes long before
    max_pending_records; either bound drops, and counts, exactly."""
    long_rec = (*log_record(0)[:5], "/" + "a" * 9_999, *log_record(0)[6:])
    short = log_record(1)
    s = make_shipper("https://127.0.0.1:9", start=False, max_pending_records=1000,
                     max_pending_bytes=1)
    big = s.record_bytes(long_rec)
    assert big == RECORD_BYTES + len("WWW.Example.com") + 10_000 + len("curl/8.5")
    s = make_shipper("https://127.0.0.1:9", start=False, max_pending_records=1000,
                     max_pending_bytes=3 * big + s.record_bytes(short) - 1)
    for _ in range(5):
        s.submit(long_rec)
    st = s.stats()
    assert (st["submitted"], st["dropped"], st["pending_records"]) == (5, 2, 3)
    s.submit(short)   # one byte too many
    s.submit(("malformed",))  # sized RECORD_BYTES, refused later by the encoder
    st = s.stats()
    assert (st["submitted"], st["dropped"], st["pending_records"]) == (7, 3, 4)
    s._cut(2)  # the encoder takes two: their bytes are free again
    s.submit(long_rec)
    s.submit(long_rec)
    s.submit(long_rec)
    st = s.stats()
    assert (st["submitted"], st["dropped"], st["pending_records"]) == (10, 4, 6)
    s.stop(0.1)
    assert s._in_bytes == s._out_bytes
    st = s.stats()
    assert (st["dropped"] + st["rejected"], st["pending_records"]) == (10, 0)


def test_the_record_queue_bound_drops_exactly(net: Path, make_shipper) -> None:
    s = make_shipper("https://127.0.0.1:9", start=False, max_pending_records=7)
    for i in range(12):
        s.submit(log_record(i))
    st = s.stats()
    assert (st["submitted"], st["dropped"], st["pending_records"]) == (12, 5, 7)
    s.stop(0.1)  # never started: what is left is dropped, and counted
    s.submit(log_record(99))
    st = s.stats()
    assert (st["submitted"], st["dropped"], st["pending_records"]) == (13, 13, 0)


@pytest.mark.parametrize("status", [400, 413])
def test_a_rejected_batch_is_counted_and_later_ones_delivered(core: FakeCore, make_shipper,
                                                             status: int) -> None:
    core.answers.extend([200, status])
    s = make_shipper(core.url, batch_seconds=30)
    for i in range(30):
        s.submit(log_record(i))
    assert s.flush(5)
    assert core.records() == [as_received(i) for i in (*range(10), *range(20, 30))]
    st = s.stats()
    assert (st["sent"], st["rejected"], st["dropped"], st["retries"]) == (20, 10, 0, 0)
    assert st["batches_sent"] == 2 and accounted(st)
    assert sum(core.attempts.values()) == 3  # the rejected batch was not sent again


def test_503_is_retried_with_the_same_id_and_body(core: FakeCore, make_shipper) -> None:
    core.answers.extend([503, 503])
    s = make_shipper(core.url)
    for i in range(10):
        s.submit(log_record(i))
    assert s.flush(5)
    (batch,) = core.order
    assert core.attempts[batch] == 3 and len(core.bodies[batch]) == 1
    assert core.records() == [as_received(i) for i in range(10)]
    st = s.stats()
    assert (st["sent"], st["retries"], st["dropped"], st["last_error"]) == (10, 2, 0, "")


def test_a_duplicate_answer_counts_as_delivered(core: FakeCore, make_shipper) -> None:
    """A batch stored whose answer was lost comes again: stored once, acked."""
    s = make_shipper(core.url)
    for i in range(10):
        s.submit(log_record(i))
    assert s.flush(5)
    (batch,) = core.order
    status, answer = core.answer("dus.dc.privedge.internal", "/v1/ingest/logs",
                                 {"X-Privedge-Batch": batch,
                                  "Content-Type": "application/x-ndjson",
                                  "Content-Encoding": "gzip"}, core.raw[batch])
    assert (status, answer["duplicate"]) == (200, True) and len(core.records()) == 10


def test_403_for_another_dcs_certificate_is_retried(net: Path, core: FakeCore,
                                                    make_shipper) -> None:
    s = make_shipper(core.url, dc="fra", tls=tls_of(net, "dus"))  # ids say fra, cert says dus
    s.submit(log_record(0))
    assert wait_for(lambda: s.stats()["retries"] >= 2, 5)
    st = s.stats()
    assert st["sent"] == 0 and st["pending_records"] == 1 and "HTTP 403" in st["last_error"]
    assert core.records() == []


def test_the_core_is_verified_by_name(core: FakeCore, make_shipper) -> None:
    s = make_shipper(core.url, tls_name="other.privedge.internal")
    s.submit(log_record(0))
    assert wait_for(lambda: s.stats()["retries"] >= 1, 5)
    assert "certificate" in s.stats()["last_error"].lower()
    assert core.records() == [] and core.attempts == Counter()
    # The core's address is in its certificate too: a URL by IP, checked by IP, works.
    ok = make_shipper(core.url, tls_name=None)
    ok.submit(log_record(1))
    assert ok.flush(5) and core.records() == [as_received(1)]


def test_a_reload_presents_the_reissued_certificate(tmp_path: Path, make_shipper) -> None:
    d = tmp_path / "pki"
    parties = pki.plan({"dus": [LOOPBACK]}, [LOOPBACK], {})
    pki.run(d, parties)
    c = FakeCore(d).start()
    try:
        s = make_shipper(c.url, tls=tls_of(d))
        s.submit(log_record(0))
        assert s.flush(5)
        pki.run(d, parties, rotate=True)
        s.reload()
        s.submit(log_record(1))
        assert s.flush(5)
        new = x509.load_pem_x509_certificate((d / "agents" / "dus.crt").read_bytes()
                                             ).serial_number
        assert len(c.serials) == 2 and c.serials[0] != c.serials[1] == new
        assert c.records() == [as_received(0), as_received(1)]
    finally:
        c.stop()


def test_stop_drops_what_is_left_and_counts_it(core: FakeCore, make_shipper) -> None:
    core.stop()
    s = make_shipper(core.url)
    for i in range(25):
        s.submit(log_record(i))
    t0 = time.monotonic()
    s.stop(0.5)
    assert time.monotonic() - t0 < 2.0
    assert all(not t.is_alive() for t in s.threads)
    st = s.stats()
    assert (st["submitted"], st["dropped"], st["sent"], st["pending_records"]) == (25, 25, 0, 0)


def _full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its accept queue filled: a connect to it
    gets no SYN-ACK and waits for its whole timeout, like a swamped core."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(listener.getsockname())
        fillers.append(c)
    time.sleep(0.1)
    return listener, fillers


def test_stop_ends_a_sender_stuck_connecting_and_drops_its_batch(make_shipper,
                                                                  caplog) -> None:
    listener, fillers = _full_backlog()
    try:
        port = listener.getsockname()[1]
        s = make_shipper(f"https://127.0.0.1:{port}", timeout=30.0)
        for i in range(25):
            s.submit(log_record(i))
        assert wait_for(lambda: s._inflight is not None and s._conn is not None
                        and s._conn.raw is not None, 5)
        time.sleep(0.1)  # in connect()
        caplog.clear()
        t0 = time.monotonic()
        s.stop(0.2)
        for t in s.threads:
            t.join(5)
        assert time.monotonic() - t0 < 5  # woken, not waiting out its 30 s timeout
        assert not any(t.is_alive() for t in s.threads)
        st = s.stats()
        assert st["pending_records"] == 0 and st["pending_bytes"] == 0
        assert (st["submitted"], st["sent"], st["dropped"]) == (25, 0, 25) and accounted(st)
        assert st["retries"] == 0
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    finally:
        for c in (listener, *fillers):
            c.close()


@pytest.mark.parametrize(("answer", "sent"), [(0, 0), (503, 0), (200, 10)])
def test_a_sender_stuck_past_stops_timeout_settles_when_it_ends(
        make_shipper, caplog, answer: int, sent: int) -> None:
    """A sender that stop() cannot wake (here: its attempt blocks on an event)
    keeps its batch in flight until it ends; then the batch counts as sent
    (200) or dropped (anything else, not retried, no retry warning)."""
    release = threading.Event()
    s = make_shipper("https://127.0.0.1:9", start=False)

    def attempt(batch, gen) -> tuple[int, str]:
        release.wait(10)
        return answer, "" if answer == 200 else "ConnectionRefusedError"

    s._attempt = attempt
    s.start()
    for i in range(25):
        s.submit(log_record(i))
    assert wait_for(lambda: s._inflight is not None, 5)
    caplog.clear()
    s.stop(0.2)
    sender = s.threads[1]
    assert sender.is_alive()
    st = s.stats()
    assert st["pending_records"] == 10 and st["dropped"] == 15 and accounted(st)
    release.set()
    sender.join(5)
    assert not sender.is_alive()
    st = s.stats()
    assert st["pending_records"] == 0 and st["pending_bytes"] == 0 and accounted(st)
    assert (st["sent"], st["dropped"], st["retries"]) == (sent, 25 - sent, 0)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_an_encoder_ending_after_stop_queues_nothing(make_shipper) -> None:
    """Records the encoder held when stop() gave up waiting are dropped when
    it ends, not left queued for a sender that is gone."""
    release = threading.Event()
    s = make_shipper("https://127.0.0.1:9", start=False)
    encode = s._encode

    def slow(record: tuple) -> str:
        release.wait(10)
        return encode(record)

    s._encode = slow
    s.start()
    for i in range(10):
        s.submit(log_record(i))
    assert wait_for(lambda: s._encoding == 10, 5)
    s.stop(0.2)
    encoder, sender = s.threads
    assert encoder.is_alive() and not sender.is_alive()
    release.set()
    encoder.join(5)
    st = s.stats()
    assert (st["submitted"], st["dropped"], st["pending_records"]) == (10, 10, 0)
    assert not s._batches and st["pending_bytes"] == 0


def test_cut_takes_only_what_is_there(make_shipper) -> None:
    """The encoder reads the queue's length before it takes the lock; stop()
    may empty the queue in between."""
    s = make_shipper("https://127.0.0.1:9", start=False)
    s.submit(log_record(0))
    s._cut(10)
    s._cut(5)
    assert s._taken == 1 and len(s._batches) == 1


# --------------------------------------------------------------------------- no disk

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_WRITES = {"os.rename", "os.remove", "os.mkdir", "os.symlink", "os.link", "os.truncate",
           "shutil.copyfile", "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp"}
_watch: list[str] | None = None  # while a test watches: what the shipper's threads wrote
_hook_lock = threading.Lock()
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if _watch is None or not threading.current_thread().name.startswith("privedge-logs"):
        return
    if event == "open":
        _path, mode, flags = args
        if (isinstance(mode, str) and set(mode) & set("wax+")) or \
                (isinstance(flags, int) and flags & _WRITE_FLAGS):
            _watch.append(f"open {args!r}")
    elif event in _WRITES:
        _watch.append(f"{event} {args!r}")


def test_nothing_is_written_while_shipping(tmp_path: Path, monkeypatch, core: FakeCore,
                                           make_shipper) -> None:
    """Invariant 5: records, batches, retries and reconnections stay in memory.
    An audit hook (every open() and os.open() of any thread raises one) logs
    each write the shipper's threads attempt; the working directory stays empty."""
    global _watch, _hooked
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with _hook_lock:
        if not _hooked:
            sys.addaudithook(_audit)  # cannot be removed: _watch switches it off
            _hooked = True
    _watch = []
    try:
        probe = threading.Thread(target=lambda: (tmp_path / "probe").write_text("x"),
                                 name="privedge-logs-probe")
        probe.start()
        probe.join()
        assert len(_watch) == 1 and "probe" in _watch[0]  # the watch sees a write
        _watch.clear()
        s = make_shipper(core.url, stream="logs")
        core.answers.extend([503])
        for i in range(35):
            s.submit(log_record(i))
        assert s.flush(5)
        core.restart()  # a reconnection, too
        for i in range(35, 50):
            s.submit(log_record(i))
        assert s.flush(5)
        s.stop(1)
        assert len(core.records()) == 50
        assert _watch == []
    finally:
        _watch = None
    assert list(cwd.iterdir()) == []


# --------------------------------------------------------------------------- routing


EXAMPLE = logs_config.__doc__.split("\n\n")[1]  # the module docstring's logs.yaml


def _cfg(net: Path, **over) -> LogsConfig:
    data = yaml.safe_load(EXAMPLE)
    data.update(cert=str(net / "agents" / "dus.crt"), key=str(net / "agents" / "dus.key"),
                ca=str(net / "ca.crt"))
    data.update(over)
    return parse_logs_config(data, "logs.yaml")


class _Fake:
    def __init__(self, stream: str, core: str) -> None:
        self.stream, self.core, self.got = stream, core, []

    def submit(self, record: tuple) -> None:
        self.got.append(record)


def test_the_docstring_example_is_valid(tmp_path: Path, net: Path) -> None:
    p = tmp_path / "logs.yaml"
    p.write_text(EXAMPLE)
    cfg = load_logs_config(p)
    assert cfg.dc == "dus" and cfg.sample.rate == 0.01 and cfg.log_core("shop-eu") == "core-eu"
    assert cfg.log_core("www") == "core" and cfg.log_core("blog") is None
    assert cfg.cores["core"].tls_name == CORE_NAME


def test_a_regional_zone_goes_only_to_its_regions_core(net: Path) -> None:
    fakes: dict[tuple[str, str], _Fake] = {}
    router = LogRouter(_cfg(net), lambda cfg, stream, core: fakes.setdefault(
        (stream, core), _Fake(stream, core)))
    assert router.log("shop-eu", log_record(1, "shop-eu"))
    assert router.log("www", log_record(2))
    assert not router.log("blog", log_record(3, "blog"))       # enabled: false
    assert not router.log("unlisted", log_record(4))            # logs are opt-in
    assert router.sample(("s",))
    assert [r[1] for r in fakes["logs", "core-eu"].got] == ["shop-eu"]
    assert [r[1] for r in fakes["logs", "core"].got] == ["www"]
    assert fakes["sample", "core"].got == [("s",)]
    assert router.submitter("www") == fakes["logs", "core"].submit
    assert router.submitter("blog") is None


def test_a_regional_zone_without_its_core_is_a_config_error(net: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(net, zones={"www": {}, "shop-ap": {"log_region": "ap"}})
    msg = str(e.value)
    assert msg.startswith("logs.yaml: zones.shop-ap.log_region: 'ap': no core serves "
                          "region ap (core-eu: eu)"), msg
    assert "never go to another region's core" in msg
    # A config made without validation is checked again by the router.
    good = _cfg(net)
    bad = LogsConfig.model_construct(**{**dict(good), "zones": {
        "shop-ap": logs_config.ZoneLogs(log_region="ap")}})
    with pytest.raises(ConfigError, match=r"zones\.shop-ap\.log_region"):
        LogRouter(bad, lambda cfg, stream, core: _Fake(stream, core))


def test_the_serve_configs_regions_bind_the_logs(net: Path) -> None:
    with pytest.raises(ConfigError, match=r"zones\.www\.log_region: None: zone www is "
                                          r"restricted to region eu"):
        LogRouter(_cfg(net), lambda cfg, stream, core: _Fake(stream, core),
                  zone_regions={"www": "eu", "shop-eu": "eu"})
    LogRouter(_cfg(net), lambda cfg, stream, core: _Fake(stream, core),
              zone_regions={"www": None, "shop-eu": "eu"})


@pytest.mark.parametrize(("over", "error"), [
    ({"cores": {"core": {"url": "http://198.18.0.10:8443"}}},
     "logs.yaml: cores.core.url: 'http://198.18.0.10:8443': expected https://HOST[:PORT]"),
    ({"sample": {"core": "nope"}}, "logs.yaml: sample.core: 'nope': not a core (cores: "),
    ({"default_core": "nope"}, "logs.yaml: default_core: 'nope': not a core"),
    ({"cores": {"a": {"url": "https://x", "regions": ["eu"]},
                "b": {"url": "https://y", "regions": ["eu"]}}, "default_core": "a",
      "sample": {"core": "a"}},
     "logs.yaml: zones.shop-eu.log_region: 'eu': served by several cores (a, b)"),
    ({"batch_records": 0}, "logs.yaml: batch_records: 0: Input should be greater than"),
    ({"dc": "Dus:1"}, "logs.yaml: dc: 'Dus:1': 'Dus:1' is not a name"),
    ({"batch_records": 100, "max_pending_records": 10},
     "logs.yaml: batch_records: 100: must not exceed max_pending_records (10)"),
    ({"max_pending_bytes": 1000},
     "logs.yaml: max_pending_bytes: 1000: Input should be greater than or equal to 1048576"),
    ({"zones": {"www": {"log_region": "eu", "enabled": "maybe"}}},
     "logs.yaml: zones.www.enabled: 'maybe': Input should be a valid boolean"),
])
def test_invalid_configs_name_path_value_and_why(net: Path, over: dict, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(net, **over)
    assert error in str(e.value), str(e.value)


def test_the_certificate_must_name_the_dc(net: Path) -> None:
    check_identity(_cfg(net))
    with pytest.raises(ConfigError, match=r"subject CN dus\.dc\.privedge\.internal, but dc "
                                          r"is 'fra'"):
        check_identity(_cfg(net, dc="fra"))


class _Recorder:
    def __init__(self, stream: str, core: str, calls: list) -> None:
        self.name, self.calls = f"{stream}/{core}", calls

    def submit(self, record: tuple) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        self.calls.append(("flush", self.name))
        return True

    def stop(self, timeout: float, flush_first: bool = True) -> None:
        self.calls.append(("stop", self.name, flush_first))


def test_router_stop_flushes_once_for_all(net: Path) -> None:
    calls: list = []
    router = LogRouter(_cfg(net), lambda cfg, stream, core: _Recorder(stream, core, calls))
    router.stop(1.0)
    names = [call[1] for call in calls if call[0] == "flush"]
    assert sorted(names) == ["logs/core", "logs/core-eu", "sample/core"]
    assert calls[:3] == [("flush", n) for n in names]    # one shared flush first
    assert sorted(calls[3:]) == [("stop", n, False) for n in sorted(names)]  # no second


def test_max_pending_bytes_reaches_the_shipper(net: Path) -> None:
    assert _cfg(net).max_pending_bytes == 64 << 20
    shipper = router_mod.make_shipper(_cfg(net, max_pending_bytes=1 << 21), "logs", "core")
    assert shipper._max_bytes == 1 << 21


def test_one_tls_client_context_for_the_agent() -> None:
    """agent/metrics/tls.py's, for the RTT probes and the log shippers alike."""
    assert rtt.client_context is tls.client_context
    assert router_mod.client_context is shipper_mod.client_context is tls.client_context


def test_router_end_to_end_keeps_regions_apart(net: Path, make_shipper) -> None:
    world, eu = FakeCore(net).start(), FakeCore(net).start()
    router = None
    try:
        cfg = _cfg(net, cores={"core": {"url": world.url, "tls_name": CORE_NAME},
                               "core-eu": {"url": eu.url, "regions": ["eu"]}},
                   batch_seconds=0.1)
        router = LogRouter(cfg, zone_regions={"www": None, "shop-eu": "eu"}).start()
        for i in range(5):
            router.log("www", log_record(i))
            router.log("shop-eu", log_record(i, "shop-eu"))
        client, period = Pseudonymizer().pseudonym("2001:db8::1")
        router.sample((1.0, "dus", "shop-eu", "GET", 200, 1, "", "", 1.0, "", client, period))
        assert router.flush(5)
        assert {r["zone"] for r in eu.records()} == {"shop-eu"} and len(eu.records()) == 5
        assert {r["zone"] for r in world.records("logs")} == {"www"}
        assert len(world.records("sample")) == 1 and eu.records("sample") == []
        rows = {(stream, core): st for stream, core, st in router.stats()}
        assert rows["logs", "core-eu"]["sent"] == 5 and rows["sample", "core"]["sent"] == 1
    finally:
        if router is not None:
            router.stop(1)
        world.stop()
        eu.stop()


# --------------------------------------------------------------------------- metrics


class _Stats:
    def stats(self) -> list[tuple[str, str, dict[str, int | str]]]:
        return [("logs", "core-eu", {"submitted": 7, "sent": 5, "dropped": 1, "rejected": 1,
                                     "batches_sent": 1, "retries": 3, "pending_records": 0,
                                     "pending_bytes": 0, "last_error": "x"}),
                ("sample", "core", {"submitted": 2, "sent": 2, "dropped": 0, "rejected": 0,
                                    "batches_sent": 1, "retries": 0, "pending_records": 0,
                                    "pending_bytes": 0, "last_error": ""})]


def test_the_collector_exports_counts_by_stream_and_core() -> None:
    reg = CollectorRegistry()
    reg.register(LogsCollector(_Stats))
    get = reg.get_sample_value
    assert get("privedge_logs_records_submitted_total", {"stream": "logs", "core": "core-eu"}) == 7
    assert get("privedge_logs_records_sent_total", {"stream": "sample", "core": "core"}) == 2
    assert get("privedge_logs_records_dropped_total", {"stream": "logs", "core": "core-eu"}) == 1
    assert get("privedge_logs_records_rejected_total", {"stream": "logs", "core": "core-eu"}) == 1
    assert get("privedge_logs_retries_total", {"stream": "logs", "core": "core-eu"}) == 3
    assert get("privedge_logs_pending_records", {"stream": "logs", "core": "core-eu"}) == 0
    assert get("privedge_logs_pending_bytes", {"stream": "sample", "core": "core"}) == 0
    labels = {k for fam in reg.collect() for s in fam.samples for k in s.labels}
    assert labels == {"stream", "core"}
    empty = CollectorRegistry()
    empty.register(LogsCollector(lambda: None))
    assert empty.get_sample_value("privedge_logs_records_sent_total",
                                  {"stream": "logs", "core": "core"}) is None


def test_the_collectors_labels_need_the_allowlist() -> None:
    """`stream` and `core` are not (yet) on agent/metrics/registry.py LABELS."""
    if not {"stream", "core"} <= LABELS:
        with pytest.raises(MetricsError, match="stream"):
            AllowlistRegistry().register(LogsCollector(_Stats))
    reg = AllowlistRegistry(LABELS | {"stream", "core"})
    reg.register(LogsCollector(_Stats))
    assert len(list(reg.collect())) == 8


def test_log_fields_match_the_protocol() -> None:
    protocol = (Path(__file__).resolve().parents[2] / "core" / "PROTOCOL.md").read_text()
    logs_part, sample_part = protocol.split("## Log record")[1].split("## Sample record")
    assert tuple(re.findall(r"^\| `(\w+)` \|", logs_part, re.M)) == LOG_FIELDS
    sample_keys = [k for row in re.findall(r"^\| (`[^|]+) \|", sample_part, re.M)
                   for k in re.findall(r"`(\w+)`", row)]
    assert sorted(sample_keys) == sorted(SAMPLE_FIELDS)
