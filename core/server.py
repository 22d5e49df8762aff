"""The core's HTTPS API: edges send batches, zones read their logs, operators look.

    server = CoreServer(load_config("core.yaml")).start()   # binds; .port when 0
    server.reload()    # SIGHUP: reissued certificate and CA; keeps the old on failure
    server.sweep()     # a retention sweep now
    server.stop()

Every client shows a certificate from the network's CA (control/pki.py);
who it is comes from the certificate alone:

    agent     CN <dc>.dc.privedge.internal, no OU   POST /v1/ingest/logs, /v1/ingest/sample
    zone      OU zone, CN <zone>.zone.privedge.internal   GET /v1/zones/<zone>/logs?day=
    operator  OU viewer, operator or admin          GET /v1/sample?day=, GET /v1/stats

A client without a certificate completes the handshake (so it can be told
why) and is answered 403 everywhere. The ingest contract is
core/PROTOCOL.md. Nothing about a request is logged: no access log, and a
failure while serving one is printed as its type and code location only
(control/tlshttp.py). At most MAX_CONNECTIONS connections are served at
once and MAX_INGESTS batches are taken in at once (503 above: the edge
retries), which bounds the memory ingests use to about MAX_INGESTS times a
few max_expanded_bytes. Used by core/cli.py; tests start it in-process
with port 0.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from agent.metrics.server import TlsFiles
from agent.metrics.server import server_context as tls_server_context
from control.pki import DOMAIN, ROLES, ZONE_UNIT
from control.tlshttp import HeadDeadline, TlsHttpServer, failure_summary
from core.batch import BatchId, BodyError, gunzip
from core.config import CoreConfig
from core.crypto import load_master_key
from core.logpush import Logpush
from core.records import RecordError, day_number
from core.store import Store, StoreUnavailable, SweepReport

MAX_CONNECTIONS = 64    # served at once (an edge keeps one or two; zones and operators few)
MAX_INGESTS = 4         # batches taken in at once; each may hold several max_expanded_bytes
_AGENT_CN = re.compile(r"^([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\.dc\." + re.escape(DOMAIN) + "$")
_ZONE_CN = re.compile(r"^([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\." + ZONE_UNIT + r"\."
                      + re.escape(DOMAIN) + "$")
_ZONE_PATH = re.compile(r"^/v1/zones/([^/]+)/logs$")
_INGEST = {"/v1/ingest/logs": "logs", "/v1/ingest/sample": "sample"}


@dataclass(frozen=True)
class Identity:
    kind: str    # agent, zone, operator, other, none
    name: str    # the DC, the zone, the operator's name; "" for other and none


def identify(peer: dict | None) -> Identity:
    """Who a verified client certificate (ssl's getpeercert()) belongs to."""
    if not peer:
        return Identity("none", "")
    attrs: dict[str, list[str]] = {}
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            attrs.setdefault(key, []).append(value)
    cns, ous = attrs.get("commonName", []), attrs.get("organizationalUnitName", [])
    if len(cns) != 1 or len(ous) > 1:
        return Identity("other", "")
    cn, ou = cns[0], (ous[0] if ous else None)
    if ou is None and (m := _AGENT_CN.match(cn)):
        return Identity("agent", m[1])
    if ou == ZONE_UNIT and (m := _ZONE_CN.match(cn)):
        return Identity("zone", m[1])
    if ou in ROLES:
        return Identity("operator", cn)
    return Identity("other", "")


def server_context(config: CoreConfig) -> ssl.SSLContext:
    """TLS 1.2+; a client certificate, when shown, must be the network CA's.
    OPTIONAL, not REQUIRED: a client without one gets a 403 it can read
    instead of a handshake alert; one from another CA still fails the handshake."""
    return tls_server_context(TlsFiles(config.cert, config.key, config.ca),
                              verify_mode=ssl.CERT_OPTIONAL)


class _HTTPServer(TlsHttpServer):
    max_connections = MAX_CONNECTIONS
    log_name = "privedge-core"
    core: CoreServer


class _Handler(HeadDeadline):
    protocol_version = "HTTP/1.1"     # keep-alive: an edge sends many batches
    server_version = "privedge-core"
    sys_version = ""
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:
        """No access log: who asked for what stays out of the core's logs."""

    # ------------------------------------------------------------------- answers

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if close:
            # The body of the request was not read: the connection cannot go on.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: object, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode() + b"\n", close=close)

    def _error(self, status: int, why: str, close: bool = False, **extra: object) -> None:
        self._json(status, {"error": why, **extra}, close=close)

    @property
    def _core(self) -> CoreServer:
        return self.server.core

    def _who(self) -> Identity:
        return identify(self.connection.getpeercert())  # type: ignore[attr-defined]

    # ------------------------------------------------------------------- ingest

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        stream = _INGEST.get(path)
        if stream is None:
            return self._error(404, f"no such endpoint: POST {path}", close=True)
        store, cfg = self._core.store, self._core.config
        who = self._who()
        if who.kind != "agent":
            store.note_rejected(stream, 403)
            return self._error(403, "this endpoint takes an edge agent's certificate "
                               "(CN <dc>.dc.privedge.internal)", close=True)
        try:
            batch = BatchId.parse(self.headers.get("X-Privedge-Batch", ""))
        except ValueError as e:
            store.note_rejected(stream, 400)
            return self._error(400, str(e), close=True)
        if batch.dc != who.name:
            store.note_rejected(stream, 403)
            return self._error(403, f"batch id names DC {batch.dc!r}; the certificate is "
                               f"{who.name!r}'s", close=True)
        if batch.stream != stream:
            store.note_rejected(stream, 400)
            return self._error(400, f"batch id is of stream {batch.stream!r}, sent to {path}",
                               close=True)
        problem = self._body_headers_problem()
        if problem:
            store.note_rejected(stream, 400)
            return self._error(400, problem, close=True)
        length = int(self.headers["Content-Length"])
        if length > cfg.max_body_bytes:
            store.note_rejected(stream, 413)
            return self._error(413, f"body of {length} bytes is over the core's limit of "
                               f"{cfg.max_body_bytes}", close=True)
        slots = self._core.ingest_slots
        if not slots.acquire(blocking=False):
            self._core.note_busy()
            return self._error(503, f"the core is taking in {MAX_INGESTS} batches already; "
                               "retry", close=True)
        try:
            self._ingest(stream, batch, length)
        finally:
            slots.release()

    def _ingest(self, stream: str, batch: BatchId, length: int) -> None:
        store, cfg = self._core.store, self._core.config
        body = self.rfile.read(length)
        if len(body) != length:
            return self._error(400, "body shorter than its Content-Length", close=True)
        try:
            ndjson = gunzip(body, cfg.max_expanded_bytes)
            del body
            result = store.ingest(batch, ndjson)
        except BodyError as e:
            store.note_rejected(stream, e.status)
            return self._error(e.status, str(e))
        except RecordError as e:
            store.note_rejected(stream, 400)
            return self._error(400, str(e), line=e.line, field=e.field)
        except StoreUnavailable as e:
            return self._error(503, f"the store cannot write now: {e}")
        except Exception as e:  # a bug: say 500 (the edge retries) rather than hang up
            # Its type and where only: its message may quote the records.
            self.server.note_error(e, f"the ingest of {batch}")
            return self._error(500, "internal error; the core logged it")
        self._json(200, {"stored": result.stored, "duplicate": result.duplicate})

    def _body_headers_problem(self) -> str | None:
        h = self.headers
        if h.get("Transfer-Encoding"):
            return "Transfer-Encoding is not taken; send Content-Length"
        length = h.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()):   # isdigit alone takes '²'
            return f"Content-Length {length!r} is missing or not a number"
        if h.get("Content-Encoding", "").strip().lower() != "gzip":
            return f"Content-Encoding {h.get('Content-Encoding')!r}: the body must be gzip"
        ctype = h.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/x-ndjson":
            return f"Content-Type {h.get('Content-Type')!r}: expected application/x-ndjson"
        return None

    # ------------------------------------------------------------------- reading

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if m := _ZONE_PATH.match(url.path):
            zone = m[1]
            who = self._who()
            if who.kind != "zone" or who.name != zone:
                return self._error(403, f"the logs of zone {zone!r} are served only to its "
                                   f"own certificate ({zone}.zone.privedge.internal)")
            known = zone in self._core.config.zones or \
                (self._core.store.root / "logs" / zone).is_dir()
            if not known:
                return self._error(404, f"{zone!r} is not a zone of this core")
            return self._day(query, "logs", zone)
        if url.path in ("/v1/sample", "/v1/stats"):
            if self._who().kind != "operator":
                return self._error(403, "operators only (a certificate with OU viewer, "
                                   "operator or admin)")
            if url.path == "/v1/stats":
                return self._json(200, self._core.stats())
            return self._day(query, "sample", None)
        self._error(404, f"no such endpoint: GET {url.path}")

    def _day(self, query: dict[str, list[str]], stream: str, zone: str | None) -> None:
        day = query.get("day", [""])[-1]
        try:
            day_number(day)
        except ValueError:
            return self._error(400, f"day={day!r}: give the UTC day as YYYY-MM-DD")
        pieces = self._core.store.read_day(stream, zone, day)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        chunked = self.request_version == "HTTP/1.1"
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        # Streamed one chunk (one stored batch piece) at a time: a day can be
        # far larger than memory.
        for piece in pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class CoreServer:
    """The store, its HTTPS API, the retention sweeper and the logpush jobs."""

    def __init__(self, config: CoreConfig, *, clock: Callable[[], float] = time.time,
                 master: bytes | None = None,
                 on_phase: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.clock = clock
        self._phase = on_phase or (lambda _msg: None)
        self._master = master
        self.store: Store | None = None
        self.logpush: Logpush | None = None
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.ingest_slots = threading.BoundedSemaphore(MAX_INGESTS)
        self._counts = threading.Lock()
        self.sweep_failures = 0
        self.last_sweep: float | None = None   # the clock's time of the last sweep done
        self.ingests_busy = 0

    @property
    def address(self) -> tuple[str, int]:
        assert self._httpd is not None, "not started"
        return self._httpd.server_address[:2]  # type: ignore[return-value]

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> CoreServer:
        """Open the store, sweep, bind and serve; raises (naming what) on failure."""
        cfg = self.config
        self._phase(f"master key: {cfg.master_key}")
        master = self._master if self._master is not None else load_master_key(cfg.master_key)
        self._phase(f"store: {cfg.data_dir}")
        self.store = Store(cfg, master, clock=self.clock).open()
        try:
            report = self.sweep()
            self._phase(f"retention: first sweep removed {len(report.removed)} day(s)")
            self._phase(f"tls: {cfg.cert}, client CA {cfg.ca}")
            ctx = server_context(cfg)
            family = socket.AF_INET6 if ":" in cfg.listen else socket.AF_INET
            server_cls = type("_Server", (_HTTPServer,), {"address_family": family})
            httpd = server_cls((cfg.listen, cfg.port), _Handler, bind_and_activate=False)
            httpd.context, httpd.core = ctx, self
            self._phase(f"listen: {cfg.listen} port {cfg.port}")
            try:
                httpd.server_bind()
                httpd.server_activate()
            except OSError:
                httpd.server_close()
                raise
            self._httpd = httpd
            self.logpush = Logpush(self.store, cfg).start()
            self._phase(f"logpush: {len(self.logpush)} job(s)")
        except BaseException:
            if self._httpd is not None:
                self._httpd.server_close()
                self._httpd = None
            self.store.close()
            raise
        self._spawn(httpd.serve_forever, "privedge-core-http")
        self._spawn(self._sweeper, "privedge-core-sweep")
        self._phase(f"ready: https://{cfg.listen}:{self.port}")
        return self

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _sweeper(self) -> None:
        # Whatever a sweep meets, the next one runs: retention must not stop
        # silently. Counted (sweep_failures), printed by type and place only.
        while not self._stop.wait(self.config.sweep_interval):
            try:
                self.sweep()
            except Exception as e:
                with self._counts:
                    self.sweep_failures += 1
                print(f"privedge-core: retention sweep failed: {failure_summary(e)}",
                      file=sys.stderr, flush=True)

    def sweep(self) -> SweepReport:
        assert self.store is not None, "not started"
        report = self.store.sweep()
        with self._counts:
            self.last_sweep = self.clock()
        return report

    def note_busy(self) -> None:
        with self._counts:
            self.ingests_busy += 1

    def reload(self) -> None:
        """Load certificate, key and CA again; raises, keeping the current
        context, if they do not load."""
        assert self._httpd is not None, "not started"
        self._httpd.context = server_context(self.config)

    def stats(self) -> dict:
        assert self.store is not None
        out = self.store.stats()
        httpd = self._httpd
        with self._counts:
            out.update(sweep_failures=self.sweep_failures, last_sweep=self.last_sweep,
                       ingests_busy=self.ingests_busy)
        out["handler_errors"] = httpd.handler_errors if httpd else 0
        out["connections_refused"] = httpd.connections_refused if httpd else 0
        out["logpush"] = self.logpush.stats() if self.logpush else {}
        return out

    def stop(self) -> None:
        """Stop accepting, stop the jobs and the sweeper, then close the store
        (which waits, bounded, for ingests in flight)."""
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self.logpush is not None:
            self.logpush.stop()
        for t in self._threads:   # the sweeper's sweep, if one runs, ends first
            t.join(10)
        self._threads.clear()
        if self.store is not None:
            self.store.close()

