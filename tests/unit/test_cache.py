"""The edge cache without sockets: keys and Vary, HTTP caching rules, eligibility,
memory LRU, the encrypted disk spill, purges, revalidation, client 304s, Age."""

from __future__ import annotations

import os
import stat
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.l7.cache import (
    CACHE_STATUS_HEADER,
    DEFAULT_EXTENSIONS,
    Action,
    Cache,
    CacheDirError,
    CacheStoreSettings,
    CacheZoneSettings,
    Lookup,
    NotStored,
    Status,
    Stored,
    policy,
)
from agent.l7.pagerules import Settings

T0 = 1_700_000_000.0
ZONE = CacheZoneSettings()
STD = Settings()
HOST = "shop.example.eu"
CC60 = [("cache-control", "max-age=60")]


def _date(t: float) -> str:
    return formatdate(t, usegmt=True)


def _lookup(cache: Cache, path: str = "/a.css", method: str = "GET", headers=(),
            page: Settings = STD, zs: CacheZoneSettings = ZONE, zone: str = "z",
            host: str = HOST, query: str = "", now: float = T0) -> Lookup:
    return cache.lookup(zs, page, zone, method, host, path, query, list(headers), now)


def _fill(cache: Cache, path: str = "/a.css", response=CC60, body: bytes = b"body",
          status: int = 200, headers=(), now: float = T0, **kw) -> Stored:
    plan = _lookup(cache, path, headers=headers, now=now, **kw)
    return cache.store(plan, status, list(response), body, now)


def _status(cache: Cache, path: str = "/a.css", **kw) -> Status:
    return _lookup(cache, path, **kw).status


# -- keys, methods, Vary ------------------------------------------------------------

def test_a_stored_get_is_a_hit_for_get_and_head() -> None:
    cache = Cache()
    first = _lookup(cache)
    assert (first.status, first.action, first.storable) == (Status.MISS, Action.FETCH, True)
    assert cache.store(first, 200, CC60, b"hello", T0).stored
    hit = _lookup(cache, now=T0 + 1)
    assert hit.status == Status.HIT and hit.fresh and hit.entry.body == b"hello"
    head = _lookup(cache, method="HEAD", now=T0 + 1)
    assert head.status == Status.HIT and head.entry is hit.entry


def test_head_misses_are_not_stored_and_other_methods_are_dynamic() -> None:
    cache = Cache()
    head = _lookup(cache, method="HEAD")
    assert head.status == Status.MISS and not head.storable
    assert cache.store(head, 200, CC60, b"", T0).reason is NotStored.NOT_ELIGIBLE
    assert _status(cache) == Status.MISS
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        plan = _lookup(cache, method=method)
        assert (plan.status, plan.storable) == (Status.DYNAMIC, False)


def test_the_key_is_zone_host_path_and_query() -> None:
    cache = Cache()
    _fill(cache, query="v=1")
    assert _status(cache, query="v=1") == Status.HIT
    assert _status(cache, host="SHOP.Example.EU:443", query="v=1") == Status.HIT
    assert _status(cache, query="v=2") == Status.MISS
    assert _status(cache) == Status.MISS
    assert _status(cache, query="v=1", zone="other") == Status.MISS
    assert _status(cache, query="v=1", host="www.example.com") == Status.MISS
    assert _status(cache, "/b.css", query="v=1") == Status.MISS


def test_vary_keys_variants_by_the_named_request_headers() -> None:
    cache = Cache()
    vary = [*CC60, ("vary", "Accept-Encoding")]
    _fill(cache, response=vary, body=b"gz", headers=[("accept-encoding", "gzip")])
    _fill(cache, response=vary, body=b"br", headers=[("accept-encoding", "br")])
    _fill(cache, response=vary, body=b"plain")
    gz = _lookup(cache, headers=[("accept-encoding", "  gzip ")])   # trimmed
    assert gz.status == Status.HIT and gz.entry.body == b"gz"
    assert _lookup(cache, headers=[("accept-encoding", "br")]).entry.body == b"br"
    assert _lookup(cache).entry.body == b"plain"                     # absent is its own
    assert _status(cache, headers=[("accept-encoding", "deflate")]) == Status.MISS
    # Unrelated headers are not part of the key.
    assert _status(cache, headers=[("accept-encoding", "br"), ("user-agent", "x")]) \
        == Status.HIT
    assert cache.purge_url("z", HOST, "/a.css") == 3
    assert _status(cache, headers=[("accept-encoding", "gzip")]) == Status.MISS


def test_vary_values_are_normalised_list_members() -> None:
    values = policy.vary_values(["accept-language"],
                                [("accept-language", " en ,  de"), ("accept-language", "fr ")])
    assert values == (("accept-language", "en,de,fr"),)
    assert policy.vary_values(["accept"], []) == (("accept", None),)


