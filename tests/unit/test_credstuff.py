"""Credential-stuffing protection: login limits, the leaked-password lookup, privacy.

Playbooks without sockets: each test scripts requests into the guard's
before() and origin statuses into after(), with `now` given, and checks
what the edge would answer or add toward the origin.
"""

from __future__ import annotations

import importlib.util
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from pydantic import ValidationError

from agent.l7.credstuff import (
    EXPOSED_HEADER,
    CredentialGuard,
    LoginCheck,
    LoginEndpoint,
    LoginSettings,
    client_key,
    forward_headers,
    read_credentials,
)
from agent.l7.leaked import DATA_PATH, MAGIC, LeakedDataError, LeakedPasswords, LocalRange

ROOT = Path(__file__).resolve().parents[2]
LEAKED = LeakedPasswords.default()
FORM = {"content-type": "application/x-www-form-urlencoded"}
JSON = {"content-type": "application/json; charset=utf-8"}
STRONG = "tK8#vq2!Lm9@Zr4$wX"          # not in the shipped set
WEAK = "Password1!"                     # in it
ENDPOINTS = [{"path": "/login"},
             {"path": "/api/session", "username_field": "user.email",
              "password_field": "user.password"}]


def _guard(max_keys: int = 100_000, leaked: LeakedPasswords = LEAKED,
           **settings: object) -> CredentialGuard:
    return CredentialGuard(LoginSettings.model_validate({"endpoints": ENDPOINTS, **settings}),
                           leaked=leaked, max_keys=max_keys)


def _form(user: str, password: str = STRONG) -> bytes:
    return urlencode({"username": user, "password": password}).encode()


def _attempt(guard: CredentialGuard, user: str, client: str, now: float,
             status: int | None = 401, password: str = STRONG) -> LoginCheck:
    """One login through the guard; the origin answers `status` if it is asked."""
    check = guard.before("POST", "/login", FORM, _form(user, password), client, now)
    if check.response is None:
        guard.after(check, status)
    return check


def _refused(check: LoginCheck) -> int | None:
    return None if check.response is None else check.response.status


def _retry_after(check: LoginCheck) -> int:
    assert check.response is not None
    return int(dict(check.response.headers)["Retry-After"])


# -- what is a login request ------------------------------------------------------------


def test_requests_that_are_not_logins_are_untouched() -> None:
    guard = _guard()
    for method, path in [("GET", "/login"), ("POST", "/logout"), ("POST", "/login/x"),
                         ("PUT", "/api/session"), ("POST", "/")]:
        check = guard.before(method, path, FORM, _form("alice", WEAK), "192.0.2.1", 0.0)
        assert check is LoginCheck.none and not check.is_login
        guard.after(check, 401)                       # harmless
    assert guard.stats()["checks"] == 0 and guard.stats()["failures"] == 0


@pytest.mark.parametrize("path", ["/login", "/Login", "/login/", "//login", "/./login",
                                  "/x/../login", "/log%69n", "/login;jsessionid=1",
                                  "/login?next=/", "\\login"])
def test_a_login_path_matches_however_it_is_spelled(path: str) -> None:
    """An attacker must not dodge the counters by writing the path the origin
    still routes to the login differently."""
    assert _guard().before("post", path, FORM, _form("a"), "192.0.2.1", 0.0).is_login


@pytest.mark.parametrize("name, headers, body, expected", [
    ("form", FORM, b"username=Alice&password=pw%21", ("alice", "pw!")),
    ("form_extra_fields", FORM, b"csrf=1&username=bob&password=x&remember=on", ("bob", "x")),
    ("form_no_password", FORM, b"username=bob", ("bob", None)),
    ("form_empty_values", FORM, b"username=&password=", (None, None)),
    ("form_bad_utf8", FORM, b"username=\xff&password=x", (None, None)),
    ("form_too_many_fields", FORM, b"&".join([b"f=1"] * 200) + b"&username=a&password=b",
     (None, None)),
    ("json", JSON, b'{"username": " Alice@Example.COM ", "password": "s3cret"}',
     ("alice@example.com", "s3cret")),
    ("json_vendor_type", {"content-type": "application/vnd.api+json"},
     b'{"username": "a", "password": "b"}', ("a", "b")),
    ("json_not_strings", JSON, b'{"username": 5, "password": ["x"]}', (None, None)),
    ("json_array", JSON, b'[{"username": "a", "password": "b"}]', (None, None)),
    ("json_broken", JSON, b'{"username": "a", "password": ', (None, None)),
    ("json_too_deep", JSON, b"[" * 100_000 + b"]" * 100_000, (None, None)),
    ("no_content_type", {}, b"username=a&password=b", (None, None)),
    ("multipart", {"content-type": "multipart/form-data; boundary=x"}, b"--x--", (None, None)),
])
def test_credentials_are_read_from_form_and_json_bodies(
        name: str, headers: dict, body: bytes, expected: tuple) -> None:
    endpoint = LoginEndpoint(path="/login")
    assert read_credentials(endpoint, headers, body) == expected, name


