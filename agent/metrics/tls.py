"""The agent's TLS client context, for its mutual-TLS connections to the
network's other parties: peer DCs (rtt.py's probes) and the core (the log
shippers, agent/logs/shipper.py). Its server side is server.py's
server_context.

    ctx = client_context(TlsFiles(crt, key, ca))
    ctx.wrap_socket(sock, server_hostname="core.privedge.internal")
"""

from __future__ import annotations

import ssl

from agent.metrics.server import TlsFiles


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