def test_a_new_vary_replaces_the_old_variants() -> None:
    cache = Cache()
    _fill(cache, response=[*CC60, ("vary", "accept-encoding")], body=b"old",
          headers=[("accept-encoding", "gzip")])
    _fill(cache, response=[*CC60, ("vary", "accept-language")], body=b"new",
          headers=[("accept-language", "de")])
    assert cache.stats()["memory"]["objects"] == 1
    assert _status(cache, headers=[("accept-encoding", "gzip")]) == Status.MISS
    assert _lookup(cache, headers=[("accept-language", "de")]).entry.body == b"new"


def test_vary_star_is_not_stored() -> None:
    cache = Cache()
    result = _fill(cache, response=[*CC60, ("vary", "accept, *")])
    assert result == Stored(False, NotStored.VARY_STAR, Status.BYPASS)


# -- Cache-Control, Expires, Date, Age ------------------------------------------------

def test_max_age_makes_it_fresh_then_expired_without_validators() -> None:
    cache = Cache()
    _fill(cache)
    assert _status(cache, now=T0 + 59) == Status.HIT
    stale = _lookup(cache, now=T0 + 61)
    assert (stale.status, stale.action, stale.storable) == (Status.EXPIRED, Action.FETCH, True)
    assert stale.entry is None


def test_s_maxage_wins_over_max_age() -> None:
    cache = Cache()
    _fill(cache, response=[("cache-control", "max-age=10, s-maxage=100")])
    assert _status(cache, now=T0 + 50) == Status.HIT
    assert _status(cache, now=T0 + 101) == Status.EXPIRED
    cache = Cache()
    _fill(cache, response=[("cache-control", "s-maxage=10, max-age=100")])
    assert _status(cache, now=T0 + 50) == Status.EXPIRED


@pytest.mark.parametrize("directive, reason", [
    ("no-store", NotStored.NO_STORE),
    ("max-age=60, no-store", NotStored.NO_STORE),
    ("private", NotStored.PRIVATE),
    ('private="x-user", max-age=60', NotStored.PRIVATE),
    ("public, s-maxage=60, private", NotStored.PRIVATE),
])
def test_no_store_and_private_are_never_stored_not_even_with_edge_ttl(directive: str,
                                                                      reason: NotStored) -> None:
    for page in (STD, Settings(edge_ttl=3600), Settings(cache_level="cache_everything",
                                                       edge_ttl=3600)):
        cache = Cache()
        result = _fill(cache, response=[("cache-control", directive)], page=page)
        assert result == Stored(False, reason, Status.BYPASS)
        assert _status(cache, page=page) == Status.MISS


def test_no_cache_stores_but_always_revalidates() -> None:
    cache = Cache()
    assert _fill(cache, response=[("cache-control", "no-cache, max-age=600"),
                                  ("etag", '"v1"')]).stored
    plan = _lookup(cache, now=T0)
    assert (plan.action, plan.status) == (Action.REVALIDATE, Status.EXPIRED)
    assert plan.conditional_headers == [("if-none-match", '"v1"')]
    # Without a validator there is nothing to revalidate with: not stored.
    assert _fill(Cache(), response=[("cache-control", "no-cache")]).reason \
        is NotStored.NO_FRESHNESS


def test_must_revalidate_never_serves_stale() -> None:
    cache = Cache()
    _fill(cache, response=[("cache-control", "max-age=5, must-revalidate"),
                           ("last-modified", _date(T0 - 3600))])
    assert _status(cache, now=T0 + 4) == Status.HIT
    plan = _lookup(cache, now=T0 + 6)
    assert plan.action is Action.REVALIDATE and not plan.fresh


def test_expires_counts_from_date_and_the_apparent_age() -> None:
    """The origin's clock says 100 s ago; Expires is 300 s after its Date: the
    response arrived 100 s old, so it stays fresh for 200 more seconds."""
    cache = Cache()
    _fill(cache, response=[("date", _date(T0 - 100)), ("expires", _date(T0 + 200))])
    assert _status(cache, now=T0 + 199) == Status.HIT
    assert _status(cache, now=T0 + 201) == Status.EXPIRED
    assert _lookup(cache, now=T0 + 10).entry.response_headers(T0 + 10)[-1] == ("age", "110")


def test_expires_without_date_uses_the_arrival_time_and_max_age_overrides_it() -> None:
    cache = Cache()
    _fill(cache, response=[("expires", _date(T0 + 30))])
    assert _status(cache, now=T0 + 29) == Status.HIT
    assert _status(cache, now=T0 + 31) == Status.EXPIRED
    cache = Cache()
    _fill(cache, response=[("expires", _date(T0 + 30)), ("cache-control", "max-age=300")])
    assert _status(cache, now=T0 + 200) == Status.HIT


def test_an_invalid_or_past_expires_is_already_stale() -> None:
    for value in ("0", "yesterday", _date(T0 - 10)):
        assert _fill(Cache(), response=[("expires", value)]).reason is NotStored.NO_FRESHNESS
    cache = Cache()
    assert _fill(cache, response=[("expires", "0"), ("etag", '"e"')]).stored
    assert _lookup(cache).action is Action.REVALIDATE


