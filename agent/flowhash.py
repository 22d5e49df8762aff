"""The edge program's flow hash (bpf/include/steer.h), in Python.

Which in-region DC a flow lands on is `table[region][flow_hash % slots]`;
tests and benchmarks use this to predict the kernel's choice, and
tests/bpf proves the two agree packet by packet. An ICMP error that quotes
a packet from a regional IP (a router's "packet too big" for a DC's reply)
is hashed as the client's flow it belongs to: flow_hash(client, regional
IP, proto, client port, service port), the quoted packet turned around.
"""

from __future__ import annotations

import ipaddress

from agent import abi

M32 = 0xFFFFFFFF
IPPROTO_TCP, IPPROTO_UDP = 6, 17


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & M32


def _mix(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & M32
    k = _rotl(k, 15)
    k = (k * 0x1B873593) & M32
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & M32


def _words(addr: str) -> list[int]:
    """An address as the kernel loads it: 32-bit words of network-order
    bytes on a little-endian CPU."""
    raw = ipaddress.ip_address(addr).packed
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]


def flow_hash(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0,
              fragment: bool = False) -> int:
    """Hash of a flow; ports count only for TCP and UDP, never for fragments."""
    h = abi.FLOW_SEED
    ports = 0
    if proto in (IPPROTO_TCP, IPPROTO_UDP) and not fragment:
        ports = (sport << 16) | dport
    for w in _words(src) + _words(dst):
        h = _mix(h, w)
    h = _mix(h, ports)
    h = _mix(h, proto)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    h ^= h >> 16
    return h
