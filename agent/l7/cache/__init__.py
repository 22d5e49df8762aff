"""The edge cache: HTTP caching rules, an LRU in memory, an encrypted disk spill.

    settings.py   CacheZoneSettings (per zone), CacheStoreSettings (per front end)
    policy.py     RFC 9111 rules as pure functions: may it be stored, for how
                  long, which Vary, does a client's conditional get a 304
    entry.py      CacheKey and Entry (a stored response, its age and freshness)
    disk.py       DiskStore: AES-256-GCM objects under HMAC file names, keys
                  in memory only; emptied at start
    store.py      Cache: lookup → serve / revalidate / fetch → store; purges;
                  stats (the caller's flow is in its docstring)

Only encrypted cache objects ever reach the disk (DESIGN.md invariant 5),
and nothing about a request is logged.
"""

from agent.l7.cache.disk import CacheDirError
from agent.l7.cache.entry import CacheKey, Entry
from agent.l7.cache.policy import NotStored
from agent.l7.cache.settings import DEFAULT_EXTENSIONS, CacheStoreSettings, CacheZoneSettings
from agent.l7.cache.store import CACHE_STATUS_HEADER, Action, Cache, Lookup, Status, Stored

__all__ = ["CACHE_STATUS_HEADER", "DEFAULT_EXTENSIONS", "Action", "Cache", "CacheDirError",
           "CacheKey", "CacheStoreSettings", "CacheZoneSettings", "Entry", "Lookup",
           "NotStored", "Status", "Stored"]