def test_the_origins_age_counts_against_max_age() -> None:
    cache = Cache()
    _fill(cache, response=[("cache-control", "max-age=100"), ("age", "40")])
    entry = _lookup(cache, now=T0 + 10).entry
    assert entry.response_headers(T0 + 10)[-1] == ("age", "50")
    assert _status(cache, now=T0 + 59) == Status.HIT
    assert _status(cache, now=T0 + 61) == Status.EXPIRED
    # Older than its max-age on arrival, with no validator: useless.
    assert _fill(Cache(), response=[("cache-control", "max-age=10"), ("age", "40")]).reason \
        is NotStored.NO_FRESHNESS


def test_edge_ttl_overrides_the_origins_freshness() -> None:
    page = Settings(edge_ttl=600)
    for cc in ("max-age=0", "max-age=10", "no-cache", "s-maxage=99999"):
        cache = Cache()
        assert _fill(cache, response=[("cache-control", cc)], page=page).stored
        assert _status(cache, now=T0 + 599, page=page) == Status.HIT
        assert _status(cache, now=T0 + 601, page=page) == Status.EXPIRED


def test_default_ttl_applies_to_static_200s_without_freshness() -> None:
    cache = Cache()
    assert _fill(cache, response=[("content-type", "text/css")]).stored
    assert _status(cache, now=T0 + ZONE.default_ttl - 1) == Status.HIT
    assert _status(cache, now=T0 + ZONE.default_ttl + 1) == Status.EXPIRED
    assert ZONE.default_ttl == 7200
    # Not to other statuses, and not at all when the zone says None.
    assert _fill(Cache(), status=404, response=[]).reason is NotStored.NO_FRESHNESS
    off = CacheZoneSettings(default_ttl=None)
    assert _fill(Cache(), response=[], zs=off).reason is NotStored.NO_FRESHNESS
    assert _fill(Cache(), zs=off).stored     # explicit freshness still counts


@pytest.mark.parametrize("status, stored", [
    (200, True), (203, True), (300, True), (301, True), (308, True), (404, True), (410, True),
    (204, False), (206, False), (302, False), (403, False), (500, False), (503, False),
])
def test_only_some_statuses_are_stored(status: int, stored: bool) -> None:
    result = _fill(Cache(), status=status)
    assert result.stored is stored
    if not stored:
        assert result == Stored(False, NotStored.STATUS, Status.MISS)


def test_cache_control_parsing() -> None:
    cc = policy.cache_control([("cache-control", 'Public, MAX-AGE=5, no-cache="set-cookie"'),
                               ("cache-control", "max-age=99, s-maxage = 7")])
    assert cc == {"public": None, "max-age": "5", "no-cache": "set-cookie", "s-maxage": "7"}
    assert policy.delta_seconds(" 12") == 12 and policy.delta_seconds("-1") is None
    assert policy.delta_seconds("\u00b2") is None and policy.delta_seconds(None) is None
    assert policy.delta_seconds("1" * 30) == policy.DELTA_MAX
    assert policy.members('a, "b,c" , ,d') == ["a", '"b,c"', "d"]
    assert policy.members('x="unbalanced, private') == ['x="unbalanced', "private"]
    assert policy.etags('W/"a,b", "c", bad, W/x') == ['W/"a,b"', '"c"']
    # Clients choose these values: a pathological one is read in linear time.
    for value in ("a" * 16000 + " b", '"' * 16001, 'a="' + '\\"' * 8000):
        started = time.perf_counter()
        policy.cache_control([("cache-control", value)])
        policy.etags(value)
        assert time.perf_counter() - started < 0.5
    # A malformed max-age does not make a response fresh.
    assert _fill(Cache(), response=[("cache-control", "max-age=soon")]).reason \
        is NotStored.NO_FRESHNESS


# -- eligibility: extensions, page rules, zone ------------------------------------------

@pytest.mark.parametrize("text", ["Sun, 06 Nov 1994 08:49:37 GMT",
                                  "Sunday, 06-Nov-94 08:49:37 GMT",
                                  "Sun Nov  6 08:49:37 1994"])
def test_the_three_http_date_formats(text: str) -> None:
    assert policy.http_date(text) == 784111777.0


def test_only_static_extensions_are_cached_by_default() -> None:
    cache = Cache()
    for path in ("/", "/index.html", "/api/items.json", "/feed.xml", "/x.css/page",
                 "/noext"):
        plan = _lookup(cache, path)
        assert (plan.status, plan.storable) == (Status.DYNAMIC, False), path
    for path in ("/a.CSS", "/js/app.js", "/img/logo.webp", "/fonts/f.woff2", "/doc.pdf",
                 "/robots.txt", "/v.mp4"):
        assert _lookup(cache, path).storable, path
    assert {"css", "js", "png", "jpg", "woff2", "mp4", "zip"} <= set(DEFAULT_EXTENSIONS)
    assert not {"html", "json", "xml", "php"} & set(DEFAULT_EXTENSIONS)


