"""core/logpush.py: a zone's stored records pushed on to a customer's HTTPS
endpoint (a real one on loopback, with its own CA): selected fields only,
sampled, at least once through an outage, resumed from the cursor."""

from __future__ import annotations

import contextlib
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
from core import logpush
from core.config import parse_config
from core.logpush import Position
from core.server import CoreServer
from tests.unit.test_logstore import (  # noqa: F401
    DAY,
    Clock,
    base_config,
    log_record,
    net_pki,
    post,
)

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

    def start(*jobs: dict, clock: Callable[[], float] = time.time) -> CoreServer:
        jobs = tuple({"name": "siem", "retry_initial": 0.05, "retry_max": 0.2, **job}
                     for job in jobs)
        cfg = parse_config(base_config(tmp_path, net_pki, zones={
            "www": {"logpush": list(jobs)}, "blog": {}}))
        server = CoreServer(cfg, clock=clock).start()
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
    # Caught up: every chunk read, the last partial batch (after max_seconds) sent.
    wait_for(lambda: (s := core.logpush.stats()["www"]["siem"])["cursor_seq"] >= 4
             and s["caught_up"])
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


def siem(pusher_core: CoreServer, name: str = "siem") -> dict:
    return pusher_core.logpush.stats()["www"][name]


def test_an_outage_holds_a_page_of_chunks_not_a_queue(start_core, customers, net_pki: Path,  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While the endpoint is down a job holds one batch and at most a page
    of listed chunks, however many are committed; back up, it pages through
    the store after its cursor and delivers every record once, in order."""
    monkeypatch.setattr(logpush, "PAGE", 16)
    customer = customers()
    customer.fail = True
    core = start_core({"url": f"https://127.0.0.1:{customer.port}/", "ca_file":
                       str(customer.ca), "fields": ["bytes"], "max_records": 5,
                       "max_seconds": 0.05})
    for i in range(53):
        assert post(core.port, net_pki, [log_record("www", i=i)])[0] == 200
        assert siem(core)["listed_chunks"] <= 16
        assert siem(core)["buffered_records"] <= 5
    wait_for(lambda: customer.attempts >= 2)
    assert siem(core)["offered_seq"] == 53
    customer.fail = False
    wait_for(lambda: siem(core)["caught_up"])
    assert [r["bytes"] for r in customer.records] == [1234 + i for i in range(53)]
    assert siem(core)["records"] == 53


def test_records_swept_while_retried_are_dropped_and_counted(start_core, customers,
                                                             net_pki: Path) -> None:  # noqa: F811
    clock = Clock()
    customer = customers()
    customer.fail = True
    core = start_core({"url": f"https://127.0.0.1:{customer.port}/", "ca_file":
                       str(customer.ca), "fields": ["bytes"], "max_seconds": 0.05},
                      clock=clock)
    assert post(core.port, net_pki, [log_record("www", clock.now, i=i) for i in range(3)]
                )[0] == 200
    wait_for(lambda: customer.attempts >= 1)
    clock.now += 8 * DAY   # past www's 7 days: the sweep takes the day (and its key)
    assert len(core.sweep().removed) == 1
    wait_for(lambda: siem(core)["skipped_records"] == 3)
    customer.fail = False
    assert post(core.port, net_pki, [log_record("www", clock.now, i=7)])[0] == 200
    wait_for(lambda: len(customer.records) == 1)
    assert customer.records == [{"bytes": 1241}]
    assert siem(core)["records"] == 1


def test_stop_cuts_requests_in_flight_and_waits_once(start_core, customers, net_pki: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """Two jobs each in a request to an endpoint that never answers (a 60 s
    timeout): stop() cuts both at once instead of waiting for each in turn,
    and no cursor moves."""
    probe = customers()   # for its CA only
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(hung.accept()[0])   # and never a byte back

    threading.Thread(target=accept, daemon=True).start()
    url = f"https://127.0.0.1:{hung.getsockname()[1]}/"
    core = start_core(*({"name": n, "url": url, "ca_file": str(probe.ca), "timeout": 60,
                         "max_seconds": 0.05} for n in ("siem", "archive")))
    state = core.config.data_dir / "logpush" / "www"
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    assert post(core.port, net_pki, [log_record("www")])[0] == 200
    wait_for(lambda: len(accepted) >= 2)
    t0 = time.monotonic()
    core.stop()
    assert time.monotonic() - t0 < 3
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    # Once the store is closed a job writes no cursor.
    pusher = core.logpush.pushers["www"][0]
    pusher._save_cursor(Position(99, "2024-01-01", 0))
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    hung.close()
    for s in accepted:
        s.close()
