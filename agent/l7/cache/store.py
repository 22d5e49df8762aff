"""The edge cache: lookups, storing origin answers, revalidation, purges, counters.

The front end's request path uses it like this (no sockets here; `now`
is wall-clock time, time.time(), and may be left out):

    plan = cache.lookup(zone_cfg, page_settings, zone, method, host, path, query, headers)
    plan.fresh          → answer from plan.entry: entry.status, entry.body,
                          entry.response_headers(); a 304 instead when
                          cache.not_modified_for_client(entry, headers)
    otherwise           → ask the origin with plan.origin_headers(headers)
      304 and plan.revalidating
                        → entry = cache.revalidated(plan, headers_of_304); answer from
                          it (status REVALIDATED: cache.lookup_entry(plan, entry))
      anything else     → answer the origin's response; if cache.would_store(plan,
                          status, headers, length).stored, keep the body and call
                          cache.store(plan, status, headers, body) (its .status is
                          the one to send: BYPASS when the origin forbade storing)
    unsafe methods      → cache.invalidate(plan, status) after the origin answered
    every answer        → `cf-cache-status: <plan.status>` (CACHE_STATUS_HEADER)

Statuses (what the header says, and what stats() counts):
  HIT          served from the cache while fresh
  MISS         eligible but not cached (or a client's no-cache forced a
               refetch of a fresh entry); the origin's answer may be stored
  EXPIRED      a stale entry fetched again whole: it had no validators, or
               the origin answered our conditional request with a 200
  REVALIDATED  a stale entry the origin confirmed (304): refreshed, served
  BYPASS       eligible by extension or rule, but not cached: page rule
               cache_level bypass, the zone's cache disabled, or the request
               said no-store; store() reports BYPASS too when the origin's
               own headers forbade storing (no-store, private, Set-Cookie ...)
  DYNAMIC      not eligible: a method other than GET and HEAD, or a path
               without a static extension and no cache_everything rule

Eligibility: page rule cache_level "bypass" never caches; "standard" (or no
rule) caches paths whose extension is in the zone's list; "cache_everything"
caches any path. Either way the origin's headers decide what is stored and
for how long (policy.py), a page rule's edge_ttl overriding the freshness.

Requests: HEAD is answered from the GET entry, never stored itself. A
request's Cache-Control no-store keeps its answer out of the cache (a fresh
entry is still served: reading a shared object reveals nothing about this
client); no-cache, max-age=0 or Pragma: no-cache makes even a fresh entry
be revalidated. When the answer may be stored, the client's own
conditionals and Range are not sent on (origin_headers): the cache needs
the whole 200, and a whole 200 is a valid answer to either.

Vary: each (zone, host, path, query) remembers the Vary its last stored
response named; the entry key adds the request's values of those headers.
A response with a different Vary replaces every variant of the URL.

Memory is an LRU bounded by entry bytes (body, headers, key). An evicted
static entry, still fresh or revalidatable, spills to the encrypted disk
store (disk.py) when one is configured; a disk hit moves it back to memory.
A purge (URL with all its variants, path prefix, zone) removes memory and
disk copies, and an origin answer that was in flight during a purge of its
zone is not stored (it may predate the purge).

Privacy: nothing about a request is logged. A Lookup holds the request's
headers while the request lasts (for Vary) and keeps them out of its repr,
as it does the host and path. Counters are by status and reason only.
The front end's one event loop thread owns the cache, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from agent.l7.cache import policy
from agent.l7.cache.disk import DiskStore
from agent.l7.cache.entry import CacheKey, Entry, Primary
from agent.l7.cache.policy import NotStored
from agent.l7.cache.settings import CacheStoreSettings, CacheZoneSettings
from agent.l7.pagerules import Settings

CACHE_STATUS_HEADER = "cf-cache-status"
CACHED_METHODS = frozenset({"GET", "HEAD"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Dropped from a request whose answer is to be stored: they could make the
# origin send a 304 or a 206 where the cache needs the whole 200.
NOT_FORWARDED = frozenset({"if-none-match", "if-modified-since", "range", "if-range"})
CONDITIONALS = frozenset({"if-none-match", "if-modified-since"})
# What the cache reads of a request: no-store, no-cache, max-age=0,
# Authorization, and the client's own conditionals.
POLICY_REQUEST_HEADERS = frozenset({"cache-control", "pragma", "authorization", *CONDITIONALS})

Headers = Sequence[tuple[str, str]]


class Status(StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    EXPIRED = "EXPIRED"
    REVALIDATED = "REVALIDATED"
    BYPASS = "BYPASS"
    DYNAMIC = "DYNAMIC"


class Action(StrEnum):
    SERVE = "serve"              # answer from `entry`
    REVALIDATE = "revalidate"    # ask the origin conditionally; a 304 refreshes `entry`
    FETCH = "fetch"              # ask the origin


@dataclass(slots=True)  # not frozen: made per request, and frozen ones cost 4x to build
class Lookup:
    """What to do with one request, and what store()/revalidated() need later.
    Read-only by convention (lookup_entry() makes a new one)."""

    action: Action
    status: Status
    entry: Entry | None          # SERVE: the fresh entry; REVALIDATE: the stale one
    storable: bool               # the origin's answer may be stored (if it allows)
    zone: str
    host: str = field(repr=False)
    path: str = field(repr=False)
    query: str = field(repr=False)
    method: str
    static: bool
    authorized: bool             # the request had Authorization
    requested_at: float
    generation: int              # the zone's purge count at lookup
    zone_settings: CacheZoneSettings = field(repr=False)
    page: Settings = field(repr=False)
    request_headers: tuple[tuple[str, str], ...] = field(repr=False)
    plain: bool = False          # the request has none of POLICY_REQUEST_HEADERS

    @property
    def fresh(self) -> bool:
        return self.action is Action.SERVE

    @property
    def revalidating(self) -> bool:
        return self.action is Action.REVALIDATE

    @property
    def conditional_headers(self) -> list[tuple[str, str]]:
        """If-None-Match / If-Modified-Since from the stale entry's validators."""
        if not self.revalidating or self.entry is None:
            return []
        out = []
        if self.entry.etag is not None:
            out.append(("if-none-match", self.entry.etag))
        if self.entry.last_modified is not None:
            out.append(("if-modified-since", self.entry.last_modified))
        return out

    def origin_headers(self, headers: Headers) -> list[tuple[str, str]]:
        """`headers` (bound for the origin) as this plan needs them: without the
        client's conditionals and Range when the answer may be stored or a
        stale entry is revalidated, with the cache's own conditionals."""
        if not (self.storable or self.revalidating):
            return list(headers)
        return [(n, v) for n, v in headers if n not in NOT_FORWARDED] + \
            self.conditional_headers


