"""Rate limiting per client: sliding windows, a block duration, 429 with Retry-After.

A rule allows `requests` per `period` seconds for each key: the client's
address alone, or with the request path, or with one header's value. The
window slides by weighting the previous fixed window by how much of it
still overlaps the last `period` seconds (the usual two-counter
approximation: exact at window edges, never off by more than one window's
share in between). A key over its rate is blocked for `block` seconds;
its requests get 429 with Retry-After, the whole seconds left.

State is in memory only, bounded to `max_keys` keys (least recently seen
evicted first, and counted), and owned by the front end's one event loop
thread, so no lock is needed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

Key = Literal["ip", "ip+path", "ip+header"]


@dataclass(frozen=True)
class RateRule:
    name: str
    requests: int
    period: float
    block: float
    key: Key = "ip"
    header: str | None = None          # for key "ip+header"
    path_prefix: str = "/"             # the rule applies to paths under this

    def __post_init__(self) -> None:
        if self.requests < 1 or self.period <= 0 or self.block < 0:
            raise ValueError(f"rate rule {self.name!r}: requests >= 1, period > 0 and "
                             "block >= 0 are needed")
        if (self.key == "ip+header") != (self.header is not None):
            raise ValueError(f"rate rule {self.name!r}: a header goes with key ip+header, "
                             "and only with it")


@dataclass(slots=True)  # per request: frozen ones cost more to build
class Decision:
    allowed: bool
    rule: str | None = None
    retry_after: int = 0               # seconds, for a 429's Retry-After


class Window:
    """Counts in two fixed windows of a key, and until when the key is blocked."""

    __slots__ = ("blocked_until", "current", "previous", "start")

    def __init__(self, start: float) -> None:
        self.start, self.current, self.previous, self.blocked_until = start, 0, 0, 0.0


class Windows:
    """Windows by key in a bounded LRU (least recently seen evicted first,
    and counted). Shared by the rate limiter and the login checks."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._windows: OrderedDict[Hashable, Window] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._windows)

    def peek(self, key: Hashable) -> Window | None:
        """The key's window as it is, if there is one (no roll, no LRU touch)."""
        return self._windows.get(key)

    def get(self, key: Hashable, period: float, now: float) -> Window:
        """The key's window, made if new, rolled forward to the one holding `now`."""
        w = self._windows.get(key)
        if w is None:
            w = Window(now - now % period)
            self._windows[key] = w
            if len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
                self.evicted += 1
        else:
            self._windows.move_to_end(key)
        periods = int((now - w.start) // period)
        if periods >= 1:
            w.previous = w.current if periods == 1 else 0
            w.current = 0
            w.start += periods * period
        return w


class RateLimiter:
    def __init__(self, rules: Sequence[RateRule], max_keys: int = 100_000) -> None:
        self.rules = tuple(rules)
        self.max_keys = max_keys
        self._windows = Windows(max_keys)

    @property
    def evicted(self) -> int:
        return self._windows.evicted

    def _key(self, i: int, rule: RateRule, src: str, path: str,
             headers: dict[str, str]) -> tuple:
        if rule.key == "ip":
            return (i, src)
        if rule.key == "ip+path":
            return (i, src, path)
        return (i, src, headers.get(rule.header.lower(), ""))

    def check(self, src: str, path: str, headers: dict[str, str], now: float) -> Decision:
        """Count this request against every rule that applies; the first
        rule over its rate decides (the request is counted either way)."""
        verdict = Decision(True)
        for i, rule in enumerate(self.rules):
            if not path.startswith(rule.path_prefix):
                continue
            w = self._windows.get(self._key(i, rule, src, path, headers), rule.period, now)
            if w.blocked_until > now:
                wait = math.ceil(w.blocked_until - now)
                verdict = verdict if not verdict.allowed else Decision(False, rule.name, wait)
                continue
            w.current += 1
            elapsed = (now - w.start) / rule.period
            rate = w.previous * (1 - elapsed) + w.current
            if rate > rule.requests:
                w.blocked_until = now + rule.block
                if verdict.allowed:
                    verdict = Decision(False, rule.name, max(1, math.ceil(rule.block)))
        return verdict
