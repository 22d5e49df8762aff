"""The compiler against plain prefix matching, without a kernel.

`lookup` below follows bpf/include/filter.h step by step over the compiled
arrays; for random rule sets it must agree with the reference model's
prefix matching on every probed address.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from agent import abi
from agent.compile import (
    N24,
    Clock,
    build_exact,
    compile_l4,
    compile_rules,
    exact_hashes,
    fill24,
    pack_summary,
    summary_states,
    union24,
)
from agent.config import L4Rule, NodeConfig
from agent.maps import exact_buckets
from agent.prefixes import Prefix, PrefixTables
from agent.rules import ruleset_from_config
from tests import model


def _lpm_lookup(t, addr: int):
    best = None
    for a, p, e in zip(t.addr.tolist(), t.plen.tolist(), t.expires_ns.tolist(), strict=True):
        if (addr >> (32 - p) if p else 0) == (a >> (32 - p) if p else 0) and \
                (best is None or p > best[0]):
            best = (p, e)
    return best


def lookup(c, addr: int, now_ns: int, states: np.ndarray) -> tuple[bool, bool, bool]:
    """(denied, allowlisted, bogon) as filter.h computes them for an IPv4 source."""
    state = int(states[addr >> 8])

    def exact() -> bool:
        if addr == 0:
            return False
        h1, h2 = (int(x[0]) for x in exact_hashes(np.array([addr], np.uint32), c.exact_shift))
        if addr in c.exact[h1]:
            return True
        return bool(c.exact[h1][-1]) and addr in c.exact[h2]

    def lpm_deny() -> bool:
        hit = _lpm_lookup(c.d4lpm, addr)
        return hit is not None and (hit[1] == 0 or hit[1] > now_ns)

    if exact():  # exact table first; its entries are never allowlisted
        return True, False, False
    if state == abi.SumState.DENY:
        denied = True
    elif state == abi.SumState.SLOW:
        denied = lpm_deny()
    else:
        denied = False
    slow = state == abi.SumState.SLOW
    return (denied, slow and _lpm_lookup(c.a4lpm, addr) is not None,
            slow and _lpm_lookup(c.b4lpm, addr) is not None)


def _random_rules(seed: int):
    rng = random.Random(seed)
    now = time.time()
    bases = [rng.getrandbits(32) & 0xFFFF0000 for _ in range(3)]

    def pfx() -> Prefix:
        plen = rng.choice([12, 16, 20, 23, 24, 25, 26, 28, 30, 31, 32, 32, 32])
        a = (rng.choice(bases) + rng.randrange(1 << 16)) if plen >= 16 else rng.getrandbits(32)
        return Prefix(4, a & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF, plen)

    def tabs(n: int, exp: float = 0.0) -> PrefixTables:
        return PrefixTables.from_prefixes([pfx() for _ in range(n)], exp)

    base = ruleset_from_config(NodeConfig(interface="x"))
    rules = base.replace(deny={"config": tabs(200), "list": tabs(30, now + 60),
                               "adhoc": tabs(30, now - 60)},
                         allow=tabs(15), bogons=tabs(8), public=True)
    return rules, bases, rng


@pytest.mark.parametrize("seed", range(6))
def test_compiled_lookups_match_prefix_matching(seed: int) -> None:
    rules, bases, rng = _random_rules(seed)
    clock = Clock.now()
    c = compile_rules(rules, 1, clock)
    states = summary_states(c.summary)
    for _ in range(3000):
        addr = (rng.choice(bases) + rng.randrange(1 << 16)) if rng.random() < 0.9 else \
            rng.getrandbits(32)
        denied, allowed, bogon = lookup(c, addr, clock.mono_ns, states)
        assert denied == model._in(rules.deny_all(), 4, addr, clock.wall, True), hex(addr)
        if denied:  # allow is only consulted on the drop path
            assert allowed == model._in(rules.allow, 4, addr, clock.wall, False), hex(addr)
        if not denied:  # bogons are only checked when the denylist passed
            assert bogon == model._in(rules.bogons, 4, addr, clock.wall, False), hex(addr)


def test_union_and_fill_match_naive_marking() -> None:
    rng = np.random.default_rng(3)
    plen = rng.choice([8, 16, 20, 24, 28, 32], 500).astype(np.uint8)
    addr = (rng.integers(0, 2**32, 500, dtype=np.uint64).astype(np.uint32) &
            ~((np.uint64(1) << (32 - plen.astype(np.uint64))) - np.uint64(1)).astype(np.uint32))
    naive = np.zeros(N24, bool)
    for a, p in zip(addr.tolist(), plen.tolist(), strict=True):
        start = a >> 8
        naive[start: start + (1 << max(0, 24 - p))] = True
    got = fill24(*union24(addr, plen))
    assert np.array_equal(got, naive)


def test_summary_packs_two_bits_per_24() -> None:
    state = np.random.default_rng(1).integers(0, 4, N24).astype(np.uint8)
    words = pack_summary(state)
    assert words.shape == (abi.SUM_WORDS,)
    assert np.array_equal(summary_states(words), state)
    # /24 number i is in word i >> 5 at bit 2 * (i & 31), as filter.h reads it
    i = 0xABCDE
    assert (int(words[i >> 5]) >> (2 * (i & 31))) & 3 == state[i]


def test_exact_table_overflows_only_from_full_buckets() -> None:
    rng = np.random.default_rng(5)
    addrs = np.unique(rng.integers(1, 2**32, 20_000, dtype=np.uint64).astype(np.uint32))
    table, shift, spill = build_exact(addrs, exact_buckets(len(addrs)))
    nb = len(table)
    assert nb == 4096 and shift == 20  # 20,000 / 8 -> 2,500 -> 4,096 buckets
    h1, h2 = exact_hashes(addrs, shift)
    placed = set(table[table != 0].tolist())
    assert placed | set(spill.tolist()) == set(addrs.tolist())
    for a, b1, b2 in zip(addrs.tolist(), h1.tolist(), h2.tolist(), strict=True):
        if a in table[b1]:
            continue
        assert table[b1][-1] != 0, "overflowed from a bucket that was not full"
        assert a in table[b2] or a in spill


def test_effective_expiry_covers_the_chain() -> None:
    now = time.time()
    base = ruleset_from_config(NodeConfig(interface="x", role="backbone"))
    rules = base.replace(deny={
        "config": PrefixTables.from_prefixes([Prefix(4, 0x0A000000, 25)]),      # forever
        "adhoc": PrefixTables.from_prefixes([Prefix(4, 0x0A000004, 32)], now + 5)})
    c = compile_rules(rules, 1, Clock(now, 10**12))
    by_len = dict(zip(c.d4lpm.plen.tolist(), c.d4lpm.expires_ns.tolist(), strict=True))
    assert by_len == {25: 0, 32: 0}, "the /32 inherits 'never' from its /25"


def test_l4_bit_vectors() -> None:
    rules = (L4Rule(name="a", proto="udp", sport=("123",), dport=("123",), action="pass"),
             L4Rule(name="b", proto="udp", sport=("100-200",), action="drop"),
             L4Rule(name="c", proto="gre", action="drop"))
    ports, drop = compile_l4(rules)
    udp = abi.L4Class.UDP * abi.L4_PORTS
    assert drop == 0b110
    assert ports[udp + 123, 0] == 0b11 and ports[udp + 123, 1] == 0b11
    assert ports[udp + 150, 0] == 0b10 and ports[udp + 9, 1] == 0b10
    assert ports[udp + 99, 0] == 0 and ports[abi.L4Class.TCP * abi.L4_PORTS + 123, 0] == 0
    assert ports[abi.L4Class.OTHER * abi.L4_PORTS + 47].tolist() == [0b100, 0b100]


def test_allowlisted_hosts_stay_out_of_the_exact_table() -> None:
    base = ruleset_from_config(NodeConfig(interface="x", role="backbone"))
    rules = base.replace(
        deny={"config": PrefixTables.from_prefixes([Prefix(4, 0xC6336407, 32),
                                                    Prefix(4, 0xC63364F3, 32)])},
        allow=PrefixTables.from_prefixes([Prefix(4, 0xC63364F0, 28)]))
    c = compile_rules(rules, 1)
    assert set(c.exact[c.exact != 0].tolist()) == {0xC6336407}
    assert (0xC63364F3, 32) in set(zip(c.d4lpm.addr.tolist(), c.d4lpm.plen.tolist(),
                                       strict=True))