@dataclass(frozen=True)
class Stored:
    stored: bool
    reason: NotStored | None     # why not
    status: Status               # the cache status this answer amounts to


@dataclass(frozen=True)
class _Verdict:
    reason: NotStored | None
    initial_age: float = 0.0
    expires_at: float = 0.0


def _plain(headers: tuple[tuple[str, str], ...]) -> bool:
    """None of the request headers a lookup must read is there."""
    for name, _ in headers:  # noqa: SIM110 -- per request; a loop is 3x all() of a generator
        if name in POLICY_REQUEST_HEADERS:
            return False
    return True


def _host(host: str) -> str:
    """Lower-case name without port, brackets or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.removesuffix(".")


def _extension(path: str) -> str:
    name = path.rpartition("/")[2]
    return name.rpartition(".")[2].lower() if "." in name else ""


class Cache:
    def __init__(self, settings: CacheStoreSettings | None = None) -> None:
        """Creates the in-memory keys and, with a disk_dir, empties it (disk.py)."""
        self.settings = settings or CacheStoreSettings()
        self._mem: OrderedDict[CacheKey, Entry] = OrderedDict()   # LRU: oldest first
        self._vary: dict[Primary, tuple[str, ...]] = {}
        self._variants: dict[Primary, set[CacheKey]] = {}          # in memory or on disk
        self._generation: dict[str, int] = {}
        self._disk = (DiskStore(self.settings.disk_dir, self.settings.disk_bytes)
                      if self.settings.disk_dir else None)
        self.memory_bytes = 0
        self._status = dict.fromkeys(Status, 0)
        self._not_stored = dict.fromkeys(NotStored, 0)
        self.stored = self.evictions = self.spilled = self.promoted = self.purged = 0

    # -- the request path ---------------------------------------------------------

    def lookup(self, zone_settings: CacheZoneSettings, page: Settings, zone: str, method: str,
               host: str, path: str, query: str, request_headers: Headers,
               now: float | None = None) -> Lookup:
        now = time.time() if now is None else now
        method = method.upper()
        headers = request_headers if type(request_headers) is tuple else tuple(request_headers)
        host = _host(host)
        level = page.cache_level or "standard"
        static = _extension(path) in zone_settings.extensions
        # Most requests carry none of the headers the policy reads: then no
        # Cache-Control or Pragma to parse, and no Authorization to heed.
        plain = _plain(headers)
        entry: Entry | None = None
        storable = False
        if method not in CACHED_METHODS:
            action, status = Action.FETCH, Status.DYNAMIC
        elif not zone_settings.enabled or level == "bypass":
            action, status = Action.FETCH, Status.BYPASS
        elif not static and level != "cache_everything":
            action, status = Action.FETCH, Status.DYNAMIC
        else:
            no_store = not plain and policy.forbids_storing(headers)
            found = self._find((zone, host, path, query), headers, now)
            action, status = Action.FETCH, Status.MISS
            if found is None:
                storable = method == "GET" and not no_store
                if no_store:
                    status = Status.BYPASS
            elif found.fresh(now) and (plain or not policy.wants_revalidation(headers)):
                action, status, entry = Action.SERVE, Status.HIT, found
            elif no_store:
                status = Status.BYPASS
            else:
                storable = method == "GET"
                if not found.fresh(now):
                    status = Status.EXPIRED
                if found.etag is not None or found.last_modified is not None:
                    action, entry = Action.REVALIDATE, found
        self._status[status] += 1
        return Lookup(action, status, entry, storable, zone, host, path, query, method, static,
                      not plain and any(n == "authorization" for n, _ in headers), now,
                      self._generation.get(zone, 0), zone_settings, page, headers, plain)

    def lookup_entry(self, lookup: Lookup, entry: Entry) -> Lookup:
        """The plan to answer from an entry revalidated() returned."""
        return replace(lookup, action=Action.SERVE, status=Status.REVALIDATED, entry=entry,
                       storable=False)

    def max_object_bytes(self, zone_settings: CacheZoneSettings) -> int:
        """The largest body the zone may store (also bounded by memory)."""
        return min(zone_settings.max_object_bytes, self.settings.memory_bytes)

    def would_store(self, lookup: Lookup, status: int, headers: Headers,
                    length: int | None = None, now: float | None = None) -> Stored:
        """What store() would do with this answer, judged by its head (and its
        length, if known), before the body is read: lets a caller streaming the
        body decide whether to keep a copy, and which status to send (BYPASS
        when the origin's headers forbid storing)."""
        now = time.time() if now is None else now
        reason = self._judge(lookup, status, tuple(headers), length, now).reason
        if reason is None:
            return Stored(True, None, lookup.status)
        self._not_stored[reason] += 1
        return Stored(False, reason, Status.BYPASS if reason in policy.ORIGIN_REFUSALS
                      else lookup.status)

    def may_store(self, lookup: Lookup, status: int, headers: Headers,
                  length: int | None = None, now: float | None = None) -> bool:
        return self.would_store(lookup, status, headers, length, now).stored

    def store(self, lookup: Lookup, status: int, headers: Headers, body: bytes,
              now: float | None = None) -> Stored:
        """Keep the origin's answer if the plan and the response allow it."""
        now = time.time() if now is None else now
        headers = tuple(headers)
        verdict = self._judge(lookup, status, headers, len(body), now)
        if verdict.reason is None:
            names = policy.vary_names(headers) or ()
            key = CacheKey(lookup.zone, lookup.host, lookup.path, lookup.query,
                           policy.vary_values(names, lookup.request_headers))
            entry = Entry(key, status, policy.storable_headers(headers), bytes(body), now,
                          verdict.initial_age, verdict.expires_at, lookup.static)
            if entry.size <= self.settings.memory_bytes:
                if self._vary.get(key.primary) != names:
                    # A new Vary: the old variants were keyed by other headers.
                    for old in list(self._variants.get(key.primary, ())):
                        self._remove(old)
                    self._vary[key.primary] = names
                self._insert(entry, now)
                self.stored += 1
                return Stored(True, None, lookup.status)
            verdict = _Verdict(NotStored.TOO_LARGE)
        reason = verdict.reason
        self._not_stored[reason] += 1
        return Stored(False, reason, Status.BYPASS if reason in policy.ORIGIN_REFUSALS
                      else lookup.status)

    def revalidated(self, lookup: Lookup, headers: Headers, now: float | None = None) -> Entry:
        """The stale entry refreshed by the origin's 304 (RFC 9111 4.3.4): headers
        merged, freshness computed anew. Returns the entry to answer with; it is
        kept in the cache if the merged headers still allow it."""
        if lookup.action is not Action.REVALIDATE or lookup.entry is None:
            raise ValueError("revalidated() needs a plan with action REVALIDATE")
        now = time.time() if now is None else now
        old = lookup.entry
        merged = policy.merge_304(old.headers, tuple(headers))
        age = policy.initial_age(tuple(headers), lookup.requested_at, now)
        f = policy.freshness(old.status, merged, now, lookup.page.edge_ttl,
                             lookup.zone_settings.default_ttl)
        expires = now if f is None else now + f.lifetime - (0.0 if f.from_now else age)
        entry = Entry(old.key, old.status, merged, old.body, now, age, expires, old.static)
        self._status[lookup.status] -= 1
        self._status[Status.REVALIDATED] += 1
        reason = policy.refusal(old.status, merged, lookup.authorized)
        primary, names = old.key.primary, tuple(n for n, _ in old.key.vary)
        if self._generation.get(lookup.zone, 0) != lookup.generation:
            pass                          # purged meanwhile: serve once, keep nothing
        elif reason is NotStored.AUTHORIZATION:
            pass                          # refreshed for this client only
        elif reason is not None or f is None:
            self._remove(old.key)
        elif self._vary.setdefault(primary, names) == names:
            # (An entry evicted meanwhile comes back; one whose URL has been
            # stored with another Vary since does not.)
            self._insert(entry, now)
        return entry

    def not_modified_for_client(self, entry: Entry, request_headers: Headers,
                                plain: bool = False) -> bool:
        """Does the client's own conditional get a 304 from this entry?
        `plain`: the lookup found no conditional (Lookup.plain) to read."""
        if plain or not any(n in CONDITIONALS for n, _ in request_headers):
            return False
        return policy.not_modified(entry.status, entry.etag, entry.last_modified,
                                   tuple(request_headers))

    def invalidate(self, lookup: Lookup, status: int) -> int:
        """After an unsafe method (POST, PUT, DELETE ...) got a non-error answer,
        the URL's stored responses are dropped (RFC 9111 4.4)."""
        if lookup.method in SAFE_METHODS or not 200 <= status < 400:
            return 0
        primary = (lookup.zone, lookup.host, lookup.path, lookup.query)
        keys = list(self._variants.get(primary, ()))
        for key in keys:
            self._remove(key)
        return len(keys)

    # -- purges ------------------------------------------------------------------

    def purge_url(self, zone: str, host: str, path: str, query: str = "") -> int:
        """One URL with all its Vary variants; returns the objects removed."""
        want = (zone, _host(host), path, query)
        return self._purge(zone, lambda p: p == want)

    def purge_prefix(self, zone: str, host: str, path_prefix: str) -> int:
        host = _host(host)
        return self._purge(zone, lambda p: p[0] == zone and p[1] == host
                           and p[2].startswith(path_prefix))

    def purge_zone(self, zone: str) -> int:
        return self._purge(zone, lambda p: p[0] == zone)

    def _purge(self, zone: str, match: Callable[[Primary], bool]) -> int:
        self._generation[zone] = self._generation.get(zone, 0) + 1
        keys = [k for p, ks in self._variants.items() if match(p) for k in ks]
        for key in keys:
            self._remove(key)
        self.purged += len(keys)
        return len(keys)

    # -- status page and shutdown ---------------------------------------------------

    def stats(self) -> dict:
        disk = self._disk
        on_disk = {"objects": 0, "bytes": 0, "limit": 0, "evictions": 0, "rejected": 0,
                   "errors": 0, "purged_at_start": 0}
        if disk is not None:
            on_disk = {"objects": len(disk), "bytes": disk.bytes, "limit": disk.max_bytes,
                       "evictions": disk.evictions, "rejected": disk.rejected,
                       "errors": disk.errors, "purged_at_start": disk.purged_at_start}
        return {
            "status": {s.value: n for s, n in self._status.items()},
            "stored": self.stored,
            "not_stored": {r.value: n for r, n in self._not_stored.items()},
            "purged": self.purged,
            "memory": {"objects": len(self._mem), "bytes": self.memory_bytes,
                       "limit": self.settings.memory_bytes, "evictions": self.evictions},
            "disk": {"enabled": disk is not None, **on_disk, "spilled": self.spilled,
                     "promoted": self.promoted},
        }

    def close(self) -> None:
        """Drop everything, disk files included (unreadable once the keys are gone)."""
        for key in list(self._mem):
            self._remove(key)
        if self._disk is not None:
            self._disk.clear()
        self._variants.clear()
        self._vary.clear()

    # -- storage -------------------------------------------------------------------

    def _judge(self, lookup: Lookup, status: int, headers: Headers, length: int | None,
               now: float) -> _Verdict:
        if not lookup.storable:
            return _Verdict(NotStored.NOT_ELIGIBLE)
        if self._generation.get(lookup.zone, 0) != lookup.generation:
            return _Verdict(NotStored.PURGED)
        reason = policy.refusal(status, headers, lookup.authorized)
        if reason is not None:
            return _Verdict(reason)
        if length is not None and length > self.max_object_bytes(lookup.zone_settings):
            return _Verdict(NotStored.TOO_LARGE)
        f = policy.freshness(status, headers, now, lookup.page.edge_ttl,
                             lookup.zone_settings.default_ttl)
        if f is None:
            return _Verdict(NotStored.NO_FRESHNESS)
        age = policy.initial_age(headers, lookup.requested_at, now)
        expires = now + f.lifetime - (0.0 if f.from_now else age)
        validators = any(n in ("etag", "last-modified") for n, _ in headers)
        if expires <= now and not validators:
            return _Verdict(NotStored.NO_FRESHNESS)   # stale on arrival, never reusable
        return _Verdict(None, age, expires)

    def _find(self, primary: Primary, headers: Headers, now: float) -> Entry | None:
        names = self._vary.get(primary)
        if names is None:
            return None
        vary = policy.vary_values(names, headers) if names else ()
        # A plain tuple finds a CacheKey (a NamedTuple: same hash, equal),
        # without building one on every hit.
        entry = self._mem.get((*primary, vary))
        if entry is not None:
            self._mem.move_to_end(entry.key)
            return entry
        key = CacheKey(*primary, vary)
        raw = key.encode()
        if self._disk is None or raw not in self._disk:
            return None
        data = self._disk.take(raw)
        try:
            entry = Entry.from_bytes(data) if data is not None else None
        except ValueError:
            entry = None
        if entry is None or entry.key != key:
            # Authenticated data that is not this key's entry cannot happen
            # unless the format changed; either way it is a miss.
            self._forget(key)
            return None
        self.promoted += 1
        self._insert(entry, now)
        return entry

    def _insert(self, entry: Entry, now: float) -> None:
        key = entry.key
        self._drop(key)
        self._mem[key] = entry
        self.memory_bytes += entry.size
        self._variants.setdefault(key.primary, set()).add(key)
        while self.memory_bytes > self.settings.memory_bytes and self._mem:
            old_key, old = self._mem.popitem(last=False)
            self.memory_bytes -= old.size
            self.evictions += 1
            if not self._spill(old, now):
                self._forget(old_key)

    def _spill(self, entry: Entry, now: float) -> bool:
        """Write an evicted entry to disk if it is static and still of use."""
        if self._disk is None or not entry.static:
            return False
        if not entry.fresh(now) and entry.etag is None and entry.last_modified is None:
            return False
        evicted = self._disk.put(entry.key.encode(), entry.to_bytes())
        if evicted is None:
            return False
        self.spilled += 1
        for raw in evicted:
            self._forget(CacheKey.decode(raw))
        return True

    def _drop(self, key: CacheKey) -> bool:
        """Remove the key's copies (memory, disk); the Vary index stays."""
        entry = self._mem.pop(key, None)
        if entry is not None:
            self.memory_bytes -= entry.size
        on_disk = self._disk is not None and self._disk.delete(key.encode())
        return entry is not None or on_disk

    def _forget(self, key: CacheKey) -> None:
        """Take the key out of the Vary index; the URL's last variant takes its Vary."""
        variants = self._variants.get(key.primary)
        if variants is None:
            return
        variants.discard(key)
        if not variants:
            del self._variants[key.primary]
            self._vary.pop(key.primary, None)

    def _remove(self, key: CacheKey) -> bool:
        removed = self._drop(key)
        self._forget(key)
        return removed
