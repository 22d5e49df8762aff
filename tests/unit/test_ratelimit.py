"""Rate limiting: sliding windows, blocks with Retry-After, keys, memory bound."""

from __future__ import annotations

import re

import pytest

from agent.l7.ratelimit import RateLimiter, RateRule

RULE = RateRule("api", requests=10, period=60, block=120)


def _run(rl: RateLimiter, n: int, at: float, src: str = "192.0.2.1", path: str = "/",
         headers: dict | None = None) -> list[bool]:
    return [rl.check(src, path, headers or {}, at).allowed for _ in range(n)]


def test_the_rate_is_allowed_and_one_more_is_blocked_with_retry_after() -> None:
    rl = RateLimiter([RULE])
    assert all(_run(rl, 10, at=0.0))
    d = rl.check("192.0.2.1", "/", {}, 0.5)
    assert not d.allowed and d.rule == "api" and d.retry_after == 120
    d = rl.check("192.0.2.1", "/", {}, 100.0)          # still blocked, less to wait
    assert not d.allowed and d.retry_after == 21
    assert rl.check("192.0.2.2", "/", {}, 1.0).allowed  # another client is not


def test_the_block_ends() -> None:
    rl = RateLimiter([RULE])
    _run(rl, 11, at=0.0)
    assert rl.check("192.0.2.1", "/", {}, 121.0).allowed


def test_the_window_slides() -> None:
    """10 requests at the end of one window still weigh half of themselves
    half-way through the next: 5 more fit there, not 10."""
    rl = RateLimiter([RateRule("r", requests=10, period=60, block=1)])
    assert all(_run(rl, 10, at=59.0))
    assert _run(rl, 6, at=90.0) == [True] * 5 + [False]


def test_keys_by_path_and_by_header() -> None:
    rl = RateLimiter([RateRule("login", 2, 60, 60, key="ip+path", path_prefix="/login")])
    assert _run(rl, 2, 0, path="/login/a") + _run(rl, 2, 0, path="/login/b") == [True] * 4
    assert not rl.check("192.0.2.1", "/login/a", {}, 1).allowed
    assert all(_run(rl, 5, 0, path="/other"))            # outside the rule's prefix
    rl = RateLimiter([RateRule("per-key", 1, 60, 60, key="ip+header", header="X-Api-Key")])
    assert _run(rl, 1, 0, headers={"x-api-key": "a"}) == [True]
    assert _run(rl, 1, 0, headers={"x-api-key": "b"}) == [True]
    assert _run(rl, 1, 0, headers={"x-api-key": "a"}) == [False]


def test_memory_is_bounded() -> None:
    rl = RateLimiter([RULE], max_keys=100)
    for i in range(250):
        rl.check(f"10.0.{i // 256}.{i % 256}", "/", {}, 0.0)
    assert len(rl._windows) == 100 and rl.evicted == 150


@pytest.mark.parametrize("kw,msg", [
    ({"requests": 0}, "requests >= 1"),
    ({"key": "ip+header"}, "a header goes with key ip+header"),
    ({"header": "x"}, "a header goes with key ip+header"),
])
def test_bad_rules_are_refused(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        RateRule(**{"name": "r", "requests": 5, "period": 1, "block": 1, **kw})