def test_cache_everything_caches_any_path_and_bypass_none() -> None:
    everything = Settings(cache_level="cache_everything")
    cache = Cache()
    assert _fill(cache, "/index.html", page=everything).stored
    assert _status(cache, "/index.html", page=everything) == Status.HIT
    assert _status(cache, "/index.html") == Status.DYNAMIC   # other rule: not eligible
    bypass = Settings(cache_level="bypass")
    _fill(cache)
    plan = _lookup(cache, page=bypass)
    assert (plan.status, plan.storable, plan.entry) == (Status.BYPASS, False, None)
    assert _status(cache, page=Settings(cache_level="standard")) == Status.HIT


def test_a_zone_with_the_cache_disabled_bypasses_it_and_extensions_are_its_own() -> None:
    cache = Cache()
    _fill(cache)
    assert _status(cache, zs=CacheZoneSettings(enabled=False)) == Status.BYPASS
    own = CacheZoneSettings(extensions=[".HTML", "css"])
    assert own.extensions == ("html", "css")
    assert _lookup(cache, "/index.html", zs=own).storable
    assert _status(cache, "/a.png", zs=own) == Status.DYNAMIC


# -- privacy rules: cookies, authorization, request directives ---------------------------

def test_set_cookie_is_never_stored() -> None:
    everything = Settings(cache_level="cache_everything", edge_ttl=3600)
    for response in ([*CC60, ("set-cookie", "s=1")],
                     [("cache-control", "public, s-maxage=600"), ("set-cookie", "s=1")]):
        for page in (STD, everything):
            cache = Cache()
            assert _fill(cache, response=response, page=page) == \
                Stored(False, NotStored.SET_COOKIE, Status.BYPASS)
            assert _status(cache, page=page) == Status.MISS


def test_authorization_needs_public_or_s_maxage() -> None:
    auth = [("authorization", "Bearer secret")]
    assert _fill(Cache(), headers=auth).reason is NotStored.AUTHORIZATION
    assert _fill(Cache(), headers=auth, response=[("cache-control", "max-age=60, "
                                                    "must-revalidate")]).reason \
        is NotStored.AUTHORIZATION
    assert _fill(Cache(), headers=auth, page=Settings(edge_ttl=60)).reason \
        is NotStored.AUTHORIZATION
    assert _fill(Cache(), headers=auth, response=[("cache-control", "public, max-age=60")]).stored
    assert _fill(Cache(), headers=auth, response=[("cache-control", "s-maxage=60")]).stored


def test_request_no_store_keeps_the_answer_out_but_reads_fresh_entries() -> None:
    cache = Cache()
    no_store = [("cache-control", "no-store")]
    plan = _lookup(cache, headers=no_store)
    assert (plan.status, plan.storable) == (Status.BYPASS, False)
    assert not cache.store(plan, 200, CC60, b"x", T0).stored
    _fill(cache)
    assert _status(cache, headers=no_store) == Status.HIT
    assert _status(cache, headers=no_store, now=T0 + 100) == Status.BYPASS


@pytest.mark.parametrize("headers", [[("cache-control", "no-cache")],
                                     [("cache-control", "max-age=0")],
                                     [("pragma", "no-cache")]])
def test_a_clients_no_cache_revalidates_a_fresh_entry(headers) -> None:
    cache = Cache()
    _fill(cache, response=[*CC60, ("etag", '"a"')])
    plan = _lookup(cache, headers=headers, now=T0 + 1)
    assert (plan.action, plan.status) == (Action.REVALIDATE, Status.MISS)
    cache = Cache()
    _fill(cache)                                       # no validator: fetched again whole
    plan = _lookup(cache, headers=headers, now=T0 + 1)
    assert (plan.action, plan.status, plan.storable) == (Action.FETCH, Status.MISS, True)
    # Pragma is ignored when Cache-Control is there.
    assert _status(cache, headers=[("pragma", "no-cache"), ("cache-control", "max-age=60")],
                   now=T0 + 1) == Status.HIT


# -- memory bound --------------------------------------------------------------------

def test_memory_is_an_lru_bounded_by_bytes() -> None:
    cache = Cache(CacheStoreSettings(memory_bytes=3500))
    for name in ("a", "b", "c"):
        assert _fill(cache, f"/{name}.js", body=b"x" * 1000).stored
    assert cache.stats()["memory"]["objects"] == 3
    assert _status(cache, "/a.js") == Status.HIT          # a is now the most recent
    _fill(cache, "/d.js", body=b"x" * 1000)
    assert _status(cache, "/b.js") == Status.MISS          # b was least recent
    for name in ("a", "c", "d"):
        assert _status(cache, f"/{name}.js") == Status.HIT
    stats = cache.stats()["memory"]
    assert stats["evictions"] == 1 and stats["bytes"] <= 3500 and stats["objects"] == 3


