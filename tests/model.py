"""A Python reference model of the edge program, written from the spec.

It shares nothing with the C code or agent/compile.py: it parses with
struct and judges sources by plain prefix matching over the RuleSet, so the
differential test (tests/bpf/test_differential.py) checks the kernel
program and the compiler together against the meaning of the rules.
Rate limits are stateful and time-dependent; the model knows nothing of
them, so differential runs switch them off.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from agent.abi import IPV6_EXT_MAX, VLAN_MAX, Reason
from agent.rules import RuleSet

R = Reason
ETH_IP, ETH_IP6, VLANS = 0x0800, 0x86DD, (0x8100, 0x88A8)
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58


@dataclass
class Parsed:
    version: int
    src: int
    proto: int
    nonfirst: bool = False
    first: bool = False
    sport: int | None = None
    dport: int | None = None
    hop_limit: int = 0
    icmp_type: int | None = None


class Drop(Exception):
    def __init__(self, reason: Reason) -> None:
        self.reason = reason


def _l4(p: Parsed, data: bytes, off: int, l4_len: int) -> None:
    short = R.DROP_BAD_FRAGMENT if p.first else R.DROP_TRUNCATED
    have = len(data) - off
    if p.proto == TCP:
        if have < 20 or l4_len < 20:
            raise Drop(short)
        doff = (data[off + 12] >> 4) * 4
        if doff < 20:
            raise Drop(R.DROP_BAD_L4)
        if doff > l4_len:
            raise Drop(short)
        p.sport, p.dport = struct.unpack_from("!HH", data, off)
    elif p.proto == UDP:
        if have < 8 or l4_len < 8:
            raise Drop(short)
        p.sport, p.dport, ulen = struct.unpack_from("!HHH", data, off)
        if ulen < 8 or (ulen > l4_len and not p.first):
            raise Drop(R.DROP_BAD_L4)
    elif p.proto in (ICMP, ICMP6):
        if have < 8 or l4_len < 8:
            raise Drop(short)
        p.icmp_type = data[off]


def _ipv4(data: bytes, off: int) -> Parsed:
    if len(data) - off < 20:
        raise Drop(R.DROP_TRUNCATED)
    if data[off] >> 4 != 4:
        raise Drop(R.DROP_BAD_VERSION)
    hlen = (data[off] & 0xF) * 4
    if hlen < 20:
        raise Drop(R.DROP_BAD_IHL)
    if len(data) - off < hlen:
        raise Drop(R.DROP_TRUNCATED)
    tot, frag = struct.unpack_from("!H2xH", data, off + 2)
    if tot < hlen or tot > len(data) - off:
        raise Drop(R.DROP_BAD_LENGTH)
    p = Parsed(4, int.from_bytes(data[off + 12: off + 16], "big"), data[off + 9])
    offset = frag & 0x1FFF
    if offset:
        if offset == 1 and p.proto == TCP:
            raise Drop(R.DROP_BAD_FRAGMENT)
        p.nonfirst = True
        return p
    p.first = bool(frag & 0x2000)
    _l4(p, data, off + hlen, tot - hlen)
    return p


def _ipv6(data: bytes, off: int) -> Parsed:
    if len(data) - off < 40:
        raise Drop(R.DROP_TRUNCATED)
    if data[off] >> 4 != 6:
        raise Drop(R.DROP_BAD_VERSION)
    (plen,) = struct.unpack_from("!H", data, off + 4)
    if off + 40 + plen > len(data):
        raise Drop(R.DROP_BAD_LENGTH)
    end = off + 40 + plen
    p = Parsed(6, int.from_bytes(data[off + 8: off + 24], "big"), data[off + 6],
               hop_limit=data[off + 7])
    pos, nxt = off + 40, data[off + 6]
    for i in range(IPV6_EXT_MAX):
        if nxt not in (HOPOPTS, ROUTING, DSTOPTS, AH, FRAGMENT):
            break
        if nxt == HOPOPTS and i != 0:
            raise Drop(R.DROP_BAD_EXTHDR)
        if len(data) - pos < 8:
            raise Drop(R.DROP_TRUNCATED)
        if nxt == AH:
            size = (data[pos + 1] + 2) * 4
        elif nxt == FRAGMENT:
            size = 8
            if struct.unpack_from("!H", data, pos + 2)[0] & 0xFFF8:
                p.nonfirst = True
            else:
                p.first = True
        else:
            size = (data[pos + 1] + 1) * 8
        if pos + size > end:
            raise Drop(R.DROP_BAD_LENGTH)
        nxt, pos = data[pos], pos + size
        if p.nonfirst:
            break
    else:
        if nxt in (HOPOPTS, ROUTING, DSTOPTS, AH, FRAGMENT):
            raise Drop(R.DROP_EXTHDR_DEPTH)
    p.proto = nxt
    if not p.nonfirst:
        _l4(p, data, pos, end - pos)
    return p


def parse(data: bytes) -> Parsed | Reason:
    """The parsed packet, or the reason it stops here (a drop or PASS_NOT_IP)."""
    if len(data) < 14:
        return R.DROP_TRUNCATED
    (etype,) = struct.unpack_from("!H", data, 12)
    off = 14
    for _ in range(VLAN_MAX):
        if etype not in VLANS:
            break
        if len(data) - off < 4:
            return R.DROP_TRUNCATED
        (etype,) = struct.unpack_from("!H", data, off + 2)
        off += 4
    if etype in VLANS:
        return R.DROP_VLAN_DEPTH
    try:
        if etype == ETH_IP:
            return _ipv4(data, off)
        if etype == ETH_IP6:
            return _ipv6(data, off)
    except Drop as d:
        return d.reason
    return R.PASS_NOT_IP


def _in(tables, version: int, addr: int, now: float, expiring: bool) -> bool:
    """Does any prefix of the table contain addr (and, if asked, not expired)?"""
    rows = tables.v4 if version == 4 else tables.v6
    bits = 32 if version == 4 else 128
    for r in rows:
        net = int(r["addr"]) if version == 4 else (int(r["hi"]) << 64) | int(r["lo"])
        shift = bits - int(r["plen"])
        live = not expiring or r["expires"] == 0 or r["expires"] > now
        if live and (addr >> shift) == (net >> shift):
            return True
    return False


def _l4_rule_drops(rules: RuleSet, p: Parsed) -> bool:
    for r in rules.l4_rules:
        if r.proto != p.proto:
            continue
        if p.proto in (TCP, UDP):
            if p.nonfirst:
                return False
            if r.sport and not any(x.lo <= p.sport <= x.hi for x in r.sport):
                continue
            if r.dport and not any(x.lo <= p.dport <= x.hi for x in r.dport):
                continue
        return r.action == "drop"
    return False


def _on_link_nd(p: Parsed) -> bool:
    """IPv6 neighbour discovery (RFC 4861: ICMPv6 133-137, hop limit 255)."""
    return (p.version == 6 and p.proto == ICMP6 and p.hop_limit == 255
            and p.icmp_type is not None and 133 <= p.icmp_type <= 137)


def verdict(data: bytes, rules: RuleSet, now: float) -> Reason:
    """What the edge program should say about this frame (limits off)."""
    p = parse(data)
    if isinstance(p, Reason):
        return p
    reason = R.PASS
    deny = rules.deny_all()
    if _in(deny, p.version, p.src, now, expiring=True):
        reason = R.DROP_DENYLIST
    elif (rules.public and not _on_link_nd(p)
          and _in(rules.bogons, p.version, p.src, now, expiring=False)):
        reason = R.DROP_BOGON
    elif _l4_rule_drops(rules, p):
        reason = R.DROP_L4_RULE
    if reason != R.PASS:
        return R.PASS_ALLOW if _in(rules.allow, p.version, p.src, now, False) else reason
    return R.PASS_FRAGMENT if p.nonfirst else R.PASS
