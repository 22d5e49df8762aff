"""The control plane's memory, served: an agent that starts asks for the
current generation and applies it before it protects anything (pull on
start), so a DC that was down during an apply comes back level.

    privedge-net --store gens serve --listen 198.18.0.254 --cert core.crt ...

    GET /v1/generation/current     the store's current payload (control/genpack.py);
                                   404 while there is none

mTLS with the network's CA; only agents (CN <dc>.dc.privedge.internal) and
operators may read it: a zone's log reader or Prometheus gets 403 (the
network config names every customer's origins and rules).
"""

from __future__ import annotations

import http.client
import json
import socket

from agent.config import ConfigError
from agent.metrics.tls import TlsFiles, client_context, server_context
from control.generations import GenerationStore
from control.pki import DOMAIN
from control.roles import caller_of
from control.tlshttp import JsonHandler, TlsHttpServer, TlsService

PATH = "/v1/generation/current"
AGENT_SUFFIX = f".dc.{DOMAIN}"


class _Handler(JsonHandler):
    server: _Server

    def do_GET(self) -> None:
        caller = caller_of(self.peer_certificate())
        status, payload = 200, None
        if not (caller.name.endswith(AGENT_SUFFIX) or caller.role is not None):
            status, answer = 403, {"error": "only agents and operators read generations"}
        elif self.path != PATH:
            status, answer = 404, {"error": f"no {self.path}; GET {PATH}"}
        else:
            try:
                payload = self.server.store.current()
            except ConfigError as e:
                status, answer = 500, {"error": str(e)}
            if status == 200 and payload is None:
                status, answer = 404, {"error": "no generation applied yet"}
        self.send_json(status, payload if status == 200 else answer)


class _Server(TlsHttpServer):
    store: GenerationStore


class GenerationServer(TlsService):
    def __init__(self, store: GenerationStore, address: str, port: int,
                 tls: TlsFiles) -> None:
        self.tls = tls
        httpd = _Server((address, port), _Handler, bind_and_activate=False)
        httpd.store = store
        super().__init__(httpd, lambda: server_context(self.tls), "privedge-control")


def fetch_current(url_host: str, port: int, name: str, tls: TlsFiles,
                  timeout: float = 5.0) -> tuple[dict | None, bytes]:
    """The control plane's current generation (None while it has none) and
    the certificate it showed (DER, for the audit log). Raises OSError
    (unreachable), ssl.SSLError or ValueError (a bad answer)."""
    ctx = client_context(tls)
    conn = http.client.HTTPSConnection(name, port, timeout=timeout, context=ctx)
    try:
        raw = socket.create_connection((url_host, port), timeout)
        conn.sock = ctx.wrap_socket(raw, server_hostname=name)
        conn.request("GET", PATH)
        der = conn.sock.getpeercert(binary_form=True) or b""
        r = conn.getresponse()
        body = r.read()
        if r.status == 404:
            return None, der
        if r.status != 200:
            raise ValueError(f"HTTP {r.status}: {body[:200]!r}")
        return json.loads(body), der
    except http.client.HTTPException as e:
        raise ValueError(f"not HTTP: {e}") from None
    finally:
        conn.close()
