"""The HTTPS server of the network's own mTLS services: an agent's /metrics
(agent/metrics/server.py) and API (agent/api.py), the core's log store
(core/server.py) and the control plane's generations (control/genserver.py).

ThreadingHTTPServer with these changes:

- it binds without looking up its own name (HTTPServer's getfqdn is a DNS
  query that can hang in a namespace without a resolver);
- it wraps each accepted connection in the TLS context of the moment
  (`context`, swapped by a certificate reload), with the handshake left to
  the request's thread, so a slow client never holds the accept loop;
- at most `max_connections` connections are served at once (a thread each);
  one over that is closed at once, unanswered, and counted
  (`connections_refused`). 16 by default (a few Prometheus servers
  scrape /metrics); the core takes 64 (an edge keeps one or two);
- a connection has `head_timeout` seconds in all for its TLS handshake and
  its first request head, and a later request on it as long for its head
  (counted from when the previous request was done: an idle keep-alive
  connection is closed then). Every read and write also has its own
  `client_timeout`. So a client that trickles bytes holds a thread
  for `head_timeout` at most, whatever it sends, until its head is in; a
  body is bounded by the per-read timeout (the handler limits its size).
  Both are 10 s;
- failed handshakes and vanished clients (ssl.SSLError, ConnectionError,
  TimeoutError, OSError of a connection gone) are not logged; any other
  exception a handler raises is a bug: printed as its type and where
  (file:line), never its message (it may quote a request), and counted
  (`handler_errors`).

Handlers must be http.server.BaseHTTPRequestHandler subclasses; the head
deadline is mixed into them (HeadDeadline) when the server is made.
"""

from __future__ import annotations

import errno
import json
import socket
import socketserver
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLIENT_TIMEOUT = 10.0   # seconds per read or write on a connection
HEAD_TIMEOUT = 10.0     # seconds for the TLS handshake and a request head, in all
MAX_CONNECTIONS = 16    # served at once; more are closed at once
# OSError numbers of a client that went away (not a bug of ours).
_GONE = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                   errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


def failure_summary(e: BaseException) -> str:
    """An exception as its type and where it was raised (file:line, the
    innermost last): never its message or args, which may quote a request."""
    frames = traceback.extract_tb(e.__traceback__)[-4:] if e.__traceback__ else []
    where = ", ".join(f"{f.filename}:{f.lineno}" for f in frames) or "?"
    return f"{type(e).__name__} at {where}"


def client_gone(e: BaseException) -> bool:
    """A failed handshake, a timeout or a client that went away."""
    if isinstance(e, ssl.SSLError | ConnectionError | TimeoutError):
        return True
    return type(e) is OSError and e.errno in _GONE


class Connection(ssl.SSLSocket):
    """A served connection. While `head_deadline` (time.monotonic()) is
    set, each read waits at most until then: so many reads of a trickled
    head cannot add up to more than the deadline."""

    head_deadline: float | None = None
    read_timeout: float = CLIENT_TIMEOUT

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:  # type: ignore[override]
        if self.head_deadline is not None:
            left = self.head_deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request head took too long")
            self.settimeout(min(left, self.read_timeout))
        return super().recv_into(buffer, nbytes, flags)


class HeadDeadline(BaseHTTPRequestHandler):
    """Bounds the wait for each request's head (see the module's doc)."""

    connection: Connection
    server: TlsHttpServer

    def handle_one_request(self) -> None:
        conn = self.connection
        if conn.head_deadline is None:   # a later request: its own deadline
            conn.head_deadline = time.monotonic() + self.server.head_timeout
        super().handle_one_request()

    def parse_request(self) -> bool:
        try:
            return super().parse_request()
        finally:   # the head is in (or refused): the body has per-read timeouts only
            self.connection.head_deadline = None
            self.connection.settimeout(self.server.client_timeout)


