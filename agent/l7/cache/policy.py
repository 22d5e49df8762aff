"""HTTP caching rules (RFC 9111, RFC 9110 §13) for a shared cache, as pure functions.

Everything here reads header lists (lower-case names, values as received)
and answers one question; nothing is stored. The store (store.py) asks:

  may this response be stored?   `refusal`: None, or why not
  for how long is it fresh?      `freshness`: s-maxage over max-age over
                                 Expires - Date; a page rule's edge_ttl
                                 overrides all three; `default_ttl` fills in
                                 for an eligible 200/203 that says nothing
  how old is it on arrival?      `initial_age` (RFC 9111 4.2.3)
  which request headers vary it? `vary_names`, `vary_values`
  does a client's conditional    `not_modified`: If-None-Match (weak
  request get a 304?             comparison) else If-Modified-Since
  what does a 304 change?        `merge_304` (RFC 9111 3.2, 4.3.4)

Deliberate choices, stricter than RFC 9111 allows a shared cache to be:
  - a response with Set-Cookie is never stored, whatever else it says: a
    cookie meant for one user must never reach another;
  - `private` (even with field names) and `no-store` are never overridden,
    not by edge_ttl either;
  - a response to a request with Authorization is stored only if it says
    `public` or `s-maxage` (RFC 9111 3.5 also accepts must-revalidate;
    that alone would let one user's answer reach others while it is fresh);
  - `no-cache` (with or without field names) stores the response but
    makes it stale at once, so every use is revalidated; edge_ttl, the
    operator's explicit word, overrides it;
  - no heuristic freshness from Last-Modified: only explicit freshness,
    edge_ttl or default_ttl make a response fresh.
must-revalidate and proxy-revalidate need nothing more: this cache never
serves a stale response without revalidating it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import StrEnum

from agent.l7.forward import HOP_BY_HOP

Headers = Sequence[tuple[str, str]]

# RFC 9110 15.1 lists more heuristically cacheable codes; these are the ones
# a CDN edge keeps: content, choices, permanent redirects, negative answers.
CACHEABLE_STATUSES = frozenset({200, 203, 300, 301, 308, 404, 410})
DEFAULT_TTL_STATUSES = frozenset({200, 203})
# Not kept with a stored response: its connection's headers, framing the
# front end sets itself, Age (computed on each use), Set-Cookie (never).
NOT_STORED = HOP_BY_HOP | {"content-length", "age", "set-cookie"}
# A 304 may not change what the stored body is, nor the Vary the key was
# made from (RFC 9111 3.2 lets a cache keep fields its stored response
# depends on).
NOT_MERGED = NOT_STORED | {"content-encoding", "content-type", "content-range", "vary"}
# What a 304 to a client carries (RFC 9110 15.4.5), besides Age.
NOT_MODIFIED_FIELDS = frozenset({"cache-control", "content-location", "date", "etag",
                                 "expires", "last-modified", "vary"})
DELTA_MAX = 2**31                          # RFC 9111 1.2.2: cap, never overflow

_ETAG = re.compile(r'(?:W/)?"[^"]*"')


class NotStored(StrEnum):
    """Why a response was not stored (counted by the store, never logged)."""

    NOT_ELIGIBLE = "not-eligible"    # the lookup said so: method, rule, request no-store
    PURGED = "purged"                # the zone was purged while the origin answered
    NO_STORE = "no-store"
    PRIVATE = "private"
    SET_COOKIE = "set-cookie"
    AUTHORIZATION = "authorization"  # the request had it; no public or s-maxage
    VARY_STAR = "vary-star"
    STATUS = "status"                # not one of CACHEABLE_STATUSES
    NO_FRESHNESS = "no-freshness"    # never fresh and nothing to revalidate with
    TOO_LARGE = "too-large"


# The origin's own headers ruled it out: a cf-cache-status of BYPASS.
ORIGIN_REFUSALS = frozenset({NotStored.NO_STORE, NotStored.PRIVATE, NotStored.SET_COOKIE,
                             NotStored.AUTHORIZATION, NotStored.VARY_STAR,
                             NotStored.NO_FRESHNESS})


def values(headers: Headers, name: str) -> list[str]:
    return [v for n, v in headers if n == name]


def joined(headers: Headers, name: str) -> str | None:
    """All of a field's lines as one comma-separated value (RFC 9110 5.3)."""
    found = values(headers, name)
    return ", ".join(found) if found else None


