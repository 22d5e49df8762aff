"""Firewall rule expressions: what they match, and errors that name the column."""

from __future__ import annotations

import pytest

from agent.l7.firewall import Firewall, RequestView, Rule, RuleError, compile_expression

REQ = RequestView(src="192.0.2.7", method="POST", host="Shop.example.eu", path="/admin/login",
                  query="next=%2F", headers={"user-agent": "sqlmap/1.7", "x-debug": "1"},
                  cookies=frozenset({"session"}), country="DE")
V6 = RequestView(src="2001:db8::5", method="GET", host="www.example.com", path="/",
                 query="", headers={})


@pytest.mark.parametrize("expr,want", [
    ('http.request.method eq "POST"', True),
    ('http.request.method == "GET"', False),
    ('http.request.method in {"GET" "HEAD"}', False),
    ('http.host eq "shop.example.eu"', True),                    # host compared lower-cased
    ('http.request.uri.path matches "^/admin"', True),
    ('http.request.uri eq "/admin/login?next=%2F"', True),
    ('http.request.uri.query contains "next"', True),
    ('http.user_agent contains "sqlmap"', True),
    ('http.request.headers["X-Debug"] eq "1"', True),
    ('http.request.headers["missing"] ne ""', False),
    ('http.cookie has "session"', True),
    ('http.cookie has "other"', False),
    ('ip.geoip.country in {"KP" "RU"}', False),
    ('ip.src in {192.0.2.0/24 2001:db8::/32}', True),
    ('ip.src eq 192.0.2.7', True),
    ('ip.src ne 192.0.2.0/24', False),
    ('not ip.src in {198.51.100.0/24}', True),
    ('http.request.method eq "POST" and http.user_agent contains "curl"', False),
    ('http.request.method eq "GET" or http.user_agent contains "sqlmap"', True),
    ('(http.request.method eq "GET" or http.request.method eq "POST") and '
     'not http.host eq "www.example.com"', True),
    ('http.request.uri.path eq "/a \\"quoted\\" path"', False),
])
def test_expressions(expr: str, want: bool) -> None:
    assert compile_expression(expr)(REQ) is want


def test_ipv6_source() -> None:
    assert compile_expression("ip.src in {2001:db8::/48}")(V6)
    assert not compile_expression("ip.src in {192.0.2.0/24}")(V6)


@pytest.mark.parametrize("expr,column,why", [
    ("", 1, "empty expression"),
    ('http.method eq "GET"', 1, "expected a field"),
    ('http.request.method is "GET"', 21, "expected an operator"),
    ('http.request.method eq GET', 24, 'expected a "quoted string"'),
    ('http.request.method eq "GET" nor ip.src eq 1.2.3.4', 30,
     "expected 'and', 'or' or the end"),
    ('(http.request.method eq "GET"', 30, "expected ')'"),
    ('ip.src in {192.0.2.0/24 banana}', 25, "expected an address or CIDR"),
    ('ip.src contains "1"', 1, "ip.src takes eq, ne or in"),
    ('http.user_agent lt "b"', 1, "is text: use eq ne contains matches in"),
    ('http.request.uri.path matches "("', 31, "not a regular expression"),
    ('http.request.method in {"GET"', 30, "expected '}' to close the set"),
    ('http.request.method eq "GET" & 1', 30, "unexpected character '&'"),
    ('http.cookie eq "x"', 13, "http.cookie takes 'has \"name\"'"),
])
def test_errors_name_the_column(expr: str, column: int, why: str) -> None:
    with pytest.raises(RuleError) as e:
        compile_expression(expr)
    assert e.value.column == column, str(e.value)
    assert why in e.value.why
    assert f"column {column}: " in str(e.value) and str(e.value).endswith("^")


def test_rules_run_in_order_log_goes_on_and_the_first_decision_wins() -> None:
    fw = Firewall([
        Rule('http.user_agent contains "sqlmap"', "log"),
        Rule('ip.src in {192.0.2.0/24}', "allow"),
        Rule('http.request.uri.path matches "^/admin"', "block"),
    ])
    v = fw.evaluate(REQ)
    assert (v.action, v.rule, v.logged) == ("allow", 1, (0,))
    v = fw.evaluate(V6)
    assert (v.action, v.rule, v.logged) == (None, None, ())


def test_skip_and_challenge() -> None:
    fw = Firewall([Rule('http.cookie has "session"', "skip"),
                   Rule('http.request.method eq "POST"', "block")])
    assert fw.evaluate(REQ).action == "skip"
    fw = Firewall([Rule('ip.geoip.country eq "DE"', "challenge")])
    assert fw.evaluate(REQ).action == "challenge"


def test_a_bad_rule_is_named_by_index() -> None:
    with pytest.raises(ValueError, match=r"rules\[1\]\.expression: column 1: expected a field"):
        Firewall([Rule('http.host eq "a"', "block"), Rule('bogus eq "x"', "block")])
    with pytest.raises(ValueError, match=r"rules\[0\]\.action: 'drop' is not one of"):
        Firewall([Rule('http.host eq "a"', "drop")])