class JsonHandler(HeadDeadline):
    """A handler of the network's mTLS JSON endpoints (the agent's API, the
    control plane's generations): keep-alive, no access log (who asked for
    what is audited where it changes something), JSON answers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """No access log."""

    def peer_certificate(self) -> bytes:
        """The client's certificate, DER (the server requires one)."""
        return self.connection.getpeercert(binary_form=True)  # type: ignore[return-value]

    def send_json(self, status: int, obj: object) -> None:
        data = json.dumps(obj, sort_keys=True).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class TlsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    client_timeout = CLIENT_TIMEOUT
    head_timeout = HEAD_TIMEOUT
    max_connections = MAX_CONNECTIONS
    log_name = "privedge"   # the prefix of what it prints

    def __init__(self, server_address: tuple[str, int],
                 RequestHandlerClass: type[BaseHTTPRequestHandler],
                 bind_and_activate: bool = True) -> None:
        if not issubclass(RequestHandlerClass, HeadDeadline):
            RequestHandlerClass = type(RequestHandlerClass.__name__,
                                       (HeadDeadline, RequestHandlerClass), {})
        super().__init__(server_address, RequestHandlerClass, bind_and_activate)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._counts = threading.Lock()
        self.handler_errors = 0
        self.connections_refused = 0

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        ctx.sslsocket_class = Connection   # what wrap_socket makes for this server
        self._context = ctx

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]  # type: ignore[assignment]

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = self.socket.accept()
        deadline = time.monotonic() + self.head_timeout
        conn.settimeout(self.client_timeout)
        tls = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        assert isinstance(tls, Connection)
        tls.head_deadline, tls.read_timeout = deadline, self.client_timeout
        return tls, addr

    def process_request(self, request: socket.socket,  # type: ignore[override]
                        client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            with self._counts:
                self.connections_refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # type: ignore[arg-type]
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket,  # type: ignore[override]
                               client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[arg-type]
        finally:
            self._slots.release()

    def finish_request(self, request: socket.socket,  # type: ignore[override]
                       client_address: object) -> None:
        # The handshake, within what is left of the connection's deadline:
        # an SSL handshake's timeout bounds the whole of it, not each read.
        assert isinstance(request, Connection) and request.head_deadline is not None
        request.settimeout(max(request.head_deadline - time.monotonic(), 0.001))
        request.do_handshake()
        request.settimeout(self.client_timeout)
        super().finish_request(request, client_address)  # type: ignore[arg-type]

    def handle_error(self, request: object, client_address: object) -> None:
        """A failed handshake or a client gone: nothing to log about it.
        Anything else is a bug: reported by note_error."""
        e = sys.exc_info()[1]
        if e is not None and not client_gone(e):
            self.note_error(e)

    def note_error(self, e: BaseException, what: str = "a request handler") -> None:
        """Count a bug met while serving, and print its type and where."""
        with self._counts:
            self.handler_errors += 1
        print(f"{self.log_name}: {what} failed: {failure_summary(e)}", file=sys.stderr,
              flush=True)


class TlsService:
    """A TlsHttpServer on a thread of its own, for the agent's services
    (/metrics, the API): bind at start, reload the certificates (SIGHUP),
    stop. `context` makes the TLS context from the current files; it is
    called at construction, so a bad file fails before anything binds."""

    def __init__(self, httpd: TlsHttpServer, context: Callable[[], ssl.SSLContext],
                 name: str) -> None:
        self._httpd, self._make_context, self._name = httpd, context, name
        try:
            httpd.context = context()
        except BaseException:
            httpd.server_close()   # its socket, made but never bound
            raise
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._httpd.server_address[:2]  # type: ignore[return-value]

    def start(self) -> TlsService:
        self._httpd.server_bind()
        self._httpd.server_activate()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=self._name,
                                        daemon=True)
        self._thread.start()
        return self

    def reload(self) -> None:
        """The certificate, key and CA again (reissued in place by the PKI);
        raises, keeping the current context, if they do not load."""
        self._httpd.context = self._make_context()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