def test_dotted_field_names_reach_into_nested_json() -> None:
    endpoint = LoginEndpoint(path="/s", username_field="user.email",
                             password_field="user.password")
    body = json.dumps({"user": {"email": "E@x.org", "password": "pw"}}).encode()
    assert read_credentials(endpoint, JSON, body) == ("e@x.org", "pw")
    flat = json.dumps({"user.email": "f@x.org", "user": {"password": "pw"}}).encode()
    assert read_credentials(endpoint, JSON, flat) == ("f@x.org", "pw")   # a literal key first
    assert read_credentials(endpoint, JSON, b'{"user": "x"}') == (None, None)


def test_a_body_we_cannot_read_still_costs_its_client_an_attempt() -> None:
    guard = _guard(client_failures=3)
    for i in range(3):
        check = guard.before("POST", "/login", {"content-type": "text/plain"},
                             b"username=a&password=b", "192.0.2.1", float(i))
        assert _refused(check) is None and check.origin_headers == ()
        guard.after(check, 401)
    check = guard.before("POST", "/login", {}, b"", "192.0.2.1", 4.0)
    assert _refused(check) == 429
    assert guard.stats()["unparsed"] == 4 and guard.stats()["blocked_client"] == 1


# -- limits -----------------------------------------------------------------------------


def test_per_client_limit_answers_429_with_retry_after_then_lets_go() -> None:
    guard = _guard(client_failures=10, block=600)
    for i in range(10):
        assert _refused(_attempt(guard, f"user{i}", "192.0.2.1", now=float(i))) is None
    check = _attempt(guard, "user10", "192.0.2.1", now=10.0)
    assert _refused(check) == 429 and _retry_after(check) == 600
    assert _retry_after(_attempt(guard, "user11", "192.0.2.1", now=609.5)) == 1
    assert _refused(_attempt(guard, "user0", "192.0.2.2", now=11.0)) is None  # another client
    assert _refused(_attempt(guard, "user12", "192.0.2.1", now=610.0)) is None  # block over
    stats = guard.stats()
    assert (stats["failures"], stats["blocked_client"]) == (12, 2)


def test_successful_logins_are_not_failures() -> None:
    guard = _guard(client_failures=3)
    for i in range(20):
        assert _refused(_attempt(guard, "alice", "192.0.2.1", float(i), status=302)) is None
    assert guard.stats()["failures"] == 0


def test_no_answer_and_origin_errors_are_not_failures() -> None:
    guard = _guard(client_failures=2)
    for i, status in enumerate([None, 502, 503, 500, None]):
        assert _refused(_attempt(guard, "alice", "192.0.2.1", float(i), status=status)) is None


def test_attempts_in_flight_count_so_a_parallel_burst_is_capped() -> None:
    """Credential-stuffing tools send in parallel: the answers of the first
    attempts are not back when the next arrive, so each forwarded attempt
    counts until after() takes it back."""
    guard = _guard(client_failures=10)
    checks = [guard.before("POST", "/login", FORM, _form(f"u{i}"), "192.0.2.1", 0.0)
              for i in range(50)]
    assert [_refused(c) for c in checks] == [None] * 10 + [429] * 40


def test_after_is_idempotent() -> None:
    guard = _guard(client_failures=2)
    check = guard.before("POST", "/login", FORM, _form("a"), "192.0.2.1", 0.0)
    guard.after(check, 401)
    guard.after(check, 401)
    guard.after(check, 200)           # a late success takes nothing back
    assert guard.stats()["failures"] == 1


