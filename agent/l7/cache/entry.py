"""A stored response and the key it is stored under.

The key is (zone, host, path, query) — the "primary" key shared by all
variants of a URL — plus the request's values of the headers the stored
response's Vary names. GET and HEAD share it: the method is not part of
it because only GET responses are stored.

`CacheKey.encode()` is the key's one canonical byte string (JSON, ASCII
only, so any header text survives): the disk spill derives file names from
it and binds it to the ciphertext. `Entry.to_bytes()` is the whole stored
response (key, status, headers, timing, body) as one plaintext.

Age follows RFC 9111 4.2.3: the age a response had when it arrived
(`initial_age`) plus the time it has been held since (`now - stored_at`).
Times are wall-clock POSIX seconds, as Date and Expires are.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from agent.l7.cache.policy import NOT_MODIFIED_FIELDS, joined

Primary = tuple[str, str, str, str]         # zone, host, path, query
VaryValues = tuple[tuple[str, str | None], ...]

_FORMAT = b"PEC1"                           # plaintext layout version
_LEN = struct.Struct(">I")


class CacheKey(NamedTuple):
    """A tuple: every hit hashes and compares it (twice, with the LRU move),
    and a tuple does both in C."""

    zone: str
    host: str
    path: str
    query: str
    vary: VaryValues = ()

    @property
    def primary(self) -> Primary:
        return (self.zone, self.host, self.path, self.query)

    def encode(self) -> bytes:
        return json.dumps([self.zone, self.host, self.path, self.query,
                           [list(p) for p in self.vary]],
                          separators=(",", ":")).encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> CacheKey:
        zone, host, path, query, vary = json.loads(data)
        return cls(zone, host, path, query, tuple((n, v) for n, v in vary))


@dataclass(frozen=True)
class Entry:
    key: CacheKey = field(repr=False)
    status: int
    headers: tuple[tuple[str, str], ...] = field(repr=False)  # lower-case; no Age, framing
    body: bytes = field(repr=False)
    stored_at: float       # when the response (or the 304 refreshing it) arrived
    initial_age: float     # its age then
    expires_at: float      # when it goes stale
    static: bool           # by file extension: only such entries spill to disk
    size: int = field(init=False)

    def __post_init__(self) -> None:
        # What the memory bound counts: body, headers and key.
        head = sum(len(n) + len(v) + 4 for n, v in self.headers)
        object.__setattr__(self, "size", len(self.body) + head + len(self.key.encode()))

    @cached_property
    def etag(self) -> str | None:
        return joined(self.headers, "etag")

    @cached_property
    def last_modified(self) -> str | None:
        return joined(self.headers, "last-modified")

    def age(self, now: float) -> int:
        return int(self.initial_age + max(0.0, now - self.stored_at))

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    @cached_property
    def header_block(self) -> bytes:
        """The stored headers as HTTP/1.1 lines for a client ("name: value\r\n"),
        built at the first hit and kept: a hit then adds only Age and status.
        The values came through the origin's parser, so no line breaks."""
        return "".join(f"{n}: {v}\r\n" for n, v in self.headers).encode("latin-1")

    def response_headers(self, now: float | None = None, not_modified: bool = False
                         ) -> list[tuple[str, str]]:
        """The headers to send a client (lower-case names), Age included. Nothing
        internal is in them: the stored headers are the origin's own.
        `not_modified`: only those a 304 carries (RFC 9110 15.4.5)."""
        now = time.time() if now is None else now
        kept = [(n, v) for n, v in self.headers
                if not not_modified or n in NOT_MODIFIED_FIELDS]
        return [*kept, ("age", str(self.age(now)))]

    def to_bytes(self) -> bytes:
        meta = json.dumps({"key": self.key.encode().decode("ascii"), "status": self.status,
                           "headers": [list(h) for h in self.headers],
                           "stored_at": self.stored_at, "initial_age": self.initial_age,
                           "expires_at": self.expires_at, "static": self.static},
                          separators=(",", ":")).encode("ascii")
        return _FORMAT + _LEN.pack(len(meta)) + meta + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        """Raises ValueError on anything but what to_bytes wrote."""
        if data[:4] != _FORMAT or len(data) < 8:
            raise ValueError("not a stored cache entry")
        (n,) = _LEN.unpack_from(data, 4)
        try:
            meta = json.loads(data[8:8 + n])
            return cls(CacheKey.decode(meta["key"].encode("ascii")), int(meta["status"]),
                       tuple((k, v) for k, v in meta["headers"]), data[8 + n:],
                       float(meta["stored_at"]), float(meta["initial_age"]),
                       float(meta["expires_at"]), bool(meta["static"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError("not a stored cache entry") from e
