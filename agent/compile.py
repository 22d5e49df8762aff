"""Compile a RuleSet into the contents of one generation's maps.

Pure numpy, no kernel: unit tests run it without root. The shapes are set
by bpf/include/pe_abi.h (see bpf/README.md for the why):

  summary   2 bits per IPv4 /24 (CLEAN, DENY, EXACT, SLOW), packed in u64
  exact     permanent /32 denies in a bucketised cuckoo table
  d4lpm     what the summary sends to the SLOW path: /25-/31 and expiring
            denies, /32s the exact table could not place, and permanent
            <=/24 denies that cover a SLOW /24
  d6lpm     every IPv6 deny
  a4/a6     allowlist; b4/b6 bogons (public interfaces only)
  l4ports   L4 rules as per-port bit vectors

Allow, bogon and expiring entries make their /24s SLOW, so CLEAN, DENY and
EXACT /24s are judged from the summary and at most one exact bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent import abi
from agent.config import Capacity, L4Rule
from agent.maps import exact_buckets
from agent.rules import RuleSet
from agent.steering import SteerTables, compile_steering

N24 = 1 << 24
NEVER = np.inf
U32 = np.uint64(0xFFFFFFFF)


class CapacityError(ValueError):
    """A list does not fit the configured map sizes; nothing was applied."""


@dataclass(frozen=True)
class Clock:
    """Pairs wall-clock seconds with CLOCK_MONOTONIC ns (bpf_ktime_get_ns)."""

    wall: float
    mono_ns: int

    @classmethod
    def now(cls) -> Clock:
        return cls(time.time(), time.monotonic_ns())

    def to_mono_ns(self, wall: np.ndarray) -> np.ndarray:
        """Wall deadlines (inf = never) -> monotonic ns (0 = never)."""
        out = np.zeros(len(wall), np.uint64)
        finite = np.isfinite(wall)
        delta = np.maximum(wall[finite] - self.wall, 0) * 1e9
        out[finite] = (self.mono_ns + delta).astype(np.uint64)
        return out


@dataclass
class Lpm4:
    addr: np.ndarray        # uint32, host order
    plen: np.ndarray        # uint8
    expires_ns: np.ndarray  # uint64 monotonic, 0 = never

    def __len__(self) -> int:
        return len(self.addr)


@dataclass
class Lpm6:
    hi: np.ndarray
    lo: np.ndarray
    plen: np.ndarray
    expires_ns: np.ndarray

    def __len__(self) -> int:
        return len(self.hi)


@dataclass
class Compiled:
    summary: np.ndarray          # uint64[SUM_WORDS]
    exact: np.ndarray | None     # uint32[buckets, EXACT_SLOTS]; None: placed live
    exact_shift: int
    d4lpm: Lpm4
    d6lpm: Lpm6
    a4lpm: Lpm4
    a6lpm: Lpm6
    b4lpm: Lpm4
    b6lpm: Lpm6
    l4ports: np.ndarray          # uint32[L4 classes * 65536, 2]
    params: abi.Params
    steer: SteerTables
    counts: dict[str, int] = field(default_factory=dict)


# -- IPv4 -------------------------------------------------------------------------


def merge_v4(t: np.ndarray, clock: Clock) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (addr, plen) with the latest expiry; expired entries dropped.

    Returns addr (uint32), plen (uint8), expiry (float wall seconds, inf = never).
    """
    exp = np.where(t["expires"] == 0, NEVER, t["expires"])
    live = exp > clock.wall
    key = (t["addr"][live].astype(np.uint64) << np.uint64(8)) | t["plen"][live]
    exp = exp[live]
    uniq, inv = np.unique(key, return_inverse=True)
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inv, exp)
    return (uniq >> np.uint64(8)).astype(np.uint32), (uniq & np.uint64(0xFF)).astype(
        np.uint8), best


