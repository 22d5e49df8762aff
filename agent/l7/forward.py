"""The headers a request carries on to the origin.

Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are
dropped: Connection, every header Connection names, Keep-Alive,
Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, and
Proxy-Authorization / Proxy-Authenticate. Then the edge adds what the
origin needs to know:

  X-Forwarded-For     the client's address appended to any list the
                      client sent (the origin decides whether to trust it)
  X-Forwarded-Proto   https or http, as the client connected
  <client_ip_header>  the client's address alone (configurable name, e.g.
                      True-Client-IP); a client-sent one is replaced
  X-Request-Id        the id the edge answered the client with
  Via                 "1.1 privedge" appended (loop detection)

Header names keep the client's order; duplicates (other than the ones
replaced here) pass unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-authorization",
                        "proxy-authenticate"})
VIA = "1.1 privedge"


def origin_headers(headers: Sequence[tuple[str, str]], client: str, tls: bool,
                   request_id: str, client_ip_header: str = "True-Client-IP"
                   ) -> list[tuple[str, str]]:
    """`headers` as received (lower-case names) → what goes to the origin."""
    named = {token.strip().lower() for name, value in headers if name == "connection"
             for token in value.split(",") if token.strip()}
    drop = HOP_BY_HOP | named | {client_ip_header.lower(), "x-forwarded-proto",
                                 "x-request-id"}
    out = [(n, v) for n, v in headers if n not in drop and n not in ("x-forwarded-for", "via")]
    xff = [v.strip() for n, v in headers if n == "x-forwarded-for" and v.strip()]
    via = [v.strip() for n, v in headers if n == "via" and v.strip()]
    out += [("x-forwarded-for", ", ".join([*xff, client])),
            ("x-forwarded-proto", "https" if tls else "http"),
            (client_ip_header.lower(), client),
            ("x-request-id", request_id),
            ("via", ", ".join([*via, VIA]))]
    return out


def looped(headers: Sequence[tuple[str, str]]) -> bool:
    """Has this request passed through a privedge edge already?"""
    for name, value in headers:  # noqa: SIM110 -- per request; a loop is 3x any() of a generator
        if name == "via" and VIA in value:
            return True
    return False