def test_per_username_limit_stops_a_distributed_attack_on_one_account() -> None:
    """Five failures on one account from five addresses lock that account's
    logins for everyone; other accounts from the same addresses go on."""
    guard = _guard(username_failures=5, block=600)
    for i in range(5):
        assert _refused(_attempt(guard, "alice", f"198.51.100.{i}", float(i))) is None
    check = _attempt(guard, "alice", "203.0.113.9", 5.0)          # a fresh address
    assert _refused(check) == 429 and _retry_after(check) == 600
    # NFKC (full-width letters), trimmed, case-folded: the same account
    for spelling in ("ALICE", " alice", "\uff21\uff4c\uff49\uff43\uff45"):
        assert _refused(_attempt(guard, spelling, "203.0.113.10", 6.0)) == 429
    for i in range(5):
        assert _refused(_attempt(guard, "bob", f"198.51.100.{i}", 7.0, status=200)) is None
    assert _refused(_attempt(guard, "alice", "203.0.113.9", 606.0)) is None
    assert guard.stats()["blocked_username"] == 4


def test_a_username_refusal_does_not_count_against_the_client() -> None:
    guard = _guard(client_failures=3, username_failures=1)
    _attempt(guard, "alice", "198.51.100.1", 0.0)
    for i in range(10):
        assert _refused(_attempt(guard, "alice", "192.0.2.1", float(i))) == 429
    for i in range(3):
        assert _refused(_attempt(guard, f"bob{i}", "192.0.2.1", 20.0 + i)) is None


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    guard = _guard(client_failures=3)
    for i in range(3):
        _attempt(guard, f"u{i}", f"2001:db8:1:2::{i + 1:x}", float(i))
    assert _refused(_attempt(guard, "u9", "2001:db8:1:2:ffff::1", 4.0)) == 429
    assert _refused(_attempt(guard, "u9", "2001:db8:1:3::1", 4.0)) is None
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("not-an-address") == "not-an-address"


def test_the_window_slides_and_expires() -> None:
    """10 failures late in one window still weigh half of themselves half-way
    through the next, so 5 more fit there; two windows on, all 10 do."""
    guard = _guard(client_failures=10, client_period=300, block=1)

    def burst(n: int, now: float) -> list[int | None]:
        return [_refused(_attempt(guard, f"u{now}-{i}", "192.0.2.1", now)) for i in range(n)]

    assert burst(10, 290.0) == [None] * 10
    assert burst(6, 450.0) == [None] * 5 + [429]
    assert burst(11, 900.0) == [None] * 10 + [429]


def test_state_is_bounded_and_evictions_counted() -> None:
    guard = _guard(max_keys=3, client_failures=1, username_failures=1)
    for i in range(10):
        _attempt(guard, f"user{i}", f"192.0.2.{i}", 0.0)
    stats = guard.stats()
    assert stats["tracked_clients"] == 3 and stats["tracked_usernames"] == 3
    assert stats["evicted"] == 14
    # The most recent keys are kept: their blocks still hold.
    assert _refused(_attempt(guard, "user9", "192.0.2.9", 1.0)) == 429
    assert _refused(_attempt(guard, "user0", "192.0.2.0", 1.0)) is None   # forgotten


def test_success_statuses_make_everything_else_a_failure() -> None:
    settings = LoginSettings(endpoints=(LoginEndpoint(path="/login", success_statuses=(302,)),),
                             client_failures=2)
    guard = CredentialGuard(settings, leaked=LEAKED)
    assert _refused(_attempt(guard, "a", "192.0.2.1", 0.0, status=200)) is None
    assert _refused(_attempt(guard, "a", "192.0.2.1", 1.0, status=302)) is None
    assert _refused(_attempt(guard, "a", "192.0.2.1", 2.0, status=200)) is None
    assert _refused(_attempt(guard, "a", "192.0.2.1", 3.0)) == 429


# -- leaked passwords -------------------------------------------------------------------


def _shipped_generator():
    spec = importlib.util.spec_from_file_location("gen_leaked", ROOT / "scripts/gen_leaked.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("password", ["password", "123456", "qwerty", "letmein", "Password1!",
                                      "iloveyou", "P@ssw0rd", "Dragon2024!", "asdfghjkl"])
def test_well_known_weak_passwords_are_leaked(password: str) -> None:
    assert LEAKED.is_leaked(password)


def test_generated_passwords_are_leaked_and_strong_ones_are_not() -> None:
    generated = _shipped_generator().passwords()
    for password in generated[::4999]:
        assert LEAKED.is_leaked(password), password
    for password in (STRONG, secrets.token_urlsafe(18), "correct horse battery staple 42",
                     "Password1!x", ""):
        assert not LEAKED.is_leaked(password), password