def members(value: str) -> list[str]:
    """The members of a comma-separated list, trimmed and non-empty; a comma
    inside a quoted string does not split. Linear in the value's length:
    clients choose these values, so no backtracking regex reads them."""
    if '"' not in value:
        parts = value.split(",")
    else:
        parts, start, quoted, escaped = [], 0, False, False
        for i, ch in enumerate(value):
            if escaped:
                escaped = False
            elif quoted and ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = not quoted
            elif ch == "," and not quoted:
                parts.append(value[start:i])
                start = i + 1
        parts.append(value[start:])
        if quoted:                      # unbalanced: quotes prove nothing, split plainly
            parts = value.split(",")
    return [p.strip() for p in parts if p.strip()]


def cache_control(headers: Headers) -> dict[str, str | None]:
    """Directives of every Cache-Control line, lower-case names, unquoted values;
    the first of a repeated directive wins."""
    out: dict[str, str | None] = {}
    for line in values(headers, "cache-control"):
        for member in members(line):
            name, eq, value = member.partition("=")
            if not eq:
                out.setdefault(name.strip().lower(), None)
                continue
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            out.setdefault(name.strip().lower(), value)
    return out


def delta_seconds(value: str | None) -> int | None:
    """A delta-seconds value; None when absent or malformed."""
    value = value.strip() if value is not None else ""
    if not (value.isascii() and value.isdigit()):   # "²" is a digit to isdigit()
        return None
    return min(int(value), DELTA_MAX)


def http_date(value: str | None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) as a POSIX time; None if invalid."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:            # "-0000" and asctime: UTC by definition
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def refusal(status: int, headers: Headers, authorized: bool) -> NotStored | None:
    """Why this response must not be stored, or None (freshness is asked apart)."""
    cc = cache_control(headers)
    if "no-store" in cc:
        return NotStored.NO_STORE
    if "private" in cc:
        return NotStored.PRIVATE
    if any(n == "set-cookie" for n, _ in headers):
        return NotStored.SET_COOKIE
    if vary_names(headers) is None:
        return NotStored.VARY_STAR
    if authorized and "public" not in cc and "s-maxage" not in cc:
        return NotStored.AUTHORIZATION
    if status not in CACHEABLE_STATUSES:
        return NotStored.STATUS
    return None


@dataclass(frozen=True)
class Freshness:
    lifetime: float      # seconds
    from_now: bool       # an edge TTL: counts from storing, not from the response's age


def freshness(status: int, headers: Headers, received: float, edge_ttl: int | None,
              default_ttl: int | None) -> Freshness | None:
    """The freshness lifetime (RFC 9111 4.2.1), None when the response gives none.

    `received` stands in for a missing or invalid Date."""
    if edge_ttl is not None:
        return Freshness(float(edge_ttl), True)
    cc = cache_control(headers)
    if "no-cache" in cc:
        return Freshness(0.0, False)
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            # A malformed value is no licence to keep it: stale at once.
            return Freshness(float(delta_seconds(cc[directive]) or 0), False)
    expires = joined(headers, "expires")
    if expires is not None:
        at = http_date(expires)
        date = http_date(joined(headers, "date"))
        # RFC 9111 5.3: an invalid Expires (e.g. "0") means already expired.
        return Freshness(0.0 if at is None else max(0.0, at - (date or received)), False)
    if default_ttl is not None and status in DEFAULT_TTL_STATUSES:
        return Freshness(float(default_ttl), True)
    return None


