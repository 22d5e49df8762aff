"""The HTTPS server of the network's own mTLS services: an agent's /metrics
(agent/metrics/server.py) and the core's log store (core/server.py).

ThreadingHTTPServer with two changes: it binds without looking up its own
name (HTTPServer's getfqdn is a DNS query that can hang in a namespace
without a resolver), and it wraps each accepted connection in the TLS
context of the moment (`context`, swapped by a certificate reload) with the
handshake left to the request's thread, so a slow client never holds the
accept loop. Failed handshakes and vanished clients are not logged.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
from http.server import ThreadingHTTPServer

CLIENT_TIMEOUT = 10.0   # seconds per read or write on a connection


class TlsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    context: ssl.SSLContext
    client_timeout = CLIENT_TIMEOUT

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]  # type: ignore[assignment]

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = self.socket.accept()
        conn.settimeout(self.client_timeout)
        return self.context.wrap_socket(conn, server_side=True,
                                         do_handshake_on_connect=False), addr

    def handle_error(self, request: object, client_address: object) -> None:
        """A failed handshake or a client gone: nothing to log about it."""
