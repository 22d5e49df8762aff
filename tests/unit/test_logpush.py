"""core/logpush.py: a zone's stored records pushed on to a customer's HTTPS
endpoint (a real one on loopback, with its own CA): selected fields only,
sampled, at least once through an outage, resumed from the cursor."""

from __future__ import annotations

import gzip
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from control import pki
from core.config import parse_config
from core.server import CoreServer
from tests.unit.test_logstore import base_config, log_record, net_pki, post  # noqa: F401

TIMEOUT = 10.0


class Customer:
    """An HTTPS endpoint that keeps what it is sent; `fail` answers 503."""

    def __init__(self, dir: Path, port: int = 0) -> None:
        ca, ca_key = pki.load_or_make_ca(dir, "customer CA", "customer")
        cert, key = pki.issue(ca, ca_key, "logs.customer.example",
                              ips=[ipaddress.ip_address("127.0.0.1")], organization="customer")
        pki.write_pair(dir / "server", cert, key)
        self.ca = dir / "ca.crt"
        self.batches: list[list[dict]] = []
        self.headers: list[dict[str, str]] = []
        self.attempts = 0
        self.fail = False
        self._lock = threading.Lock()
        customer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with customer._lock:
                    customer.attempts += 1
                    fail = customer.fail
                    if not fail:
                        lines = gzip.decompress(body).splitlines()
                        customer.batches.append([json.loads(x) for x in lines])
                        customer.headers.append(dict(self.headers))
                self.send_response(503 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(dir / "server.crt", dir / "server.key")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
        self.httpd.daemon_threads = True
        self.httpd.allow_reuse_address = True
        self.httpd.server_bind()
        self.httpd.server_activate()
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def records(self) -> list[dict]:
        with self._lock:
            return [r for b in self.batches for r in b]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(TIMEOUT)


@pytest.fixture()
def customers(tmp_path: Path) -> Iterator[Callable[..., Customer]]:
    made: list[Customer] = []

    def make(port: int = 0) -> Customer:
        c = Customer(tmp_path / "customer", port)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture()
def start_core(tmp_path: Path, net_pki: Path) -> Iterator[Callable[..., CoreServer]]:  # noqa: F811
    started: list[CoreServer] = []

    def start(job: dict) -> CoreServer:
        job = {"name": "siem", "retry_initial": 0.05, "retry_max": 0.2, **job}
        cfg = parse_config(base_config(tmp_path, net_pki, zones={
            "www": {"logpush": [job]}, "blog": {}}))
        server = CoreServer(cfg).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


def wait_for(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_selected_fields_only_in_batches_of_max_records(start_core, customers,
                                                        net_pki: Path) -> None:  # noqa: F811
    customer = customers()
    core = start_core({"url": f"https://127.0.0.1:{customer.port}/in?k=1",
                       "ca_file": str(customer.ca), "fields": ["time", "status", "path"],
                       "max_records": 10, "max_seconds": 0.2,
                       "headers": {"Authorization": "Bearer t0ken"}})
    records = [log_record("www", i=i) for i in range(23)] + [log_record("blog")]
    assert post(core.port, net_pki, records)[0] == 200
    wait_for(lambda: len(customer.records) == 23)
    assert [len(b) for b in customer.batches] == [10, 10, 3]
    assert customer.records == [{"time": r["time"], "status": r["status"], "path": r["path"]}
                                for r in records[:23]]
    h = customer.headers[0]
    assert h["Authorization"] == "Bearer t0ken"
    assert (h["Content-Type"], h["Content-Encoding"]) == ("application/x-ndjson", "gzip")


def test_sampling_keeps_about_the_rate(start_core, customers, net_pki: Path) -> None:  # noqa: F811
    customer = customers()
    core = start_core({"url": f"https://127.0.0.1:{customer.port}/", "ca_file":
                       str(customer.ca), "fields": ["bytes"], "sample_rate": 0.25,
                       "max_records": 5000, "max_seconds": 0.2})
    for _ in range(4):
        assert post(core.port, net_pki, [log_record("www", i=i) for i in range(1000)])[0] == 200
    deadline = time.monotonic() + TIMEOUT
    while core.logpush.stats()["www"]["siem"]["cursor_seq"] < 4 and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    wait_for(lambda: core.logpush.stats()["www"]["siem"]["backlog_chunks"] == 0)
    time.sleep(0.3)   # the last partial batch goes after max_seconds
    n = len(customer.records)
    # 4000 records at 0.25: mean 1000, sd about 27; 800..1200 is over 7 sd.
    assert 800 <= n <= 1200, n
    assert all(set(r) == {"bytes"} for r in customer.records)


def test_an_outage_is_retried_and_never_blocks_ingest(start_core, customers,
                                                      net_pki: Path) -> None:  # noqa: F811
    # The endpoint is down (connection refused) when the records come...
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = customers()   # only for its CA: the same directory is reused
    core = start_core({"url": f"https://127.0.0.1:{port}/", "ca_file": str(probe.ca),
                       "max_records": 100, "max_seconds": 0.1})
    t0 = time.monotonic()
    for k in range(3):
        assert post(core.port, net_pki, [log_record("www", i=k * 10 + i) for i in range(10)]
                    )[0] == 200
    assert time.monotonic() - t0 < 3, "ingest waited for the push"
    wait_for(lambda: core.logpush.stats()["www"]["siem"]["failures"] >= 2)
    # ... then answers 503 for a while, then comes back.
    customer = customers(port)
    customer.fail = True
    wait_for(lambda: customer.attempts >= 2)
    customer.fail = False
    wait_for(lambda: len(customer.records) == 30)
    assert sorted(r["bytes"] for r in customer.records) == [1234 + i for i in range(30)]
    assert core.logpush.stats()["www"]["siem"]["last_error"] == ""


def test_a_restart_resumes_from_the_cursor(start_core, customers,
                                           net_pki: Path) -> None:  # noqa: F811
    customer = customers()
    job = {"url": f"https://127.0.0.1:{customer.port}/", "ca_file": str(customer.ca),
           "fields": ["bytes"], "max_records": 100, "max_seconds": 0.1}
    core = start_core(job)
    assert post(core.port, net_pki, [log_record("www", i=i) for i in range(5)])[0] == 200
    wait_for(lambda: len(customer.records) == 5)
    customer.fail = True
    assert post(core.port, net_pki, [log_record("www", i=i) for i in range(5, 12)])[0] == 200
    wait_for(lambda: customer.attempts >= 3)
    core.stop()                       # stopped with the second batch undelivered
    customer.fail = False
    attempts = customer.attempts
    core = start_core(job)
    wait_for(lambda: len(customer.records) == 12)
    time.sleep(0.3)                   # nothing else arrives: no re-push of the first
    assert [r["bytes"] for r in customer.records] == [1234 + i for i in range(12)]
    assert customer.attempts == attempts + 1
    cursor = json.loads((core.config.data_dir / "logpush" / "www" / "siem.cursor").read_text())
    assert set(cursor) == {"seq", "day", "offset"}
