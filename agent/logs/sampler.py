"""The operations sample's two secrets-grade helpers (DESIGN.md §2, invariant 4).

    sampler = Sampler(0.01)
    pz = Pseudonymizer()
    if sampler.draw():                       # on the event loop, per request
        client, period = pz.pseudonym(peer_ip)

Sampler: a simple random sample needs each request drawn independently with
the same probability; the draws come from the OS CSPRNG (os.urandom), so
nobody can predict or steer which requests are sampled. Random bytes are
read 4 KiB at a time (1024 draws) and compared as 32-bit integers with a
threshold, so one draw costs a C-level iterator step (~0.05 µs). The byte
source can be replaced (Sampler(rate, source=...)) for tests only, to make
a statistical test deterministic; the default, and the only one to serve
with, is os.urandom.

Quantization: the threshold is round(rate * 2**32), so the rate actually
drawn is threshold / 2**32, within 2**-33 (≈1.2e-10) of the configured
rate; rates under 2**-33 round to never, 1 is always.

Pseudonymizer: HMAC-SHA256 under a 32-byte key made with secrets.token_bytes
for each UTC day (period `YYYY-MM-DD`), of the client's packed address. The
address comes as the front end normalised it (agent/l7/server.py _socket_ip,
i.e. agent/l7/config.py normalise_ip): an IPv4 client on a dual-stack socket
is plain IPv4 text already, and there is no zone suffix. That is not done
again here; a caller with other text must normalise it first, or the same
client gets two pseudonyms.

The key exists only in this object's memory: it is never written, logged,
shown by repr, pickled or copied, and the previous day's is dropped at
rotation, so a pseudonym can be linked to an address only by someone
holding the current key (which no one outside this process ever does).
Python cannot promise that freed key bytes are overwritten; they are
unreachable, not zeroed.

Both are meant for one thread (the event loop): neither takes a lock.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import time
from array import array
from collections.abc import Callable, Iterator
from typing import NoReturn

POOL_BYTES = 4096
_WORD = "I" if array("I").itemsize == 4 else "L"  # a 32-bit unsigned C type
_SCALE = 1 << 32
DAY = 86_400
KEY_BYTES = 32


class Sampler:
    """Bernoulli draws with probability `rate` from the OS CSPRNG.

    `source(n)` gives n random bytes; None is os.urandom (looked up when the
    Sampler is made). Another source is for tests only (a seeded one makes
    a statistical test deterministic): the sample is fair and unsteerable
    only with the CSPRNG."""

    __slots__ = ("_draws", "_source", "_threshold", "rate")

    def __init__(self, rate: float, source: Callable[[int], bytes] | None = None) -> None:
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ValueError(f"sample rate {rate!r}: must be a number from 0 to 1 "
                             "(0.01 samples 1% of requests)")
        self.rate = float(rate)
        self._source = os.urandom if source is None else source
        self._threshold = round(self.rate * _SCALE)  # 2**32 at rate 1: every word is below
        self._draws: Iterator[bool] = iter(())

    @property
    def effective_rate(self) -> float:
        """The rate actually drawn, after quantization to 1 / 2**32."""
        return self._threshold / _SCALE

    def _refill(self) -> Iterator[bool]:
        words = array(_WORD, self._source(POOL_BYTES))
        # map() compares in C: a draw is one next() on this iterator.
        self._draws = map(self._threshold.__gt__, words)
        return self._draws

    def draw(self) -> bool:
        """True with probability `rate`, independently of every other draw."""
        hit = next(self._draws, None)
        if hit is None:
            hit = next(self._refill())
        return hit

    def __repr__(self) -> str:
        return f"Sampler(rate={self.rate})"


def packed_address(ip: str) -> bytes:
    """4 bytes for IPv4, 16 for IPv6, of an address as normalise_ip gives it
    (see the module docstring): a mapped form would pack as IPv6, a zone
    suffix is refused. The error does not repeat the value: it is a
    client's address."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        raise ValueError("client address is not an IPv4 or IPv6 address "
                         "(value withheld: personal data)") from None


def _period_of(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY))


class Pseudonymizer:
    """Client address → (32 hex digits, period), keyed per UTC day."""

    __slots__ = ("_clock", "_state")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # (day number, period text, HMAC primed with the day's key): one
        # reference, swapped whole at rotation, so a reader never mixes days.
        self._state: tuple[int, str, hmac.HMAC] | None = None

    def _rotate(self, day: int) -> tuple[int, str, hmac.HMAC]:
        # Only the primed HMAC keeps the key; the old state and its key go.
        mac = hmac.new(secrets.token_bytes(KEY_BYTES), digestmod=hashlib.sha256)
        self._state = (day, _period_of(day), mac)
        return self._state

    @property
    def period(self) -> str | None:
        """The current key's period, or None before the first pseudonym."""
        return None if self._state is None else self._state[1]

    def pseudonym(self, ip: str) -> tuple[str, str]:
        """(first 16 bytes of HMAC-SHA256(key, packed address) as hex, period);
        `ip` as normalise_ip gives it."""
        day = int(self._clock() // DAY)
        state = self._state
        if state is None or state[0] != day:  # a new day (or a clock stepped back)
            state = self._rotate(day)
        mac = state[2].copy()  # cheaper than hmac.new: the key's pads are reused
        mac.update(packed_address(ip))
        return mac.digest()[:16].hex(), state[1]

    def __repr__(self) -> str:
        return f"Pseudonymizer(period={self.period!r})"

    # The key must never leave this object: no pickling, no copies.
    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("Pseudonymizer holds a key that must never leave memory: "
                        "it cannot be pickled or copied")

    def __reduce__(self) -> NoReturn:
        self.__reduce_ex__(None)

    def __getstate__(self) -> NoReturn:
        self.__reduce_ex__(None)