def initial_age(headers: Headers, requested: float, received: float) -> float:
    """corrected_initial_age of RFC 9111 4.2.3: the response's age when it arrived."""
    date = http_date(joined(headers, "date"))
    apparent = max(0.0, received - date) if date is not None else 0.0
    age = delta_seconds(values(headers, "age")[0]) if values(headers, "age") else None
    corrected = (age or 0) + max(0.0, received - requested)
    return max(apparent, corrected)


def storable_headers(headers: Headers, drop: frozenset[str] = NOT_STORED
                     ) -> tuple[tuple[str, str], ...]:
    """The headers kept: without `drop` and without fields Connection names."""
    named = {t.strip().lower() for v in values(headers, "connection") for t in v.split(",")}
    return tuple((n, v) for n, v in headers if n not in drop and n not in named)


def merge_304(stored: Headers, update: Headers) -> tuple[tuple[str, str], ...]:
    """A stored response's headers refreshed by a 304 (RFC 9111 3.2): each field
    the 304 carries replaces the stored one, except those in NOT_MERGED."""
    fresh = storable_headers(update, NOT_MERGED)
    names = {n for n, _ in fresh}
    return tuple((n, v) for n, v in stored if n not in names) + fresh


def vary_names(headers: Headers) -> tuple[str, ...] | None:
    """The request headers a response varies on, sorted; None for Vary: *."""
    names = {t.strip().lower() for v in values(headers, "vary") for t in v.split(",")}
    names.discard("")
    if "*" in names:
        return None
    return tuple(sorted(names))


def vary_values(names: Iterable[str], request_headers: Headers
                ) -> tuple[tuple[str, str | None], ...]:
    """The request's value of each varied header, normalised: every list member
    trimmed, all lines joined by ","; None when the header is absent."""
    out = []
    for name in names:
        lines = values(request_headers, name)
        value = None
        if lines:
            value = ",".join(p.strip() for line in lines for p in line.split(",") if p.strip())
        out.append((name, value))
    return tuple(out)


def etags(value: str) -> list[str]:
    """The entity tags of an If-None-Match list (W/ kept); malformed members dropped."""
    return [m for m in members(value) if _ETAG.fullmatch(m)]


def weak_match(a: str, b: str) -> bool:
    """RFC 9110 8.8.3.2: equal opaque tags, either or both may be weak."""
    return a.removeprefix("W/") == b.removeprefix("W/")


def not_modified(status: int, etag: str | None, last_modified: str | None,
                 request_headers: Headers) -> bool:
    """Does a GET/HEAD with these headers get a 304 for this stored response?

    If-None-Match decides when present (RFC 9110 13.2.2), "*" matching any
    stored response; else If-Modified-Since does: 304 when the response's
    Last-Modified is not later than the date given."""
    if status != 200:
        return False
    inm = joined(request_headers, "if-none-match")
    if inm is not None:
        if inm.strip() == "*":
            return True
        return etag is not None and any(weak_match(t, etag) for t in etags(inm))
    ims = http_date(joined(request_headers, "if-modified-since"))
    if ims is None:  # the usual case: no date to parse at all
        return False
    modified = http_date(last_modified)
    return modified is not None and modified <= ims


def wants_revalidation(request_headers: Headers) -> bool:
    """The client asked for a validated answer: no-cache or max-age=0, or
    Pragma: no-cache when there is no Cache-Control (RFC 9111 5.4)."""
    cc = cache_control(request_headers)
    if cc:
        return "no-cache" in cc or delta_seconds(cc.get("max-age")) == 0
    return any("no-cache" in v.lower() for v in values(request_headers, "pragma"))


def forbids_storing(request_headers: Headers) -> bool:
    return "no-store" in cache_control(request_headers)