def test_objects_over_the_limit_are_not_stored() -> None:
    cache = Cache(CacheStoreSettings(memory_bytes=10_000))
    small = CacheZoneSettings(max_object_bytes=100)
    assert cache.max_object_bytes(small) == 100
    assert cache.max_object_bytes(ZONE) == 10_000
    assert _fill(cache, body=b"x" * 101, zs=small).reason is NotStored.TOO_LARGE
    assert _fill(cache, body=b"x" * 100, zs=small).stored
    assert _fill(cache, "/big.js", body=b"x" * 10_000).reason is NotStored.TOO_LARGE
    plan = _lookup(cache, "/c.js", zs=small)
    assert not cache.may_store(plan, 200, CC60, length=101, now=T0)
    assert cache.may_store(plan, 200, CC60, length=None, now=T0)
    assert cache.would_store(plan, 200, [*CC60, ("set-cookie", "a=b")], now=T0) == \
        Stored(False, NotStored.SET_COOKIE, Status.BYPASS)
    assert cache.would_store(plan, 200, CC60, 10, now=T0) == Stored(True, None, Status.MISS)
    assert cache.stats()["not_stored"]["set-cookie"] == 1


# -- the encrypted disk spill -----------------------------------------------------------

def _disk_cache(tmp_path: Path, memory: int = 2500, disk: int = 1 << 20) -> Cache:
    return Cache(CacheStoreSettings(memory_bytes=memory, disk_dir=str(tmp_path / "cache"),
                                    disk_bytes=disk))


def _files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").iterdir())


def test_evicted_entries_spill_to_disk_and_come_back(tmp_path: Path) -> None:
    cache = _disk_cache(tmp_path)
    for name in ("a", "b", "c"):
        _fill(cache, f"/{name}.js", body=name.encode() * 1000)
    assert len(_files(tmp_path)) == 1                       # a went to disk
    assert cache.stats()["disk"]["objects"] == 1
    plan = _lookup(cache, "/a.js", now=T0 + 1)
    assert plan.status == Status.HIT and plan.entry.body == b"a" * 1000
    assert plan.entry.response_headers(T0 + 1)[-1] == ("age", "1")
    stats = cache.stats()
    assert stats["disk"]["promoted"] == 1 and stats["disk"]["spilled"] == 2
    assert stats["memory"]["objects"] == 2 and stats["disk"]["objects"] == 1
    assert _status(cache, "/b.js") == Status.HIT            # b spilled when a came back
    assert len(_files(tmp_path)) == 1


def test_disk_objects_are_encrypted_and_named_by_nothing_they_contain(tmp_path: Path) -> None:
    marker = "M4RKER"
    cache = _disk_cache(tmp_path, memory=3000)
    vary = [*CC60, ("vary", "x-marker"), ("x-origin-note", marker), ("etag", f'"{marker}"')]
    for i in range(6):
        plan = _lookup(cache, f"/{marker}/{i}.png", query=f"q={marker}",
                       host=f"{marker.lower()}.example.eu", headers=[("x-marker", marker)])
        assert cache.store(plan, 200, vary, (marker * 200).encode(), T0).stored
    files = _files(tmp_path)
    assert len(files) >= 4
    for f in files:
        assert len(f.name) == 64 and all(c in "0123456789abcdef" for c in f.name)
        data = f.read_bytes()
        for needle in (marker, marker.lower(), "example.eu", "x-origin-note", "max-age"):
            assert needle.encode() not in data and needle not in f.name
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    # Every spilled object is still readable by the cache that wrote it.
    for i in range(6):
        plan = _lookup(cache, f"/{marker}/{i}.png", query=f"q={marker}",
                       host=f"{marker.lower()}.example.eu", headers=[("x-marker", marker)])
        assert plan.status == Status.HIT and plan.entry.body == (marker * 200).encode()


def test_a_tampered_file_is_rejected_and_deleted(tmp_path: Path) -> None:
    cache = _disk_cache(tmp_path)
    for name in ("a", "b", "c"):
        _fill(cache, f"/{name}.js", body=b"x" * 1000)
    (f,) = _files(tmp_path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    assert _status(cache, "/a.js") == Status.MISS
    assert not f.exists()
    assert cache.stats()["disk"]["rejected"] == 1


def test_swapped_files_fail_authentication(tmp_path: Path) -> None:
    cache = _disk_cache(tmp_path, memory=1200)
    for name in ("a", "b", "c"):
        _fill(cache, f"/{name}.js", body=b"x" * 1000)
    one, two = _files(tmp_path)                             # a and b, on disk
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)
    two.write_bytes(a)
    assert _status(cache, "/a.js") == Status.MISS
    assert _status(cache, "/b.js") == Status.MISS
    assert _files(tmp_path) == []
    assert cache.stats()["disk"]["rejected"] == 2


def test_a_new_cache_empties_the_directory_of_the_old_ones_objects(tmp_path: Path) -> None:
    old = _disk_cache(tmp_path, memory=1200)
    for name in ("a", "b", "c"):
        _fill(old, f"/{name}.js", body=b"x" * 1000)
    assert len(_files(tmp_path)) == 2
    (tmp_path / "cache" / (".tmp-" + "0" * 32)).write_bytes(b"half")   # an interrupted write
    new = _disk_cache(tmp_path, memory=1200)
    assert _files(tmp_path) == []
    assert new.stats()["disk"]["purged_at_start"] == 3
    assert _status(new, "/a.js") == Status.MISS