class SpyRange:
    """A range server that records what it was asked."""

    def __init__(self) -> None:
        self.inner, self.asked = LocalRange(), []

    def range(self, prefix: str) -> frozenset[str]:
        self.asked.append(prefix)
        return self.inner.range(prefix)


def test_the_range_server_sees_only_five_character_prefixes() -> None:
    spy = SpyRange()
    guard = _guard(leaked=LeakedPasswords(spy))
    passwords = [WEAK, STRONG, "letmein", "ü-unicode-pässword", "\ud800lone-surrogate"]
    for i, password in enumerate(passwords):
        body = json.dumps({"user": {"email": f"u{i}@x.org", "password": password}}).encode()
        guard.before("POST", "/api/session", JSON, body, "192.0.2.1", float(i))
    assert len(spy.asked) == len(passwords)
    for prefix, password in zip(spy.asked, passwords, strict=True):
        assert re.fullmatch(r"[0-9A-F]{5}", prefix)
        assert password not in prefix


def test_leaked_action_header_adds_the_header_for_the_origin() -> None:
    guard = _guard(leaked_action="header")
    check = guard.before("POST", "/login", FORM, _form("alice", WEAK), "192.0.2.1", 0.0)
    assert check.response is None and check.leaked
    assert check.origin_headers == ((EXPOSED_HEADER, "1"),)
    client_headers = [("host", "shop.example"), ("exposed-credential-check", "0")]
    assert forward_headers(check, client_headers) == [("host", "shop.example"),
                                                      (EXPOSED_HEADER, "1")]
    clean = guard.before("POST", "/login", FORM, _form("bob", STRONG), "192.0.2.1", 1.0)
    assert clean.origin_headers == () and not clean.leaked
    # A client cannot say it for itself, on any request.
    assert forward_headers(LoginCheck.none, client_headers) == [("host", "shop.example")]
    assert guard.stats()["leaked"] == 1


def test_leaked_action_block_answers_403_and_counts_a_failure() -> None:
    guard = _guard(leaked_action="block", client_failures=2)
    check = guard.before("POST", "/login", FORM, _form("alice", WEAK), "192.0.2.1", 0.0)
    assert _refused(check) == 403 and check.origin_headers == ()
    _attempt(guard, "bob", "192.0.2.1", 1.0)
    assert _refused(_attempt(guard, "carol", "192.0.2.1", 2.0)) == 429
    stats = guard.stats()
    assert (stats["leaked"], stats["blocked_leaked"]) == (1, 1)


def test_leaked_action_off_never_asks() -> None:
    spy = SpyRange()
    guard = _guard(leaked=LeakedPasswords(spy), leaked_action="off")
    check = guard.before("POST", "/login", FORM, _form("alice", WEAK), "192.0.2.1", 0.0)
    assert check.response is None and check.origin_headers == () and spy.asked == []


def test_a_refused_attempt_is_not_looked_up() -> None:
    spy = SpyRange()
    guard = _guard(leaked=LeakedPasswords(spy), client_failures=1)
    _attempt(guard, "a", "192.0.2.1", 0.0)
    _attempt(guard, "a", "192.0.2.1", 1.0)
    assert len(spy.asked) == 1


# -- privacy ----------------------------------------------------------------------------


