"""The attack mix the demo replays and the integration tests send.

Each category has its own sources, so what reaches the receiver, counted by
source, shows the fate of each category. `NODE_RULES` is what the edge must
be configured with for the mix to mean what it says.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from lab.recv import STOP_MARKER

EDGE4, EDGE6 = "203.0.113.1", "2001:db8:113::1"
CLIENT4, CLIENT6 = "203.0.113.10", "2001:db8:113::10"
ATTACKER = "203.0.113.66"
SYN_FLOODER = "203.0.113.77"

# Rules of the edge for this mix (merged into the node config).
NODE_RULES = {
    "deny": {"prefixes": [f"{ATTACKER}/32", "192.0.2.0/24", "2001:db8:bad::/48"]},
    "limits": {"syn": {"pps": 50, "burst": 50}, "udp": {"pps": 100_000, "burst": 100_000}},
}
SYN_LIMIT = NODE_RULES["limits"]["syn"]


@dataclass
class Category:
    label: str
    fate: str            # "deliver", "drop", or "limit" (the first burst only)
    reason: str          # the counter that should see them
    sources: str         # an address or a prefix the category's sources come from
    count: int
    frames: list[bytes] = field(default_factory=list)

    def owns(self, src: str) -> bool:
        return ipaddress.ip_address(src) in ipaddress.ip_network(self.sources)


def build(dst_mac: str, src_mac: str, scale: int = 1, seed: int = 1) -> list[Category]:
    rng = random.Random(seed)
    eth = Ether(dst=dst_mac, src=src_mac)

    def rnd(net: str) -> str:
        n = ipaddress.ip_network(net)
        return str(n[rng.randrange(n.num_addresses)])

    def hi() -> int:
        return rng.randrange(1024, 65535)

    cats = [
        Category("legit TCP", "deliver", "ok", CLIENT4, 300 * scale),
        Category("legit UDP", "deliver", "ok", "203.0.113.11", 300 * scale),
        Category("legit IPv6", "deliver", "ok", CLIENT6, 150 * scale),
        Category("denylisted host", "drop", "denylist", ATTACKER, 300 * scale),
        Category("denylisted /24", "drop", "denylist", "192.0.2.0/24", 300 * scale),
        Category("denylisted IPv6", "drop", "denylist", "2001:db8:bad::/48", 150 * scale),
        Category("bogon 10/8", "drop", "bogon", "10.0.0.0/8", 200 * scale),
        Category("NTP reflection", "drop", "l4_rule", "203.0.113.20", 200 * scale),
        Category("memcached reflection", "drop", "l4_rule", "203.0.113.21", 100 * scale),
        Category("SYN flood", "limit", "rate_syn", SYN_FLOODER, 600 * scale),
        Category("truncated TCP", "drop", "truncated", "203.0.113.30", 50 * scale),
    ]
    makers = {
        "legit TCP": lambda: eth / IP(src=CLIENT4, dst=EDGE4) / TCP(sport=hi(), dport=443,
                                                                     flags="A"),
        "legit UDP": lambda: eth / IP(src="203.0.113.11", dst=EDGE4) / UDP(sport=hi(),
                                                                           dport=53),
        "legit IPv6": lambda: eth / IPv6(src=CLIENT6, dst=EDGE6) / TCP(sport=hi(), dport=443,
                                                                       flags="A"),
        "denylisted host": lambda: eth / IP(src=ATTACKER, dst=EDGE4) / TCP(sport=hi(),
                                                                           dport=443, flags="S"),
        "denylisted /24": lambda: eth / IP(src=rnd("192.0.2.0/24"), dst=EDGE4) / UDP(
            sport=hi(), dport=53),
        "denylisted IPv6": lambda: eth / IPv6(src=rnd("2001:db8:bad::/48"), dst=EDGE6) / TCP(
            sport=hi(), dport=443, flags="S"),
        "bogon 10/8": lambda: eth / IP(src=rnd("10.0.0.0/8"), dst=EDGE4) / TCP(
            sport=hi(), dport=443, flags="S"),
        "NTP reflection": lambda: eth / IP(src="203.0.113.20", dst=EDGE4) / UDP(
            sport=123, dport=hi()) / Raw(b"\x00" * 440),
        "memcached reflection": lambda: eth / IP(src="203.0.113.21", dst=EDGE4) / UDP(
            sport=11211, dport=hi()) / Raw(b"VALUE " * 100),
        "SYN flood": lambda: eth / IP(src=SYN_FLOODER, dst=EDGE4) / TCP(sport=hi(), dport=443,
                                                                        flags="S"),
        # An IP packet that says TCP but carries only 10 bytes of its header.
        "truncated TCP": lambda: eth / IP(src="203.0.113.30", dst=EDGE4, proto=6) / Raw(
            b"\x01\xbb" * 5),
    }
    for c in cats:
        c.frames = [f if isinstance(f, bytes) else raw(f)
                    for f in (makers[c.label]() for _ in range(c.count))]
    return cats


def interleave(cats: list[Category], seed: int = 1) -> list[bytes]:
    frames = [f for c in cats for f in c.frames]
    random.Random(seed).shuffle(frames)
    return frames


def stop_frame(dst_mac: str, src_mac: str) -> bytes:
    """A legitimate frame the receiver takes as 'done'."""
    return raw(Ether(dst=dst_mac, src=src_mac) / IP(src=CLIENT4, dst=EDGE4) /
               UDP(sport=9, dport=9) / Raw(STOP_MARKER))


def tally(cats: list[Category], by_src: dict[str, int]) -> dict[str, int]:
    """Frames received per category label."""
    out = {c.label: 0 for c in cats}
    for src, n in by_src.items():
        for c in cats:
            if c.owns(src):
                out[c.label] += n
                break
    return out