def test_a_directory_with_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    d = tmp_path / "cache"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    (d / ("f" * 64)).write_bytes(b"old object")
    with pytest.raises(CacheDirError, match=r"notes\.txt"):
        _disk_cache(tmp_path)
    assert (d / "notes.txt").read_text() == "mine" and (d / ("f" * 64)).exists()


def test_the_disk_has_its_own_byte_bound(tmp_path: Path) -> None:
    cache = _disk_cache(tmp_path, memory=1200, disk=2500)
    for i in range(6):
        _fill(cache, f"/{i}.js", body=b"x" * 1000)
    stats = cache.stats()["disk"]
    assert stats["bytes"] <= 2500 and stats["objects"] == 2 and stats["evictions"] == 3
    assert sum(f.stat().st_size for f in _files(tmp_path)) == stats["bytes"]
    assert [_status(cache, f"/{i}.js") for i in range(6)] == \
        [Status.MISS] * 3 + [Status.HIT] * 3


def test_only_static_entries_spill(tmp_path: Path) -> None:
    everything = Settings(cache_level="cache_everything")
    cache = _disk_cache(tmp_path, memory=1200)
    _fill(cache, "/page.html", body=b"x" * 1000, page=everything)
    _fill(cache, "/b.js", body=b"x" * 1000)
    assert _files(tmp_path) == []
    assert _status(cache, "/page.html", page=everything) == Status.MISS


def test_without_a_disk_dir_evicted_entries_are_gone(tmp_path: Path) -> None:
    cache = Cache(CacheStoreSettings(memory_bytes=1200))
    _fill(cache, "/a.js", body=b"x" * 1000)
    _fill(cache, "/b.js", body=b"x" * 1000)
    assert _status(cache, "/a.js") == Status.MISS
    assert cache.stats()["disk"]["enabled"] is False


def test_a_failed_disk_write_drops_the_entry_and_leaves_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("agent.l7.cache.disk.os.replace", refuse)
    cache = _disk_cache(tmp_path, memory=1200)
    _fill(cache, "/a.js", body=b"x" * 1000)
    _fill(cache, "/b.js", body=b"x" * 1000)
    assert _files(tmp_path) == []
    assert cache.stats()["disk"]["errors"] == 1
    assert _status(cache, "/a.js") == Status.MISS


def test_close_removes_the_disk_objects(tmp_path: Path) -> None:
    cache = _disk_cache(tmp_path, memory=1200)
    for name in ("a", "b", "c"):
        _fill(cache, f"/{name}.js", body=b"x" * 1000)
    cache.close()
    assert _files(tmp_path) == []
    assert cache.stats()["memory"]["objects"] == 0


# -- purges ---------------------------------------------------------------------------

def test_purges_remove_memory_and_disk_copies(tmp_path: Path) -> None:
    cache = _disk_cache(tmp_path, memory=2500)
    paths = ["/img/a.png", "/img/b.png", "/css/c.css", "/img2/d.png"]
    for p in paths:
        _fill(cache, p, body=b"x" * 1000)
    _fill(cache, "/img/a.png", body=b"x" * 1000, zone="other")
    assert len(_files(tmp_path)) == 3
    assert cache.purge_url("z", HOST, "/img/a.png") == 1
    assert cache.purge_prefix("z", HOST, "/img/") == 1
    assert _status(cache, "/img2/d.png") == Status.HIT
    assert cache.purge_zone("z") == 2
    assert [_status(cache, p) for p in paths] == [Status.MISS] * 4
    assert _status(cache, "/img/a.png", zone="other") == Status.HIT
    assert cache.purge_zone("z") == 0
    stats = cache.stats()
    assert stats["memory"]["objects"] + stats["disk"]["objects"] == 1     # zone "other"
    assert len(_files(tmp_path)) == stats["disk"]["objects"]
    assert stats["purged"] == 4


def test_a_purge_wins_over_an_answer_in_flight() -> None:
    cache = Cache()
    plan = _lookup(cache)
    other = _lookup(cache, zone="other")
    cache.purge_url("z", HOST, "/a.css")
    assert cache.store(plan, 200, CC60, b"old", T0).reason is NotStored.PURGED
    assert cache.store(other, 200, CC60, b"ok", T0).stored
    assert cache.store(_lookup(cache), 200, CC60, b"new", T0).stored


def test_an_unsafe_method_invalidates_the_url() -> None:
    cache = Cache()
    _fill(cache)
    assert cache.invalidate(_lookup(cache, method="POST"), 403) == 0
    assert cache.invalidate(_lookup(cache, method="GET"), 200) == 0
    assert _status(cache) == Status.HIT
    assert cache.invalidate(_lookup(cache, method="PUT"), 204) == 1
    assert _status(cache) == Status.MISS


# -- revalidation ---------------------------------------------------------------------