def _reachable(root: object) -> Iterator[object]:
    """Every object reachable from root through our own objects and containers."""
    stack, seen = [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif type(obj).__module__.startswith("agent."):
            stack.extend(vars(obj).values() if hasattr(obj, "__dict__") else ())
            for cls in type(obj).__mro__:
                stack.extend(getattr(obj, s) for s in getattr(cls, "__slots__", ())
                             if hasattr(obj, s))


def test_neither_usernames_nor_passwords_nor_addresses_are_kept() -> None:
    guard = _guard(leaked_action="header")
    secrets_sent = ["alice.liddell@example.org", "Tr0ub4dor&3-zq", "198.51.100.77"]
    checks = [_attempt(guard, "Alice.Liddell@example.org", "198.51.100.77", 0.0,
                       password="Tr0ub4dor&3-zq"),
              _attempt(guard, "alice.liddell@example.org", "198.51.100.77", 1.0,
                       password=WEAK)]
    kept = [o for root in (guard, *checks) for o in _reachable(root)
            if isinstance(o, str | bytes)]
    assert len(guard._usernames) == 1 and len(guard._clients) == 1  # the state is there
    for text in secrets_sent:
        for needle in (text, text.casefold(), text.encode(), text.casefold().encode()):
            assert not any(type(needle) is type(o) and needle in o for o in kept), text


def test_stats_are_numbers_only() -> None:
    guard = _guard()
    _attempt(guard, "alice", "192.0.2.1", 0.0, password=WEAK)
    stats = guard.stats()
    assert all(type(v) is int for v in stats.values())
    assert set(stats) == {"checks", "unparsed", "failures", "leaked", "blocked_client",
                          "blocked_username", "blocked_leaked", "evicted", "tracked_clients",
                          "tracked_usernames"}


# -- settings ---------------------------------------------------------------------------


def test_valid_settings_read_from_yaml_shaped_data() -> None:
    settings = LoginSettings.model_validate({
        "endpoints": [{"path": "/wp-login.php", "username_field": "log", "password_field": "pwd",
                       "success_statuses": [302]},
                      {"path": "/api/login", "method": "post", "failure_statuses": [401]}],
        "client_failures": 20, "username_period": 900, "leaked_action": "block"})
    assert settings.endpoints[1].method == "POST" and settings.block == 600
    assert LoginSettings().endpoints == ()          # the default protects nothing


@pytest.mark.parametrize("data, message", [
    ({"endpoints": [{"path": "login"}]}, "is not a path"),
    ({"endpoints": [{"path": "/login?x=1"}]}, "is not a path"),
    ({"endpoints": [{"path": "/l", "method": "PO ST"}]}, "is not an HTTP method"),
    ({"endpoints": [{"path": "/l", "failure_statuses": [502]}]}, "never a failed login"),
    ({"endpoints": [{"path": "/l", "failure_statuses": [401, 401]}]}, "twice"),
    ({"endpoints": [{"path": "/l", "failure_statuses": []}]}, "no login could ever fail"),
    ({"endpoints": [{"path": "/l", "failure_statuses": [401], "success_statuses": [302]}]},
     "not both"),
    ({"endpoints": [{"path": "/l", "username_field": "x", "password_field": "x"}]},
     "are both"),
    ({"endpoints": [{"path": "/login"}, {"path": "/Login/"}]}, "is endpoints[0] again"),
    ({"endpoints": [{"path": "/l", "otp_field": "otp"}]}, "Extra inputs"),
    ({"client_failures": 0}, "greater than or equal to 1"),
    ({"username_period": 0}, "greater than 0"),
    ({"block": 0}, "greater than 0"),
    ({"leaked_action": "challenge"}, "'header', 'block' or 'off'"),
])
def test_invalid_settings_are_refused_with_a_reason(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        LoginSettings.model_validate(data)


def test_settings_are_immutable() -> None:
    with pytest.raises(ValidationError):
        LoginSettings().block = 1   # type: ignore[misc]


# -- the shipped data set ---------------------------------------------------------------


def test_the_shipped_set_is_what_the_generator_makes() -> None:
    data = DATA_PATH.read_bytes()
    assert len(data) < 1_500_000
    assert _shipped_generator().generate() == data
    assert len(LocalRange()) == 40_000


def test_range_answers_the_suffixes_under_a_prefix() -> None:
    local = LocalRange()
    digest = "5BAA61E4C9B93F3F0682250B6CF8331B7EE68FD8"     # SHA-1 of "password"
    assert digest[5:] in local.range(digest[:5])
    # The binary search agrees with a scan of the whole file, at the edges too.
    blob = DATA_PATH.read_bytes()[len(MAGIC):]
    every = [blob[i:i + 20].hex().upper() for i in range(0, len(blob), 20)]
    for prefix in ("00000", "FFFFF", digest[:5], every[0][:5], every[-1][:5],
                   every[len(every) // 2][:5]):
        assert local.range(prefix) == {d[5:] for d in every if d.startswith(prefix)}
    for bad in ("5baa6", "5BAA", "5BAA61", "GGGGG", digest):
        with pytest.raises(ValueError, match="not a range prefix"):
            local.range(bad)


def test_a_damaged_or_missing_set_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(MAGIC + b"\x00" * 21)
    with pytest.raises(LeakedDataError, match="not a leaked-password set"):
        LocalRange(bad).range("00000")
    with pytest.raises(LeakedDataError, match="cannot read"):
        LocalRange(tmp_path / "missing.bin").load()
