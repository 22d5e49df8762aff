"""The benchmark's synthetic denylist: the same one bench/bpf/srcgen.h draws from.

Entry i is mix(i) with an even first octet, at a prefix length set by
i % 100: 90% /32, 1% /28, 7% /24, 2% /20: IP reputation lists (hosts)
merged with network lists, as large blocklists are. Overlaps collapse, so N entries give
slightly fewer distinct prefixes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.prefixes import V4_DTYPE, V6_DTYPE, PrefixTables


def _mix(i: np.ndarray) -> np.ndarray:
    x = (i.astype(np.uint64) * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(13)
    return x.astype(np.uint32)


def entries(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(addr, plen) of entries 0..n-1, host order, host bits cleared."""
    i = np.arange(n, dtype=np.uint32)
    r = i % 100
    plen = np.select([r < 90, r < 91, r < 98], [32, 28, 24], 20).astype(np.uint8)
    mask = (np.uint64(0xFFFFFFFF) << (np.uint64(32) - plen.astype(np.uint64))) & \
        np.uint64(0xFFFFFFFF)
    addr = (_mix(i) & np.uint32(0xFEFFFFFF)).astype(np.uint64) & mask
    return addr.astype(np.uint32), plen


def tables(n: int) -> PrefixTables:
    addr, plen = entries(n)
    t = np.zeros(n, V4_DTYPE)
    t["addr"], t["plen"] = addr, plen
    return PrefixTables(t, np.zeros(0, V6_DTYPE))


def write_text(n: int, path: Path) -> Path:
    """One prefix per line, as `privedge deny load` and nft read them."""
    addr, plen = entries(n)
    octets = [(addr >> s) & 255 for s in (24, 16, 8, 0)]
    lines = [f"{a}.{b}.{c}.{d}/{p}" for a, b, c, d, p in
             zip(*(o.tolist() for o in octets), plen.tolist(), strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path
