"""Packets and rule sets for the fixture table, written with scapy.

Frames that scapy would repair (bad lengths, cut headers) are built and
then cut or patched as bytes, so each case says exactly what it sends.
"""

from __future__ import annotations

import time

import numpy as np
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw, raw

from agent.compile import exact_hashes
from agent.config import L4Rule, Limits, RateLimit
from agent.prefixes import PrefixTables, v4_text
from agent.rules import RuleSet
from tests.harness import tables

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
DST4, DST6 = "198.18.0.1", "2001:db8:100::1"
OK4, OK6 = "198.18.7.7", "2001:db8:1::200"  # sources in space no rule mentions


def b(pkt) -> bytes:
    return raw(pkt)


def v4(src: str = OK4, l4=None, **ip) -> bytes:
    return b(ETH / IP(src=src, dst=DST4, **ip) / (l4 if l4 is not None else TCP(flags="A")))


def v6(src: str | None = None, l4=None, *ext) -> bytes:
    pkt = IPv6(src=src or OK6, dst=DST6)
    for e in ext:
        pkt = pkt / e
    return b(ETH / pkt / (l4 if l4 is not None else TCP(flags="A")))


def patch(frame: bytes, offset: int, data: bytes) -> bytes:
    return frame[:offset] + data + frame[offset + len(data):]


# -- colliding exact addresses (bucket overflow paths) --------------------------------

# The standard set has under 512 exact /32s, so its table has 64 buckets;
# test_fixtures checks that. Candidates come from 100.80.0.0/16, used by
# nothing else.
EXACT_SHIFT = 32 - 6
_CANDIDATES = np.arange(0x64500000, 0x64510000, dtype=np.uint32)


def _h(addr: int) -> tuple[int, int]:
    h1, h2 = exact_hashes(np.array([addr], np.uint32), EXACT_SHIFT)
    return int(h1[0]), int(h2[0])


def _crafted() -> dict[str, list[int]]:
    """Addresses that drive the exact table into its overflow paths.

    a:    17 sharing bucket A; the 17th overflows into its h2 bucket
    b:    17 sharing bucket B; the 17th finds its h2 bucket D full of
    fill: 16 addresses whose h1 is D, so it spills to the trie
    """
    h1, _ = exact_hashes(_CANDIDATES, EXACT_SHIFT)
    by_bucket = {int(k): _CANDIDATES[h1 == k] for k in np.unique(h1)}
    buckets = sorted(by_bucket)
    for a in buckets:
        group_a = by_bucket[a][:17]
        c = _h(int(group_a[-1]))[1]
        if c == a:
            continue
        for bb in buckets:
            group_b = by_bucket[bb][:17]
            d = _h(int(group_b[-1]))[1]
            if len({a, bb, c, d}) == 4 and len(by_bucket[d]) >= 16:
                return {"a": group_a.tolist(), "b": group_b.tolist(),
                        "fill": by_bucket[d][:16].tolist(),
                        "a_miss": by_bucket[a][17:18].tolist()}
    raise AssertionError("no colliding buckets found")


CRAFTED = _crafted()
OVERFLOWED = v4_text(CRAFTED["a"][-1])     # lives in its h2 bucket
SPILLED = v4_text(CRAFTED["b"][-1])        # h1 and h2 full: lives in the trie
FULL_MISS = v4_text(CRAFTED["a_miss"][0])  # h1 full, not listed: both buckets miss
PRIMARY = v4_text(CRAFTED["a"][0])


def standard_rules(base: RuleSet, now: float | None = None) -> RuleSet:
    """The rule set most cases run against (a public interface, limits off)."""
    now = now or time.time()
    crafted = [v4_text(x) for k in ("a", "b", "fill") for x in CRAFTED[k]]
    deny = tables("198.51.100.7", "198.51.100.243", "203.0.113.0/24", "100.70.0.0/16",
                  "198.51.100.16/28", "192.0.2.0/24", "2001:db8:bad::/48", "2001:db8:dead::1",
                  *crafted)
    live = tables("198.51.100.99", "2001:db8:beef::/64", expires=now + 3600)
    gone = tables("198.51.100.98", "2001:db8:cafe::/64", expires=now - 10)
    return base.replace(
        deny={"config": deny, "list": PrefixTables.concat(live, gone), "adhoc": tables()},
        allow=tables("192.0.2.128/25", "2001:db8:bad:1::/64", "10.1.1.0/24",
                     "198.51.100.240/28"),
        bogons=tables("0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4",
                      "fe80::/10", "ff00::/8"),
        l4_rules=(*base.l4_rules,
                  L4Rule(name="telnet", proto="tcp", dport=("23",), action="drop"),
                  L4Rule(name="gre", proto="gre", action="drop")),
        limits=Limits(syn=RateLimit(pps=0, burst=1), udp=RateLimit(pps=0, burst=1)),
        public=True,
    )


def backbone_rules(base: RuleSet) -> RuleSet:
    return standard_rules(base).replace(public=False)


def rate_rules(base: RuleSet) -> RuleSet:
    """Limits slow enough that a burst of packets in one test run trips them."""
    return standard_rules(base).replace(
        limits=Limits(syn=RateLimit(pps=1, burst=3), udp=RateLimit(pps=1, burst=5)))


RULE_SETS = {"standard": standard_rules, "backbone": backbone_rules, "rate": rate_rules}

__all__ = [
    "AH",
    "ARP",
    "DST4",
    "DST6",
    "ETH",
    "EXACT_SHIFT",
    "FULL_MISS",
    "GRE",
    "ICMP",
    "IP",
    "OK4",
    "OK6",
    "OVERFLOWED",
    "PRIMARY",
    "RULE_SETS",
    "SPILLED",
    "TCP",
    "UDP",
    "Dot1AD",
    "Dot1Q",
    "ICMPv6EchoRequest",
    "IPv6",
    "IPv6ExtHdrDestOpt",
    "IPv6ExtHdrFragment",
    "IPv6ExtHdrHopByHop",
    "IPv6ExtHdrRouting",
    "Raw",
    "b",
    "patch",
    "v4",
    "v6",
]
