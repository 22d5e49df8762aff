"""IPv4 and IPv6 prefixes: strict parsing with clear errors, numpy tables.

A deny list of a million lines must parse in well under a second, so lists
are parsed with socket.inet_pton in one loop into numpy columns, never into
ipaddress objects. Every error names the source, the line and the problem;
a list with any bad line is refused whole.

Tables keep IPv4 addresses as uint32 in host order and IPv6 addresses as two
uint64 halves (hi, lo), with the prefix length and an expiry in wall-clock
seconds (0 = never).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

MAX_LIST_ERRORS = 20  # errors listed before "... and N more"

V4_DTYPE = np.dtype([("addr", np.uint32), ("plen", np.uint8), ("expires", np.float64)])
V6_DTYPE = np.dtype([("hi", np.uint64), ("lo", np.uint64), ("plen", np.uint8),
                     ("expires", np.float64)])


class PrefixError(ValueError):
    """A prefix or a list of prefixes is malformed. Nothing was applied."""


@dataclass(frozen=True)
class Prefix:
    """One parsed prefix; addr is the integer network address."""

    version: int
    addr: int
    plen: int

    def __str__(self) -> str:
        if self.version == 4:
            return f"{socket.inet_ntop(socket.AF_INET, self.addr.to_bytes(4, 'big'))}/{self.plen}"
        return f"{socket.inet_ntop(socket.AF_INET6, self.addr.to_bytes(16, 'big'))}/{self.plen}"

    @property
    def bits(self) -> int:
        return 32 if self.version == 4 else 128

    def contains(self, other: Prefix) -> bool:
        if other.version != self.version or other.plen < self.plen:
            return False
        shift = self.bits - self.plen
        return (other.addr >> shift) == (self.addr >> shift)


def parse_prefix(text: str) -> Prefix:
    """Parse "a.b.c.d[/n]" or "x::y[/n]"; host bits must be zero."""
    s = text.strip()
    if not s:
        raise PrefixError("empty prefix")
    addr_text, slash, len_text = s.partition("/")
    family, version, bits = (socket.AF_INET6, 6, 128) if ":" in addr_text else \
        (socket.AF_INET, 4, 32)
    try:
        addr = int.from_bytes(socket.inet_pton(family, addr_text), "big")
    except OSError:
        raise PrefixError(f"{s!r} is not an IPv4 or IPv6 prefix") from None
    plen = bits
    if slash:
        if not len_text.isdigit():
            raise PrefixError(f"{s!r}: prefix length {len_text!r} is not a number")
        plen = int(len_text)
        if plen > bits:
            raise PrefixError(f"{s!r}: prefix length {plen} is out of range for "
                              f"IPv{version} (0-{bits})")
    host = addr & ((1 << (bits - plen)) - 1)
    if host:
        net = Prefix(version, addr - host, plen)
        raise PrefixError(f"{s!r}: host bits are set (did you mean {net}?)")
    return Prefix(version, addr, plen)


@dataclass
class PrefixTables:
    """IPv4 and IPv6 prefixes with expiries, as numpy structured arrays."""

    v4: np.ndarray
    v6: np.ndarray

    @classmethod
    def empty(cls) -> PrefixTables:
        return cls(np.zeros(0, V4_DTYPE), np.zeros(0, V6_DTYPE))

    @classmethod
    def from_prefixes(cls, prefixes: Iterable[Prefix], expires: float = 0.0) -> PrefixTables:
        v4, v6 = [], []
        for p in prefixes:
            if p.version == 4:
                v4.append((p.addr, p.plen, expires))
            else:
                v6.append((p.addr >> 64, p.addr & (2**64 - 1), p.plen, expires))
        return cls(np.array(v4, V4_DTYPE), np.array(v6, V6_DTYPE))

    @classmethod
    def concat(cls, *tables: PrefixTables) -> PrefixTables:
        return cls(np.concatenate([t.v4 for t in tables] or [np.zeros(0, V4_DTYPE)]),
                   np.concatenate([t.v6 for t in tables] or [np.zeros(0, V6_DTYPE)]))

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6)

    def _keys(self) -> tuple[np.ndarray, set[tuple[int, int, int]]]:
        k4 = (self.v4["addr"].astype(np.uint64) << np.uint64(8)) | self.v4["plen"]
        k6 = {(int(h), int(lo), int(p))
              for h, lo, p in zip(self.v6["hi"], self.v6["lo"], self.v6["plen"], strict=True)}
        return k4, k6

    @staticmethod
    def _key(p: Prefix) -> int | tuple[int, int, int]:
        return (p.addr << 8) | p.plen if p.version == 4 else \
            (p.addr >> 64, p.addr & (2**64 - 1), p.plen)

    def has(self, prefixes: list[Prefix]) -> list[bool]:
        """For each prefix: is it an entry of the table (vectorised for IPv4)?"""
        k4, k6 = self._keys()
        q4 = np.array([self._key(p) for p in prefixes if p.version == 4], np.uint64)
        hit4 = iter(np.isin(q4, k4).tolist())
        return [next(hit4) if p.version == 4 else self._key(p) in k6 for p in prefixes]

    def without(self, prefixes: list[Prefix]) -> PrefixTables:
        """The table without the given prefixes."""
        k4, _ = self._keys()
        gone4 = np.array([self._key(p) for p in prefixes if p.version == 4], np.uint64)
        gone6 = {self._key(p) for p in prefixes if p.version == 6}
        keep6 = np.array([(int(h), int(lo), int(p)) not in gone6 for h, lo, p in
                          zip(self.v6["hi"], self.v6["lo"], self.v6["plen"], strict=True)],
                         bool).reshape(-1)
        return PrefixTables(self.v4[~np.isin(k4, gone4)], self.v6[keep6])

    def changes(self, new: PrefixTables) -> tuple[int, int]:
        """(added, removed): entries of `new` that are not in this table, and
        entries of this table that `new` lacks (expiries aside)."""
        old4, old6 = self._keys()
        new4, new6 = new._keys()
        added = int(np.setdiff1d(new4, old4).size) + len(new6 - old6)
        removed = int(np.setdiff1d(old4, new4).size) + len(old6 - new6)
        return added, removed

    def prefixes(self) -> list[tuple[Prefix, float]]:
        out = [(Prefix(4, int(r["addr"]), int(r["plen"])), float(r["expires"])) for r in self.v4]
        out += [(Prefix(6, (int(r["hi"]) << 64) | int(r["lo"]), int(r["plen"])),
                 float(r["expires"])) for r in self.v6]
        return out


def parse_list(lines: Iterable[str], source: str, expires: float = 0.0) -> PrefixTables:
    """Parse a list: one prefix per line, '#' comments, blank lines ignored.

    Raises PrefixError naming every bad line (up to MAX_LIST_ERRORS) if any
    line is bad, so a list is applied whole or not at all.
    """
    v4_addr: list[int] = []
    v4_plen: list[int] = []
    v6: list[tuple[int, int, int, float]] = []
    errors: list[str] = []
    pton, from_bytes = socket.inet_pton, int.from_bytes
    af4 = socket.AF_INET
    for lineno, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        addr_text, slash, len_text = text.partition("/")
        # Fast path: a well-formed IPv4 prefix with zero host bits.
        if ":" not in addr_text and (not slash or len_text.isdigit()):
            try:
                addr = from_bytes(pton(af4, addr_text), "big")
            except OSError:
                addr = -1
            plen = int(len_text) if slash else 32
            if addr >= 0 and plen <= 32 and not addr & ((1 << (32 - plen)) - 1):
                v4_addr.append(addr)
                v4_plen.append(plen)
                continue
        try:
            p = parse_prefix(text)
        except PrefixError as e:
            errors.append(f"{source}:{lineno}: {e}")
            continue
        if p.version == 4:
            v4_addr.append(p.addr)
            v4_plen.append(p.plen)
        else:
            v6.append((p.addr >> 64, p.addr & (2**64 - 1), p.plen, expires))
    if errors:
        more = len(errors) - MAX_LIST_ERRORS
        shown = errors[:MAX_LIST_ERRORS] + ([f"... and {more} more"] if more > 0 else [])
        raise PrefixError(f"{len(errors)} bad line(s), nothing applied:\n  " + "\n  ".join(shown))
    t4 = np.zeros(len(v4_addr), V4_DTYPE)
    t4["addr"] = np.array(v4_addr, dtype=np.uint32)
    t4["plen"] = np.array(v4_plen, dtype=np.uint8)
    t4["expires"] = expires
    return PrefixTables(t4, np.array(v6, V6_DTYPE))


def parse_file(path: str, expires: float = 0.0) -> PrefixTables:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_list(f.read().splitlines(), path, expires)
    except OSError as e:
        raise PrefixError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PrefixError(f"{path}: not a UTF-8 text file ({e.reason})") from None


def v4_text(addr: int) -> str:
    return socket.inet_ntop(socket.AF_INET, int(addr).to_bytes(4, "big"))
