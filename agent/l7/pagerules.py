"""Page rules: URL patterns → settings, the first matching rule wins.

A pattern is a URL without its scheme, `*` matching any run of characters
(none included), e.g. `shop.example.eu/images/*` or `*.example.com/*.pdf`;
a pattern without a path matches the host's every path. The query string
is part of what is matched only if the pattern has a `?`. Matching is
case-insensitive in the host and case-sensitive in the path, like URLs.

Settings a rule may carry (all optional):
  cache_level     bypass | standard | cache_everything
  edge_ttl        seconds an object may stay cached (overrides the origin)
  always_https    answer plain HTTP with a redirect to HTTPS
  forwarding_url  {status: 301|302, url: "https://new.example/$1"}: answer
                  with a redirect; $1..$9 are what the pattern's stars took;
                  the query string is kept unless the pattern matched it
                  or the target URL has its own
  disable_waf     skip the managed WAF rules
Patterns are checked when the config is loaded; errors name the rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

CacheLevel = Literal["bypass", "standard", "cache_everything"]
MAX_STARS = 9


@dataclass(frozen=True)
class Forward:
    status: Literal[301, 302]
    url: str


@dataclass(frozen=True)
class Settings:
    cache_level: CacheLevel | None = None
    edge_ttl: int | None = None
    always_https: bool = False
    forwarding_url: Forward | None = None
    disable_waf: bool = False


NO_SETTINGS = Settings()    # what a request no rule matches gets (immutable, shared)


@dataclass(frozen=True)
class PageRule:
    pattern: str
    settings: Settings = field(default_factory=Settings)


@dataclass(slots=True)  # per request: frozen ones cost more to build
class Match:
    rule: int | None             # index of the matching rule, None: no rule
    settings: Settings
    redirect: tuple[int, str] | None = None   # (status, location) of forwarding_url


def _compile(pattern: str, index: int) -> tuple[re.Pattern, re.Pattern | None, bool]:
    """(host regex, path regex or None for any path, whether the query counts)."""
    if "://" in pattern:
        raise ValueError(f"page_rules[{index}].pattern: {pattern!r}: leave out the scheme")
    if pattern.count("*") > MAX_STARS:
        raise ValueError(f"page_rules[{index}].pattern: {pattern!r}: at most {MAX_STARS} '*'")
    host, slash, path = pattern.partition("/")
    if not host:
        raise ValueError(f"page_rules[{index}].pattern: {pattern!r}: starts with a host")

    def rx(part: str, flags: int = 0) -> re.Pattern:
        return re.compile("".join("(.*)" if c == "*" else re.escape(c) for c in part) + r"\Z",
                          flags)

    return (rx(host.lower(), re.IGNORECASE), rx("/" + path) if slash else None,
            "?" in path)


class PageRules:
    """A zone's page rules, compiled once; immutable, shared by reference."""

    def __init__(self, rules: Sequence[PageRule]) -> None:
        self.rules = tuple(rules)
        self._compiled = [_compile(r.pattern, i) for i, r in enumerate(self.rules)]
        for i, r in enumerate(self.rules):
            fwd = r.settings.forwarding_url
            if fwd is not None:
                stars = r.pattern.count("*")
                used = {int(n) for n in re.findall(r"\$(\d)", fwd.url)}
                if any(n < 1 or n > stars for n in used):
                    raise ValueError(f"page_rules[{i}].forwarding_url: {fwd.url!r} uses "
                                     f"${max(used)} but the pattern has {stars} '*'")

    def match(self, host: str, path: str, query: str = "") -> Match:
        if not self._compiled:
            return Match(None, NO_SETTINGS)
        host = host.lower()
        for i, (h_rx, p_rx, with_query) in enumerate(self._compiled):
            hm = h_rx.match(host)
            if hm is None:
                continue
            groups = list(hm.groups())
            if p_rx is not None:
                target = f"{path}?{query}" if with_query and query else path
                pm = p_rx.match(target)
                if pm is None:
                    continue
                groups += pm.groups()
            settings = self.rules[i].settings
            redirect = None
            if settings.forwarding_url is not None:
                url = re.sub(r"\$(\d)", lambda m, g=groups: g[int(m.group(1)) - 1],
                             settings.forwarding_url.url)
                # The request's query goes along, as users expect of a moved
                # page, unless the pattern consumed it or the target has one.
                if query and not with_query and "?" not in url:
                    url = f"{url}?{query}"
                redirect = (settings.forwarding_url.status, url)
            return Match(i, settings, redirect)
        return Match(None, NO_SETTINGS)
