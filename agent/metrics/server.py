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
import threading
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import CollectorRegistry

from control.tlshttp import TlsHttpServer


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


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, address: str, port: int,
                 tls: TlsFiles) -> None:
        self.tls = tls
        self._httpd = TlsHttpServer((address, port), _Handler.factory(registry),
                              bind_and_activate=False)
        self._httpd.context = server_context(tls)  # a bad file fails here, before binding
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._httpd.server_address[:2]  # type: ignore[return-value]

    def start(self) -> MetricsServer:
        self._httpd.server_bind()
        self._httpd.server_activate()
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="privedge-metrics", daemon=True)
        self._thread.start()
        return self

    def reload(self) -> None:
        """Load the certificate, key and CA again (reissued in place by the
        PKI); raises, keeping the current context, if they do not load."""
        self._httpd.context = server_context(self.tls)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