def test_revalidation_with_an_etag_refreshes_the_entry() -> None:
    cache = Cache()
    _fill(cache, response=[("cache-control", "max-age=60"), ("etag", 'W/"v1"'),
                           ("x-build", "1"), ("content-type", "text/css")], body=b"css")
    plan = _lookup(cache, now=T0 + 100)
    assert (plan.action, plan.status, plan.revalidating) == \
        (Action.REVALIDATE, Status.EXPIRED, True)
    client = [("if-none-match", '"zzz"'), ("range", "bytes=0-1"), ("accept", "*/*")]
    assert plan.origin_headers(client) == [("accept", "*/*"), ("if-none-match", 'W/"v1"')]
    entry = cache.revalidated(plan, [("cache-control", "max-age=300"), ("x-build", "2"),
                                     ("content-type", "text/plain"), ("content-length", "0"),
                                     ("set-cookie", "s=1"), ("date", _date(T0 + 100))],
                              T0 + 100)
    assert entry.body == b"css"
    headers = dict(entry.response_headers(T0 + 100))
    assert headers["x-build"] == "2" and headers["cache-control"] == "max-age=300"
    assert headers["content-type"] == "text/css" and headers["etag"] == 'W/"v1"'
    assert "set-cookie" not in headers and "content-length" not in headers
    assert headers["age"] == "0"
    served = cache.lookup_entry(plan, entry)
    assert (served.status, served.fresh, served.entry) == (Status.REVALIDATED, True, entry)
    assert _status(cache, now=T0 + 399) == Status.HIT
    counts = cache.stats()["status"]
    assert counts["REVALIDATED"] == 1 and counts["EXPIRED"] == 0 and counts["HIT"] == 1


def test_revalidation_with_last_modified() -> None:
    cache = Cache()
    modified = _date(T0 - 86400)
    _fill(cache, response=[*CC60, ("last-modified", modified)])
    plan = _lookup(cache, now=T0 + 61)
    assert plan.conditional_headers == [("if-modified-since", modified)]
    cache.revalidated(plan, [("cache-control", "max-age=60")], T0 + 61)
    assert _status(cache, now=T0 + 120) == Status.HIT


def test_a_full_answer_to_a_conditional_request_replaces_the_entry() -> None:
    cache = Cache()
    _fill(cache, response=[*CC60, ("etag", '"v1"')], body=b"old")
    plan = _lookup(cache, now=T0 + 61)
    result = cache.store(plan, 200, [*CC60, ("etag", '"v2"')], b"new", T0 + 61)
    assert result == Stored(True, None, Status.EXPIRED)
    assert _lookup(cache, now=T0 + 62).entry.body == b"new"


def test_a_304_that_forbids_storing_removes_the_entry() -> None:
    cache = Cache()
    _fill(cache, response=[*CC60, ("etag", '"v1"')])
    plan = _lookup(cache, now=T0 + 61)
    entry = cache.revalidated(plan, [("cache-control", "no-store")], T0 + 61)
    assert entry.body == b"body"                             # this answer is still served
    assert _status(cache, now=T0 + 62) == Status.MISS


def test_head_revalidates_the_get_entry() -> None:
    cache = Cache()
    _fill(cache, response=[*CC60, ("etag", '"v1"')])
    plan = _lookup(cache, method="HEAD", now=T0 + 61)
    assert plan.revalidating and not plan.storable
    cache.revalidated(plan, [("cache-control", "max-age=60")], T0 + 61)
    assert _status(cache, now=T0 + 100) == Status.HIT


def test_a_304_brings_back_an_entry_evicted_meanwhile_unless_its_vary_changed() -> None:
    cache = Cache(CacheStoreSettings(memory_bytes=1200))
    _fill(cache, "/a.js", response=[*CC60, ("etag", '"a"')], body=b"x" * 1000)
    plan = _lookup(cache, "/a.js", now=T0 + 61)
    _fill(cache, "/b.js", body=b"x" * 1000, now=T0 + 61)         # evicts a
    assert _status(cache, "/a.js", now=T0 + 61) == Status.MISS
    cache.revalidated(plan, [("cache-control", "max-age=60")], T0 + 62)
    assert _status(cache, "/a.js", now=T0 + 63) == Status.HIT

    cache = Cache()
    _fill(cache, response=[*CC60, ("etag", '"a"')])
    plan = _lookup(cache, now=T0 + 61)
    _fill(cache, response=[*CC60, ("vary", "accept")], body=b"new", now=T0 + 61)
    assert cache.revalidated(plan, [], T0 + 62).body == b"body"   # served to this client
    assert cache.stats()["memory"]["objects"] == 1
    assert _lookup(cache, now=T0 + 63).entry.body == b"new"


def test_revalidated_needs_a_revalidating_plan() -> None:
    cache = Cache()
    with pytest.raises(ValueError, match="REVALIDATE"):
        cache.revalidated(_lookup(cache), [], T0)


def test_a_miss_that_may_be_stored_sends_no_client_conditionals() -> None:
    cache = Cache()
    headers = [("if-modified-since", _date(T0)), ("accept", "*/*")]
    assert _lookup(cache).origin_headers(headers) == [("accept", "*/*")]
    dynamic = _lookup(cache, "/index.html")
    assert dynamic.origin_headers(headers) == headers and dynamic.conditional_headers == []


