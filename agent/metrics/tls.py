"""The TLS contexts of the network's mutual TLS: the client's, for the
agent's connections to the network's other parties (rtt.py's probes, the
log shippers, the control plane's CLI), and the server's (/metrics, the
agent's API, the control plane's generation server). Kept light on
imports: a CLI's start-up is part of every apply.

    ctx = client_context(TlsFiles(crt, key, ca))
    ctx.wrap_socket(sock, server_hostname="core.privedge.internal")
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    cert: Path      # this party's certificate, e.g. agents/<dc>.crt
    key: Path
    ca: Path        # the network's CA: only peers it issued are trusted


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


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """TLS 1.2+, this agent's certificate presented, the peer verified
    against the network's CA and by the name it is reached by
    (server_hostname). A bad file raises here, when the context is made,
    not on each connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(files.ca)
    ctx.load_cert_chain(files.cert, files.key)
    return ctx
