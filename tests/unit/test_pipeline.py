"""A zone's rules in order: page rules, firewall, rate limits (no sockets)."""

from __future__ import annotations

import pytest

from agent.config import ConfigError
from agent.l7.config import Zone, parse_serve_config
from agent.l7.counters import Counters
from agent.l7.http1 import Request
from agent.l7.pipeline import ZonePipeline

ZONE = Zone.model_validate({
    "name": "shop", "hostnames": ["shop.example.com"],
    "page_rules": [
        {"pattern": "shop.example.com/old/*", "forwarding_url": {"status": 301,
                                                                "url": "https://shop.example.com/$1"}},
        {"pattern": "shop.example.com/secure/*", "always_https": True},
        {"pattern": "shop.example.com/img/*", "cache_level": "cache_everything"},
    ],
    "firewall": [
        {"expression": 'http.user_agent contains "sqlmap"', "action": "block"},
        {"expression": 'ip.src in {203.0.113.0/24}', "action": "allow"},
        {"expression": 'http.request.uri.path eq "/hot"', "action": "log"},
        {"expression": 'http.cookie has "suspicious"', "action": "challenge"},
    ],
    "rate_limits": [{"name": "all", "requests": 3, "period": 60, "block": 30}],
})


def req(target: str = "/", ua: str = "curl/8", cookie: str = "") -> Request:
    headers = [("host", "shop.example.com"), ("user-agent", ua)]
    if cookie:
        headers.append(("cookie", cookie))
    return Request("GET", target, "shop.example.com", tuple(headers), b"", "id", "1.1")


@pytest.fixture()
def pipe() -> tuple[ZonePipeline, Counters]:
    c = Counters(["shop"])
    return ZonePipeline(ZONE, c), c


def _actions(c: Counters) -> dict[str, int]:
    return {k: v for k, v in c.snapshot()["actions"]["shop"].items() if v}


def test_forwarding_and_always_https(pipe) -> None:
    p, c = pipe
    r = p.run(req("/old/a/b"), "192.0.2.1", tls=True, now=0).response
    assert r.status == 301 and dict(r.headers)["Location"] == "https://shop.example.com/a/b"
    r = p.run(req("/secure/x?y=1"), "192.0.2.1", tls=False, now=0).response
    assert r.status == 301 and dict(r.headers)["Location"] == "https://shop.example.com/secure/x?y=1"
    assert p.run(req("/secure/x"), "192.0.2.1", tls=True, now=0).response is None
    assert _actions(c) == {"page_redirect": 1, "https_redirect": 1}


def test_firewall_block_challenge_allow_log(pipe) -> None:
    p, c = pipe
    assert p.run(req(ua="sqlmap/1.7"), "192.0.2.1", tls=True, now=0).response.status == 403
    challenged = p.run(req(cookie="a=1; suspicious=2"), "192.0.2.1", True, 0)
    assert challenged.response is None and challenged.challenge  # the proxy decides
    allowed = p.run(req("/hot"), "203.0.113.5", tls=True, now=0)
    assert allowed.response is None and allowed.allowed
    logged = p.run(req("/hot"), "192.0.2.2", tls=True, now=0)
    assert logged.response is None and not logged.allowed
    assert _actions(c) == {"fw_block": 1, "fw_challenge": 1, "fw_allow": 1, "fw_log": 1}


def test_rate_limit_after_the_firewall(pipe) -> None:
    p, c = pipe
    got = [p.run(req(), "192.0.2.9", tls=True, now=1.0).response for _ in range(4)]
    assert got[:3] == [None, None, None]
    assert got[3].status == 429 and dict(got[3].headers)["Retry-After"] == "30"
    # An allowlisted client skips the rate limit.
    assert all(p.run(req(), "203.0.113.1", tls=True, now=1.0).response is None
               for _ in range(10))
    assert _actions(c)["rate_limited"] == 1


def test_page_rule_settings_go_on(pipe) -> None:
    p, _ = pipe
    out = p.run(req("/img/a.png"), "192.0.2.1", tls=True, now=0)
    assert out.response is None and out.settings.cache_level == "cache_everything"


def test_a_bad_rule_names_zone_rule_and_column() -> None:
    data = {"dc": "dus", "region": "eu", "certs": "/tmp", "zones": [{
        "name": "shop", "hostnames": ["shop.example.com"],
        "firewall": [{"expression": 'http.host eq "a" or', "action": "block"}]}]}
    with pytest.raises(ConfigError) as e:
        parse_serve_config(data, "serve.yaml")
    assert "serve.yaml: zones[0].firewall[0].expression:" in str(e.value)
    assert "column 20: expected a field" in str(e.value)  # the end of the expression


def test_absolute_form_targets_count_by_their_path(pipe) -> None:
    p, _ = pipe
    r = p.run(req("http://shop.example.com/secure/x?y=1"), "192.0.2.1", tls=False, now=0)
    assert dict(r.response.headers)["Location"] == "https://shop.example.com/secure/x?y=1"
