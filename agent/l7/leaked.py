"""Leaked-password lookup by k-anonymity: only a 5-character hash prefix is asked.

The design of the public "Pwned Passwords range" API, split in two:

  client   LeakedPasswords.is_leaked(password): SHA-1 of the password
           (UTF-8), upper-case hex; the first 5 hex characters are the
           prefix, and the only thing that crosses the boundary. The
           answer is every suffix (35 hex characters) listed under that
           prefix; the password is leaked when its own suffix is among
           them, compared here.
  server   a RangeSource: range(prefix) -> the suffixes under it. Whatever
           serves it learns 20 bits of a hash: one of 2**20 buckets that
           every possible password falls into evenly, never the password or
           its full hash. LocalRange is the one we ship; a remote range
           service (over mTLS, padded answers) can replace it without the
           client changing.

LocalRange reads agent/l7/data/leaked-sha1.bin, made by
scripts/gen_leaked.py from our own generation (no breach data): a magic
line, then sorted, unique 20-byte SHA-1 digests. It is read once, on the
first lookup (or load()), and kept as one bytes object (20 bytes per
password, ~0.8 MB); range() binary-searches the first digest of the
prefix and walks its bucket. Nothing about a lookup is kept or logged.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

DATA_PATH = Path(__file__).resolve().parent / "data" / "leaked-sha1.bin"
MAGIC = b"privedge leaked-sha1 v1\n"   # a layout change is a new version
DIGEST = 20                            # bytes of a SHA-1
PREFIX = 5                             # hex characters asked for: 20 bits
PREFIX_RE = re.compile(r"^[0-9A-F]{5}$")


class LeakedDataError(ValueError):
    """The data file is missing or damaged; the message names it."""


class RangeSource(Protocol):
    """The server side: every suffix listed under a 5-hex-character prefix."""

    def range(self, prefix: str) -> frozenset[str]: ...


def encode(digests: Iterable[bytes]) -> bytes:
    """The data file for these SHA-1 digests (sorted and deduplicated here)."""
    unique = sorted(set(digests))
    if any(len(d) != DIGEST for d in unique):
        raise ValueError(f"a SHA-1 digest is {DIGEST} bytes")
    return MAGIC + b"".join(unique)


class LocalRange:
    """A RangeSource over the shipped data file, read once when first asked."""

    def __init__(self, path: Path = DATA_PATH) -> None:
        self.path = path
        self._digests: bytes | None = None

    def load(self) -> None:
        """Read the file now (at startup), so the first login does not wait."""
        if self._digests is not None:
            return
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise LeakedDataError(f"{self.path}: cannot read the leaked-password set "
                                  f"({e.strerror}); reinstall the package or run "
                                  "scripts/gen_leaked.py") from None
        body = data[len(MAGIC):]
        if not data.startswith(MAGIC) or len(body) % DIGEST:
            raise LeakedDataError(f"{self.path}: not a leaked-password set ({MAGIC!r} and "
                                  f"{DIGEST}-byte digests expected); run scripts/gen_leaked.py")
        self._digests = body

    def __len__(self) -> int:
        self.load()
        return len(self._digests) // DIGEST

    def range(self, prefix: str) -> frozenset[str]:
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"{prefix!r} is not a range prefix (5 upper-case hex characters)")
        self.load()
        blob, want = self._digests, int(prefix, 16)

        def bucket(i: int) -> int:   # the first 20 bits of digest i
            return int.from_bytes(blob[i * DIGEST:i * DIGEST + 3], "big") >> 4

        lo, hi = 0, len(blob) // DIGEST
        while lo < hi:               # the first digest at or after the prefix
            mid = (lo + hi) // 2
            if bucket(mid) < want:
                lo = mid + 1
            else:
                hi = mid
        suffixes = []
        while lo < len(blob) // DIGEST and bucket(lo) == want:
            suffixes.append(blob[lo * DIGEST:(lo + 1) * DIGEST].hex().upper()[PREFIX:])
            lo += 1
        return frozenset(suffixes)


class LeakedPasswords:
    """The client side: hashes locally, asks its source for one prefix only."""

    def __init__(self, source: RangeSource) -> None:
        self.source = source

    @classmethod
    @functools.cache
    def default(cls) -> LeakedPasswords:
        """One shared checker over the shipped set (its 0.8 MB read once per process)."""
        return cls(LocalRange())

    def is_leaked(self, password: str) -> bool:
        # surrogatepass: a JSON body may carry a lone surrogate; hash it, do not fail.
        digest = hashlib.sha1(password.encode("utf-8", "surrogatepass"),
                             usedforsecurity=False).hexdigest().upper()
        return digest[PREFIX:] in self.source.range(digest[:PREFIX])