def span24(addr: np.ndarray, plen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First /24 index and count of /24s each prefix touches."""
    start = (addr >> 8).astype(np.int64)
    width = np.where(plen >= 24, 1, np.left_shift(1, 24 - np.minimum(plen, 24).astype(np.int64)))
    return start & ~(width - 1), width


def union24(addr: np.ndarray, plen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The /24 ranges the prefixes touch, as sorted disjoint [start, end).

    Prefix ranges are nested or disjoint, so after sorting by start (widest
    first) a range starting before an earlier one ends lies inside it.
    """
    start, width = span24(addr, plen)
    order = np.lexsort((-width, start))
    start, end = start[order], start[order] + width[order]
    inside = np.r_[False, np.maximum.accumulate(end)[:-1] > start[1:]] if len(start) else \
        np.zeros(0, bool)
    return start[~inside], end[~inside]


def inside(addrs: np.ndarray, p_addr: np.ndarray, p_plen: np.ndarray) -> np.ndarray:
    """For each address: is it inside any of the prefixes?"""
    if len(p_addr) == 0:
        return np.zeros(len(addrs), bool)
    start = p_addr.astype(np.int64)
    end = start + np.left_shift(1, 32 - p_plen.astype(np.int64))
    order = np.lexsort((-end, start))
    start, end = start[order], end[order]
    keep = np.r_[True, np.maximum.accumulate(end)[:-1] <= start[1:]]
    return overlaps(addrs.astype(np.int64), addrs.astype(np.int64) + 1, start[keep], end[keep])


def fill24(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Boolean per /24 from sorted disjoint ranges (one np.repeat)."""
    bounds = np.empty(2 * len(start) + 2, np.int64)
    bounds[0], bounds[-1] = 0, N24
    bounds[1:-1:2], bounds[2:-1:2] = start, end
    runs = np.zeros(len(bounds) - 1, bool)
    runs[1::2] = True
    return np.repeat(runs, np.diff(bounds))


def overlaps(q_start: np.ndarray, q_end: np.ndarray, start: np.ndarray,
             end: np.ndarray) -> np.ndarray:
    """For each query range: does it overlap any of the sorted disjoint ranges?"""
    if len(start) == 0:
        return np.zeros(len(q_start), bool)
    i = np.searchsorted(start, q_end) - 1
    ok = i >= 0
    return ok & (end[np.maximum(i, 0)] > q_start)


def exact_hashes(addr: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket indices h1, h2 exactly as filter.h computes them."""
    a = addr.astype(np.uint64)
    s = np.uint64(shift)
    h1 = ((a * np.uint64(abi.EXACT_MUL1)) & U32) >> s
    h2 = (((a ^ np.uint64(abi.EXACT_XOR2)) * np.uint64(abi.EXACT_MUL2)) & U32) >> s
    return h1.astype(np.int64), h2.astype(np.int64)


def build_exact(addrs: np.ndarray, nb: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Place unique non-zero addresses in `nb` buckets: (table, shift,
    addresses that did not fit).

    Invariant shared with live updates and filter.h: an address sits in its
    h2 bucket only while its h1 bucket is completely full.
    """
    shift = 32 - (nb.bit_length() - 1)
    table = np.zeros((nb, abi.EXACT_SLOTS), np.uint32)
    if len(addrs) == 0:
        return table, shift, np.zeros(0, np.uint32)
    h1, h2 = exact_hashes(addrs, shift)
    order = np.argsort(h1, kind="stable")
    hs, hs2, av = h1[order], h2[order], addrs[order]
    first = np.r_[True, hs[1:] != hs[:-1]]
    idx = np.arange(len(hs))
    rank = idx - np.maximum.accumulate(np.where(first, idx, 0))
    home = rank < abi.EXACT_SLOTS
    table[hs[home], rank[home]] = av[home]
    fill = np.bincount(hs[home], minlength=nb)
    spill: list[int] = []
    for a, b in zip(av[~home].tolist(), hs2[~home].tolist(), strict=True):
        if fill[b] < abi.EXACT_SLOTS:
            table[b, fill[b]] = a
            fill[b] += 1
        else:
            spill.append(a)
    return table, shift, np.array(spill, np.uint32)


def effective_expiry_v4(addr: np.ndarray, plen: np.ndarray, exp: np.ndarray) -> np.ndarray:
    """Each entry's latest expiry over itself and every entry containing it.

    The trie answers with the longest match only; storing the chain's latest
    expiry there makes that answer right for the whole chain.
    """
    eff = exp.copy()
    a64 = addr.astype(np.uint64)
    for level in np.unique(plen):
        at = np.nonzero(plen == level)[0]
        deeper = np.nonzero(plen > level)[0]
        if len(deeper) == 0:
            break
        s = np.uint64(32 - int(level))
        keys = a64[at] >> s
        order = np.argsort(keys)
        ks, es = keys[order], eff[at][order]
        q = a64[deeper] >> s
        pos = np.minimum(np.searchsorted(ks, q), len(ks) - 1)
        hit = ks[pos] == q
        eff[deeper[hit]] = np.maximum(eff[deeper[hit]], es[pos[hit]])
    return eff


def pack_summary(state: np.ndarray) -> np.ndarray:
    """uint8 state per /24 -> uint64 words, /24 i at bits 2*(i % 32)."""
    s = state.reshape(-1, 4)
    packed = (s[:, 0] | (s[:, 1] << 2) | (s[:, 2] << 4) | (s[:, 3] << 6)).astype(np.uint8)
    return packed.view("<u8").astype(np.uint64)


def summary_states(words: np.ndarray) -> np.ndarray:
    """Inverse of pack_summary (for status, tests and live diffs)."""
    b = words.astype("<u8").view(np.uint8)
    out = np.empty((len(b), 4), np.uint8)
    for i in range(4):
        out[:, i] = (b >> (2 * i)) & 3
    return out.reshape(-1)


def _lpm4(addr: np.ndarray, plen: np.ndarray, exp_ns: np.ndarray | None = None) -> Lpm4:
    e = np.zeros(len(addr), np.uint64) if exp_ns is None else exp_ns
    return Lpm4(addr.astype(np.uint32), plen.astype(np.uint8), e)


# Places the exact /32s: (table or None, shift, addresses left over for the trie).
Placer = Callable[[np.ndarray], tuple[np.ndarray | None, int, np.ndarray]]


def compile_v4(rules: RuleSet, clock: Clock, cap: Capacity, placer: Placer | None = None):
    """(summary, exact table, shift, d4lpm, a4lpm, b4lpm, counts).

    `placer` puts the exact /32s somewhere: a new table (build_exact) or,
    for live updates, the live one (agent/live.py).
    """
    deny = rules.deny_all().v4
    addr, plen, exp = merge_v4(deny, clock)
    allow = np.unique(rules.allow.v4[["addr", "plen"]])
    bogon = np.unique(rules.bogons.v4[["addr", "plen"]]) if rules.public else \
        np.zeros(0, allow.dtype)
    for name, t, limit, key in (("allowlist", allow, cap.allow, "allow"),
                                ("bogon", bogon, cap.bogons, "bogons")):
        if len(t) > limit:
            raise CapacityError(f"{len(t):,} IPv4 {name} entries exceed the capacity of "
                                f"{limit:,} (capacity.{key})")
    perm = np.isinf(exp)
    host = perm & (plen == 32) & (addr != 0)
    # A hit in the exact table drops at once (filter.h), so allowlisted
    # addresses stay out of it and go by the SLOW path instead.
    allowed = np.zeros(len(addr), bool)
    allowed[host] = inside(addr[host], allow["addr"], allow["plen"])
    is_exact = host & ~allowed
    is_cover = perm & (plen <= 24)
    is_lpm = ~(is_exact | is_cover)

    n_exact = int(is_exact.sum())
    if n_exact > cap.deny4_exact:
        raise CapacityError(f"{n_exact:,} IPv4 /32 denies exceed the capacity of "
                            f"{cap.deny4_exact:,} (capacity.deny4_exact)")
    if placer is None:
        table, shift, spill = build_exact(addr[is_exact], exact_buckets(cap.deny4_exact))
    else:
        table, shift, spill = placer(addr[is_exact])

    cover = fill24(*union24(addr[is_cover], plen[is_cover]))
    exact24 = np.zeros(N24, bool)
    exact24[addr[is_exact] >> 8] = True
    s_addr = np.concatenate([addr[is_lpm], allow["addr"], bogon["addr"], spill])
    s_plen = np.concatenate([plen[is_lpm], allow["plen"], bogon["plen"],
                             np.full(len(spill), 32, np.uint8)])
    slow_start, slow_end = union24(s_addr, s_plen)
    state = np.zeros(N24, np.uint8)  # CLEAN; later assignments take precedence
    state[exact24] = abi.SumState.EXACT
    state[cover] = abi.SumState.DENY
    state[fill24(slow_start, slow_end)] = abi.SumState.SLOW

    # Permanent covers of SLOW /24s go to the trie: SLOW hides the DENY bit.
    start, width = span24(addr[is_cover], plen[is_cover])
    cover_idx = np.nonzero(is_cover)[0][overlaps(start, start + width, slow_start, slow_end)]
    lpm_idx = np.concatenate([np.nonzero(is_lpm)[0], cover_idx])
    l_addr = np.concatenate([addr[lpm_idx], spill])
    l_plen = np.concatenate([plen[lpm_idx], np.full(len(spill), 32, np.uint8)])
    l_exp = np.concatenate([exp[lpm_idx], np.full(len(spill), NEVER)])
    if len(l_addr) > cap.deny4_lpm:
        raise CapacityError(f"{len(l_addr):,} IPv4 denies need the trie (/25-/31, expiring, or "
                            f"covering allowlisted/bogon space), over its capacity of "
                            f"{cap.deny4_lpm:,} (capacity.deny4_lpm)")
    l_exp = clock.to_mono_ns(effective_expiry_v4(l_addr, l_plen, l_exp))

    counts = {"deny4_exact": n_exact, "deny4_cover": int(is_cover.sum()),
              "deny4_lpm": len(l_addr), "deny4_spill": len(spill),
              "sum_deny": int((state == abi.SumState.DENY).sum()),
              "sum_exact": int((state == abi.SumState.EXACT).sum()),
              "sum_slow": int((state == abi.SumState.SLOW).sum())}
    return (pack_summary(state), table, shift,
            _lpm4(l_addr, l_plen, l_exp), _lpm4(allow["addr"], allow["plen"]),
            _lpm4(bogon["addr"], bogon["plen"]), counts)


# -- IPv6 -------------------------------------------------------------------------------


def _v6_ints(t: np.ndarray) -> list[tuple[int, int, float]]:
    return [((int(h) << 64) | int(lo), int(p), float(e))
            for h, lo, p, e in zip(t["hi"], t["lo"], t["plen"], t["expires"], strict=True)]


def _lpm6(entries: dict[tuple[int, int], float], clock: Clock) -> Lpm6:
    keys = sorted(entries)
    hi = np.array([a >> 64 for a, _ in keys], np.uint64)
    lo = np.array([a & (2**64 - 1) for a, _ in keys], np.uint64)
    plen = np.array([p for _, p in keys], np.uint8)
    exp = np.array([entries[k] for k in keys], np.float64)
    return Lpm6(hi, lo, plen, clock.to_mono_ns(exp))


def compile_v6(rules: RuleSet, clock: Clock, cap: Capacity) -> tuple[Lpm6, Lpm6, Lpm6]:
    deny: dict[tuple[int, int], float] = {}
    for a, p, e in _v6_ints(rules.deny_all().v6):
        e = NEVER if e == 0 else e
        if e > clock.wall:
            deny[(a, p)] = max(deny.get((a, p), -np.inf), e)
    if len(deny) > cap.deny6:
        raise CapacityError(f"{len(deny):,} IPv6 denies exceed the capacity of {cap.deny6:,} "
                            "(capacity.deny6)")
    # Latest expiry over each chain (see effective_expiry_v4).
    levels = sorted({p for _, p in deny})
    by_level: dict[int, dict[int, float]] = {lv: {} for lv in levels}
    for (a, p), e in sorted(deny.items(), key=lambda kv: kv[0][1]):
        for lv in levels:
            if lv >= p:
                break
            anc = by_level[lv].get(a >> (128 - lv))
            if anc is not None:
                e = max(e, anc)
        by_level[p][a >> (128 - p)] = e
        deny[(a, p)] = e
    allow = {(a, p): NEVER for a, p, _ in _v6_ints(rules.allow.v6)}
    bogon = {(a, p): NEVER for a, p, _ in _v6_ints(rules.bogons.v6)} if rules.public else {}
    if len(allow) > cap.allow:
        raise CapacityError(f"{len(allow):,} IPv6 allowlist entries exceed the capacity of "
                            f"{cap.allow:,} (capacity.allow)")
    if len(bogon) > cap.bogons:
        raise CapacityError(f"{len(bogon):,} IPv6 bogon entries exceed the capacity of "
                            f"{cap.bogons:,} (capacity.bogons)")
    return _lpm6(deny, clock), _lpm6(allow, clock), _lpm6(bogon, clock)


# -- L4 rules and parameters -----------------------------------------------------------------


def compile_l4(rules: tuple[L4Rule, ...]) -> tuple[np.ndarray, int]:
    """Per-port rule bit vectors and the mask of rules that drop."""
    ports = np.zeros((len(abi.L4Class) * abi.L4_PORTS, 2), np.uint32)
    drop = 0
    for i, r in enumerate(rules):
        bit = np.uint32(1 << i)
        if r.action == "drop":
            drop |= 1 << i
        if r.proto in (6, 17):
            base = (abi.L4Class.TCP if r.proto == 6 else abi.L4Class.UDP) * abi.L4_PORTS
            for col, ranges in ((0, r.sport), (1, r.dport)):
                for lo, hi in [(pr.lo, pr.hi) for pr in ranges] or [(0, 65535)]:
                    ports[base + lo: base + hi + 1, col] |= bit
        else:
            ports[abi.L4Class.OTHER * abi.L4_PORTS + r.proto, :] |= bit
    return ports, drop


def compile_rules(rules: RuleSet, generation: int, clock: Clock | None = None,
                  placer: Placer | None = None) -> Compiled:
    """The whole generation; raises CapacityError before anything is built."""
    clock = clock or Clock.now()
    cap = rules.capacity
    summary, exact, shift, d4, a4, b4, counts = compile_v4(rules, clock, cap, placer)
    d6, a6, b6 = compile_v6(rules, clock, cap)
    ports, drop = compile_l4(rules.l4_rules)
    params = abi.Params(
        generation=generation,
        flags=abi.F_BOGONS if rules.public else 0,
        exact_shift=shift,
        l4_drop_rules=drop,
        syn=abi.Rate(rules.limits.syn.interval_ns, rules.limits.syn.burst_ns),
        udp=abi.Rate(rules.limits.udp.interval_ns, rules.limits.udp.burst_ns),
    )
    steer = compile_steering(rules.steering, rules.public, rules.backbone_ifindex,
                             cap.maglev_slots)
    counts.update(deny6=len(d6), allow4=len(a4), allow6=len(a6), bogon4=len(b4),
                  bogon6=len(b6), l4_rules=len(rules.l4_rules), **steer.counts)
    return Compiled(summary, exact, shift, d4, d6, a4, a6, b4, b6, ports, params, steer,
                    counts)

