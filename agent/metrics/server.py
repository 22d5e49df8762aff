"""/metrics over HTTPS, a client certificate from the network's CA required.

    server = MetricsServer(registry, "198.18.0.1", 9443, tls)   # tls: TlsFiles
    server.start()
    server.reload()   # SIGHUP: the reissued certificate and CA, no restart
    server.stop()

prometheus_client's handler renders the registry; the TLS is ours, so that
a reload replaces the context that the next connection is wrapped with
(prometheus_client's own start_http_server fixes it at start). Handshakes
run in the request's thread, bounded by a timeout, so a slow client never
holds the accept loop. Nothing about a scraper is logged.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import CollectorRegistry

from control.tlshttp import TlsHttpServer, TlsService


@dataclass(frozen=True)
class TlsFiles:
    cert: Path      # this agent's certificate (server use), e.g. agents/<dc>.crt
    key: Path
    ca: Path        # the network's CA: only clients it issued are served


def server_context(files: TlsFiles,
                   verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED) -> ssl.SSLContext:
    """TLS 1.2+, the client's certificate verified against the CA: required,
    or with CERT_OPTIONAL verified only when one is shown (the core's log
    store answers a client without one 403 rather than failing its handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = verify_mode
    ctx.load_verify_locations(files.ca)
    ctx.load_cert_chain(files.cert, files.key)
    return ctx


class _Handler(MetricsHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.do_handshake()  # type: ignore[attr-defined]


class MetricsServer(TlsService):
    def __init__(self, registry: CollectorRegistry, address: str, port: int,
                 tls: TlsFiles) -> None:
        self.tls = tls
        super().__init__(TlsHttpServer((address, port), _Handler.factory(registry),
                                       bind_and_activate=False),
                         lambda: server_context(self.tls), "privedge-metrics")
