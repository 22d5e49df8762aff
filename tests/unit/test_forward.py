"""Headers toward the origin: hop-by-hop dropped, forwarding headers added."""

from __future__ import annotations

from agent.l7.forward import looped, origin_headers

CLIENT_SENT = [
    ("host", "shop.example.eu"), ("user-agent", "curl/8"),
    ("connection", "keep-alive, X-Secret-Hop"), ("keep-alive", "timeout=5"),
    ("x-secret-hop", "1"), ("te", "trailers"), ("transfer-encoding", "chunked"),
    ("upgrade", "websocket"), ("proxy-authorization", "Basic eA=="),
    ("x-forwarded-for", "10.0.0.1"), ("true-client-ip", "6.6.6.6"),
    ("x-request-id", "client-chosen"), ("accept", "*/*"), ("accept", "text/html"),
]


def test_hop_by_hop_go_and_forwarding_headers_come() -> None:
    out = origin_headers(CLIENT_SENT, "203.0.113.10", tls=True, request_id="abc")
    names = [n for n, _ in out]
    for gone in ("connection", "keep-alive", "x-secret-hop", "te", "transfer-encoding",
                 "upgrade", "proxy-authorization"):
        assert gone not in names, gone
    got = dict(out)
    assert got["x-forwarded-for"] == "10.0.0.1, 203.0.113.10"
    assert got["x-forwarded-proto"] == "https"
    assert got["true-client-ip"] == "203.0.113.10"       # the client's claim replaced
    assert got["x-request-id"] == "abc"
    assert got["via"] == "1.1 privedge"
    assert [v for n, v in out if n == "accept"] == ["*/*", "text/html"]  # order and repeats
    assert names[:2] == ["host", "user-agent"]


def test_plain_http_and_a_custom_client_ip_header() -> None:
    out = dict(origin_headers([("host", "a")], "2001:db8::1", tls=False, request_id="x",
                              client_ip_header="X-Client-IP"))
    assert out["x-forwarded-proto"] == "http" and out["x-client-ip"] == "2001:db8::1"
    assert out["x-forwarded-for"] == "2001:db8::1"


def test_loops_are_seen() -> None:
    once = origin_headers([("host", "a")], "192.0.2.1", True, "x")
    assert looped(once) and not looped([("host", "a"), ("via", "1.1 other")])