# -- client conditionals, Age, headers toward the client ---------------------------------

def _entry(cache: Cache, response, status: int = 200):
    _fill(cache, response=response, status=status)
    return _lookup(cache).entry


def test_if_none_match_uses_weak_comparison() -> None:
    cache = Cache()
    entry = _entry(cache, [*CC60, ("etag", 'W/"abc"')])
    yes = [('"abc"'), ('W/"abc"'), ('"x", W/"abc"'), ("*")]
    for value in yes:
        assert cache.not_modified_for_client(entry, [("if-none-match", value)]), value
    for value in ('"abcd"', '"x"', ""):
        assert not cache.not_modified_for_client(entry, [("if-none-match", value)]), value
    # If-None-Match decides alone when present.
    assert not cache.not_modified_for_client(entry, [("if-none-match", '"x"'),
                                                     ("if-modified-since", _date(T0))])
    assert not cache.not_modified_for_client(entry, [])


def test_if_modified_since_against_last_modified() -> None:
    cache = Cache()
    entry = _entry(cache, [*CC60, ("last-modified", _date(T0 - 100))])
    assert cache.not_modified_for_client(entry, [("if-modified-since", _date(T0 - 100))])
    assert cache.not_modified_for_client(entry, [("if-modified-since", _date(T0))])
    assert not cache.not_modified_for_client(entry, [("if-modified-since", _date(T0 - 101))])
    assert not cache.not_modified_for_client(entry, [("if-modified-since", "garbage")])
    missing = _entry(Cache(), [*CC60, ("etag", '"e"')], status=404)
    assert not Cache().not_modified_for_client(missing, [("if-none-match", '"e"')])


def test_served_headers_carry_age_and_nothing_internal() -> None:
    cache = Cache()
    origin = [("cache-control", "max-age=600"), ("content-type", "text/css"),
              ("content-length", "4"), ("connection", "x-hop"), ("x-hop", "1"),
              ("keep-alive", "timeout=5"), ("transfer-encoding", "chunked"), ("age", "7"),
              ("etag", '"e"'), ("x-custom", "ok")]
    entry = _entry(cache, origin)
    assert entry.response_headers(T0 + 30) == [
        ("cache-control", "max-age=600"), ("content-type", "text/css"), ("etag", '"e"'),
        ("x-custom", "ok"), ("age", "37")]
    assert entry.response_headers(T0 + 30, not_modified=True) == [
        ("cache-control", "max-age=600"), ("etag", '"e"'), ("age", "37")]


def test_lookups_keep_request_data_out_of_their_repr() -> None:
    plan = _lookup(Cache(), "/secret-path.css", host="secret.example.eu",
                   headers=[("authorization", "Bearer token"), ("cookie", "sid=1")])
    text = repr(plan)
    for needle in ("secret", "token", "sid"):
        assert needle not in text


# -- statuses, counters, settings --------------------------------------------------------

def test_status_names_and_header() -> None:
    assert CACHE_STATUS_HEADER == "cf-cache-status"
    assert [s.value for s in Status] == ["HIT", "MISS", "EXPIRED", "REVALIDATED", "BYPASS",
                                         "DYNAMIC"]
    assert f"{Status.HIT}" == "HIT" and Status.HIT == "HIT"


def test_stats_count_statuses_and_reasons() -> None:
    cache = Cache()
    _fill(cache)
    _lookup(cache)
    _lookup(cache, "/x.html")
    _lookup(cache, page=Settings(cache_level="bypass"))
    _fill(cache, "/b.css", response=[("set-cookie", "a=b")])
    stats = cache.stats()
    assert stats["status"] == {"HIT": 1, "MISS": 2, "EXPIRED": 0, "REVALIDATED": 0,
                               "BYPASS": 1, "DYNAMIC": 1}
    assert stats["stored"] == 1 and stats["not_stored"]["set-cookie"] == 1
    assert stats["memory"]["objects"] == 1 and stats["memory"]["bytes"] > 4
    assert stats["memory"]["limit"] == 256 << 20


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError):
        CacheZoneSettings(extensions=["c/ss"])
    with pytest.raises(ValidationError):
        CacheZoneSettings(extensions="css")
    with pytest.raises(ValidationError):
        CacheZoneSettings(default_ttl=-1)
    with pytest.raises(ValidationError):
        CacheZoneSettings(colour="blue")
    with pytest.raises(ValidationError, match="absolute"):
        CacheStoreSettings(disk_dir="relative/dir")
    s = CacheStoreSettings()
    assert (s.memory_bytes, s.disk_dir, s.disk_bytes) == (256 << 20, None, 1 << 30)
    assert CacheZoneSettings().max_object_bytes == 16 << 20


def test_the_disk_directory_is_created_private(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    Cache(CacheStoreSettings(disk_dir=str(target)))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheDirError, match="not a directory"):
        Cache(CacheStoreSettings(disk_dir=str(tmp_path / "file")))
