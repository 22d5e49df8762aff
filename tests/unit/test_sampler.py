"""agent/logs/sampler.py: the operations sample's draw and its pseudonyms.

The draw must be a fair 1% from the CSPRNG; a pseudonym must be stable
within a UTC day, change with the day's key, and the key must never leave
the object (DESIGN.md §2, invariant 4).

The statistical test here draws from a seeded byte source, so it passes or
fails the same way every run; the CSPRNG's own 99.9% interval test is
tests/unit/test_sample_e2e.py's. No test here times anything (bench/ does).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import math
import os
import pickle
import random
from array import array

import pytest

from agent.l7.config import normalise_ip
from agent.logs import sampler as sampler_mod
from agent.logs.sampler import Pseudonymizer, Sampler, packed_address

DAY = 86_400
NOON = 1_700_000_000 - 1_700_000_000 % DAY + DAY // 2   # 2023-11-14 12:00 UTC


# --------------------------------------------------------------------------- Sampler


def binomial_interval(n: int, p: float, confidence: float) -> tuple[int, int]:
    """The central `confidence` interval of Binomial(n, p), computed exactly
    (scipy is not installed; the normal approximation is checked against it)."""
    tail = (1 - confidence) / 2
    logpmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
              + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(n + 1)]
    pmf = [math.exp(x) for x in logpmf]
    below = 0.0
    lo = 0
    while below + pmf[lo] <= tail:   # P(X < lo) <= tail
        below += pmf[lo]
        lo += 1
    above = 0.0
    hi = n
    while above + pmf[hi] <= tail:   # P(X > hi) <= tail
        above += pmf[hi]
        hi -= 1
    return lo, hi


@pytest.mark.parametrize("seed", [1, 23, 2024])
def test_one_percent_lies_in_the_binomial_interval(seed: int) -> None:
    """Deterministic: the words come from a seeded generator, standing in for
    os.urandom (whose own test, 1-in-1000 flaky by design, is end to end)."""
    n, p = 20_000, 0.01
    lo, hi = binomial_interval(n, p, 0.999)
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    assert abs(lo - (mean - 3.29 * sd)) < 5 and abs(hi - (mean + 3.29 * sd)) < 5
    s = Sampler(p, source=random.Random(seed).randbytes)
    hits = sum(s.draw() for _ in range(n))
    assert lo <= hits <= hi, f"{hits} draws of {n} at {p}: outside [{lo}, {hi}]"
    again = Sampler(p, source=random.Random(seed).randbytes)
    assert sum(again.draw() for _ in range(n)) == hits  # the same seed, the same draws


def test_a_draw_is_its_word_below_the_threshold() -> None:
    s = Sampler(0.25)
    t = s._threshold
    assert t == 1 << 30
    words = [t - 1, t, t + 1, 0, 2**32 - 1] + [t] * 1019   # one pool: 1024 words
    pools = [array(sampler_mod._WORD, words).tobytes()]
    s = Sampler(0.25, source=lambda n: pools.pop())
    draws = [s.draw() for _ in range(1024)]
    assert draws[:5] == [True, False, False, True, False] and not any(draws[5:])
    assert all(type(d) is bool for d in draws)


def test_rate_zero_never_and_one_always() -> None:
    never, always = Sampler(0), Sampler(1.0)
    assert not any(never.draw() for _ in range(20_000))
    assert all(always.draw() for _ in range(20_000))
    assert Sampler(1e-12).effective_rate == 0.0  # under 2**-33: rounds to never


def test_the_threshold_is_quantized_to_2_pow_minus_32() -> None:
    for rate in (0.01, 0.5, 1 / 3, 0.999_999):
        assert abs(Sampler(rate).effective_rate - rate) <= 2 ** -33


@pytest.mark.parametrize("rate", [-0.01, 1.01, float("nan"), "0.1", None, True])
def test_a_bad_rate_is_refused_clearly(rate: object) -> None:
    with pytest.raises(ValueError, match=r"sample rate .*: must be a number from 0 to 1"):
        Sampler(rate)  # type: ignore[arg-type]


def test_the_default_source_is_os_urandom() -> None:
    assert Sampler(0.01)._source is os.urandom
    assert Sampler(0.01, source=None)._source is os.urandom


def test_draws_come_from_os_urandom_in_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = sampler_mod.os.urandom

    def urandom(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(sampler_mod.os, "urandom", urandom)
    s = Sampler(0.5)
    for _ in range(3000):  # 1024 draws a pool
        s.draw()
    assert calls == [4096, 4096, 4096]


# --------------------------------------------------------------------------- Pseudonymizer


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_same_address_has_one_pseudonym_within_a_day() -> None:
    clock = Clock(NOON)
    pz = Pseudonymizer(clock)
    a, period = pz.pseudonym("203.0.113.10")
    assert len(a) == 32 and int(a, 16) >= 0 and period == "2023-11-14"
    clock.t = NOON + DAY // 2 - 1   # 23:59:59 the same day
    assert pz.pseudonym("203.0.113.10") == (a, period)
    assert pz.pseudonym("203.0.113.11")[0] != a


def test_a_new_utc_day_brings_a_new_key() -> None:
    clock = Clock(NOON + DAY // 2 - 0.001)   # just before midnight UTC
    pz = Pseudonymizer(clock)
    before = pz.pseudonym("2001:db8::1")
    clock.t += 0.002                         # just after
    after = pz.pseudonym("2001:db8::1")
    assert after[1] == "2023-11-15" and after[0] != before[0]
    clock.t -= 0.002                         # a clock stepped back: the old key is gone
    again = pz.pseudonym("2001:db8::1")
    assert again[1] == before[1] and again[0] != before[0]


def test_one_client_one_pseudonym_after_the_front_ends_normalisation() -> None:
    """The front end gives normalise_ip's text (agent/l7/server.py _socket_ip):
    a mapped IPv4 client is plain IPv4 by then, a zone suffix gone."""
    pz = Pseudonymizer(Clock(NOON))
    v4 = pz.pseudonym("203.0.113.10")
    for seen in ("::ffff:203.0.113.10", "::FFFF:cb00:710a", "203.0.113.10"):
        assert pz.pseudonym(normalise_ip(seen)) == v4
    assert pz.pseudonym(normalise_ip("fe80::1%eth0")) == pz.pseudonym("fe80::1")
    assert pz.pseudonym("2001:db8:0:0::1") == pz.pseudonym("2001:db8::1")  # same bytes
    assert packed_address("203.0.113.10") == bytes([203, 0, 113, 10])
    assert len(packed_address("2001:db8::1")) == 16
    with pytest.raises(ValueError):
        packed_address("fe80::1%eth0")  # not normalised: refused, not guessed at


def test_it_is_the_hmac_of_the_packed_address(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []

    def token_bytes(n: int) -> bytes:
        sizes.append(n)
        return b"k" * n

    monkeypatch.setattr(sampler_mod.secrets, "token_bytes", token_bytes)
    pz = Pseudonymizer(Clock(NOON))
    want = hmac.new(b"k" * 32, bytes([203, 0, 113, 10]), hashlib.sha256).digest()[:16].hex()
    assert pz.pseudonym("203.0.113.10") == (want, "2023-11-14")
    assert sizes == [32]  # one 32-byte key for the period, made when it started


def test_the_key_cannot_leave_the_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampler_mod.secrets, "token_bytes", lambda n: b"\xab" * n)
    pz = Pseudonymizer(Clock(NOON))
    pz.pseudonym("203.0.113.10")
    for text in (repr(pz), str(pz)):
        assert "ab" * 4 not in text and "\\xab" not in text, text
    assert repr(pz) == "Pseudonymizer(period='2023-11-14')"
    assert not hasattr(pz, "__dict__")  # slots: vars() shows nothing
    for leak in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="never leave memory"):
            leak(pz)


def test_a_bad_address_is_refused_without_repeating_it() -> None:
    pz = Pseudonymizer(Clock(NOON))
    with pytest.raises(ValueError) as e:
        pz.pseudonym("not-an-address-203.0.113")
    assert "203.0.113" not in str(e.value) and "IPv4 or IPv6" in str(e.value)
