"""Bot heuristics and the cookie challenge."""

from __future__ import annotations

import pytest

from agent.l7.bots import COOKIE, Challenge, assess
from agent.l7.http1 import Request

BROWSER = (("host", "shop.example.eu"), ("user-agent", "Mozilla/5.0 (X11) Firefox/128.0"),
           ("accept", "text/html"), ("accept-language", "de"), ("accept-encoding", "gzip"))


def req(headers=BROWSER, target: str = "/cart?x=1") -> Request:
    return Request("GET", target, "shop.example.eu", tuple(headers), b"", "id", "1.1")


@pytest.mark.parametrize("headers,score,reasons", [
    (BROWSER, 0, ()),
    ((("host", "a"), ("user-agent", "sqlmap/1.7#stable")), 100, ("bad_agent",)),
    ((("host", "a"),), 40, ("no_agent",)),
    ((("host", "a"), ("user-agent", "Mozilla/5.0")), 60, ("browser_missing_headers",)),
    ((("user-agent", "Mozilla/5.0"), ("accept", "*/*"), ("accept-language", "de"),
      ("accept-encoding", "br"), ("host", "a")), 20, ("header_order",)),
    ((("host", "a"), ("user-agent", "curl/8.5")), 0, ()),  # honest tools are not scored
])
def test_assessment(headers, score: int, reasons: tuple) -> None:
    a = assess(req(headers))
    assert (a.score, a.reasons) == (score, reasons)


def test_the_challenge_is_passed_with_the_cookie_it_set() -> None:
    ch = Challenge(ttl=60, key=b"k" * 32)
    r = ch.issue(req(), "192.0.2.1", tls=True, now=1000)
    assert r.status == 302 and dict(r.headers)["Location"] == "/cart?x=1"
    cookie = dict(r.headers)["Set-Cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie
    value = cookie.split(";")[0]
    back = req((*BROWSER, ("cookie", f"a=1; {value}")))
    assert ch.passes(back, "192.0.2.1", now=1010)
    assert not ch.passes(back, "192.0.2.2", now=1010)          # another address
    assert not ch.passes(back, "192.0.2.1", now=1061)          # expired
    other_ua = req((("user-agent", "Other"), ("cookie", value)))
    assert not ch.passes(other_ua, "192.0.2.1", now=1010)      # another agent
    forged = req((*BROWSER, ("cookie", f"{COOKIE}=99999999999.{'0' * 32}")))
    assert not ch.passes(forged, "192.0.2.1", now=1010)
    assert not ch.passes(req(), "192.0.2.1", now=1010)         # no cookie at all


def test_a_new_key_asks_again() -> None:
    r = Challenge(key=b"a" * 32).issue(req(), "192.0.2.1", tls=False, now=0)
    value = dict(r.headers)["Set-Cookie"].split(";")[0]
    assert "Secure" not in dict(r.headers)["Set-Cookie"]
    assert not Challenge(key=b"b" * 32).passes(req((*BROWSER, ("cookie", value))),
                                                "192.0.2.1", now=1)
