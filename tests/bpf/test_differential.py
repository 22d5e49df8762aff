"""Differential test: the kernel program against the Python reference model.

Random rule sets (prefixes of every length, expiries past and future,
allowlist holes, bogons, L4 rules) and 20,000+ random and fuzzed frames:
well-formed ones of every shape the parser knows, then the same cut at a
random byte and with header bytes overwritten. Verdict and reason must
agree on every frame (rate limits off: the model is stateless).
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Raw, raw

from agent.abi import Reason
from agent.config import L4Rule, Limits, RateLimit
from agent.prefixes import Prefix, PrefixTables
from tests import model

SEEDS = (1, 2, 3, 4)
FRAMES_PER_SEED = 5_200  # 4 x 5,200 = 20,800 frames
REFLECTION = (17, 19, 123, 389, 1900, 11211)


def _v4(rng: random.Random, base: int, spread: int) -> int:
    return (base + rng.randrange(spread)) & 0xFFFFFFFF


def random_rules(rng: random.Random, base_rules):
    """Prefixes clustered in a few /16s so random sources hit them often."""
    now = time.time()
    v4_bases = [rng.getrandbits(32) & 0xFFFF0000 for _ in range(4)]
    v6_bases = [(0x20010DB8 << 96) | (rng.getrandbits(32) << 64) for _ in range(3)]

    def v4_prefix() -> Prefix:
        plen = rng.choice([8, 12, 16, 20, 22, 24, 24, 25, 27, 28, 30, 31, 32, 32, 32, 32])
        a = _v4(rng, rng.choice(v4_bases), 1 << 16) if plen >= 16 else rng.getrandbits(32)
        return Prefix(4, a & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF, plen)

    def v6_prefix() -> Prefix:
        plen = rng.choice([32, 48, 56, 64, 64, 96, 120, 128, 128])
        a = rng.choice(v6_bases) | rng.getrandbits(64)
        return Prefix(6, a & ~((1 << (128 - plen)) - 1) & ((1 << 128) - 1), plen)

    def tabs(n4: int, n6: int, expires: float = 0.0) -> PrefixTables:
        return PrefixTables.from_prefixes([v4_prefix() for _ in range(n4)] +
                                          [v6_prefix() for _ in range(n6)], expires)

    deny = {"config": tabs(120, 30), "list": tabs(20, 8, now + 3600),
            "adhoc": tabs(20, 8, now - 5)}
    l4 = []
    for i in range(rng.randrange(2, 10)):
        proto = rng.choice(["tcp", "udp", "udp", "icmp", "gre", 132])
        ports = {}
        if proto in ("tcp", "udp"):
            for side in ("sport", "dport"):
                if rng.random() < 0.6:
                    lo = rng.choice([0, 19, 53, 123, 1024, rng.randrange(65536)])
                    ports[side] = (f"{lo}-{min(65535, lo + rng.choice([0, 0, 5, 1000]))}",)
        l4.append(L4Rule(name=f"r{i}", proto=proto, action=rng.choice(["drop", "pass"]),
                         **ports))
    return base_rules.replace(
        deny=deny, allow=tabs(10, 4), bogons=tabs(6, 3), l4_rules=tuple(l4),
        limits=Limits(syn=RateLimit(pps=0, burst=1), udp=RateLimit(pps=0, burst=1)),
        public=rng.random() < 0.8), v4_bases, v6_bases


def random_frame(rng: random.Random, v4_bases, v6_bases) -> bytes:
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
        eth = eth / rng.choice([Dot1Q(vlan=rng.randrange(4096)), Dot1AD(vlan=7)])
    sport = rng.choice([*REFLECTION, rng.randrange(65536), rng.randrange(1024)])
    dport = rng.choice([53, 80, 123, 443, rng.randrange(65536)])
    l4 = rng.choice([
        TCP(sport=sport, dport=dport, flags=rng.choice(["S", "A", "SA", "PA", "R"])),
        UDP(sport=sport, dport=dport) / Raw(b"x" * rng.randrange(40)),
        ICMP(), GRE(), Raw(b"y" * rng.randrange(4, 30))])
    if rng.random() < 0.55:
        src = _v4(rng, rng.choice(v4_bases), 1 << 16) if rng.random() < 0.8 else \
            rng.getrandbits(32)
        ip = IP(src=".".join(str((src >> s) & 255) for s in (24, 16, 8, 0)), dst="198.18.0.1")
        if rng.random() < 0.15:
            ip.flags = "MF"
        if rng.random() < 0.1:
            ip.frag = rng.choice([1, 2, 100])
        if rng.random() < 0.1:
            ip.options = [b"\x01" * rng.choice([4, 8, 40])]
        if isinstance(l4, Raw):
            ip.proto = rng.choice([6, 17, 1, 47, 132, 50])
        pkt = eth / ip / l4
    else:
        a = rng.choice(v6_bases) | rng.getrandbits(64) if rng.random() < 0.8 else \
            rng.getrandbits(128)
        ip6 = IPv6(src=":".join(f"{(a >> s) & 0xFFFF:x}" for s in range(112, -1, -16)),
                   dst="2001:db8:100::1")
        pkt = ip6
        for i in range(rng.choice([0, 0, 1, 2, 4, 6, 7])):
            pkt = pkt / rng.choice([IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(),
                                    IPv6ExtHdrHopByHop() if i == 0 else IPv6ExtHdrDestOpt(),
                                    IPv6ExtHdrFragment(m=1, offset=rng.choice([0, 0, 5]))])
        if isinstance(l4, ICMP):
            l4 = ICMPv6EchoRequest()
        pkt = eth / pkt / l4
    frame = raw(pkt)
    roll = rng.random()
    if roll < 0.25:  # cut anywhere from 14 bytes on
        frame = frame[: rng.randrange(14, len(frame) + 1)]
    elif roll < 0.5:  # overwrite a few header bytes
        b = bytearray(frame)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(12, min(len(b), 100))] = rng.randrange(256)
        frame = bytes(b)
    return frame


@pytest.mark.parametrize("seed", SEEDS)
def test_kernel_agrees_with_model(edge, seed: int) -> None:
    rng = random.Random(seed)
    rules, v4_bases, v6_bases = random_rules(rng, edge.base_rules())
    edge.apply(rules)
    now = time.time()
    seen: Counter[Reason] = Counter()
    mismatches = []
    for i in range(FRAMES_PER_SEED):
        frame = random_frame(rng, v4_bases, v6_bases)
        before = edge.counters()
        edge.run(frame)
        after = edge.counters()
        got = [Reason(r) for r in range(len(Reason)) if after[r][0] != before[r][0]]
        want = model.verdict(frame, rules, now)
        seen[want] += 1
        if got != [want]:
            mismatches.append(f"#{i} {frame.hex()}: model {want.name}, kernel "
                              f"{[g.name for g in got]}")
    assert not mismatches, f"{len(mismatches)} disagreements, first:\n" + \
        "\n".join(mismatches[:5])
    # The generator must reach the interesting verdicts, or the test proves little.
    for reason in (Reason.PASS, Reason.DROP_DENYLIST, Reason.DROP_TRUNCATED,
                   Reason.PASS_FRAGMENT, Reason.DROP_L4_RULE):
        assert seen[reason] > 20, f"seed {seed}: only {seen[reason]} frames got {reason.name}"
