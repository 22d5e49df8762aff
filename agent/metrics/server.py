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

from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import CollectorRegistry

from agent.metrics.tls import TlsFiles, server_context
from control.tlshttp import TlsHttpServer, TlsService

__all__ = ["MetricsServer", "TlsFiles", "server_context"]


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
