"""The fixture table: the real edge program on scapy-built frames.

Each case sends a frame through the root program (tail call included) with
BPF_PROG_TEST_RUN and checks the verdict, the output bytes, and the change
of every per-reason counter, zeros included. A failure reads like
    deny_v6_prefix: expected DROP_DENYLIST got PASS
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from agent.abi import Reason
from agent.libbpf import XdpAction
from tests.bpf.cases import (
    AH,
    ARP,
    DST6,
    ETH,
    EXACT_SHIFT,
    FULL_MISS,
    GRE,
    ICMP,
    IP,
    OK4,
    OK6,
    OVERFLOWED,
    PRIMARY,
    RULE_SETS,
    SPILLED,
    TCP,
    UDP,
    Dot1AD,
    Dot1Q,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
    b,
    patch,
    v4,
    v6,
)

R = Reason


@dataclass(frozen=True)
class Case:
    name: str
    why: str
    frame: bytes | Callable[[], bytes]
    reason: Reason
    rules: str = "standard"
    count: int = 1                       # frames sent
    counts: dict[Reason, int] | None = None  # per-reason deltas if not count x reason


def Ether_type(t: int):
    e = ETH.copy()
    e.type = t
    return e


def v6_layer():
    return IPv6(src=OK6, dst=DST6)


E = ETH
IP_OFF = 14  # IPv4/IPv6 header offset in an untagged frame
NS_BODY = Raw(b"\x87\x00" + bytes(22))  # ICMPv6 neighbour solicitation, type 135

CASES = [
    # -- Ethernet and VLAN -------------------------------------------------------------------------
    Case("eth_only", "an IPv4 EtherType and nothing after it", b(Ether_type(0x0800)),
         R.DROP_TRUNCATED),
    Case("arp", "not IP: the stack decides", b(E / ARP()), R.PASS_NOT_IP),
    Case("unknown_ethertype", "LLDP and friends pass untouched",
         b(Ether_type(0x88CC) / Raw(b"\x00" * 46)), R.PASS_NOT_IP),
    Case("vlan_one", "one 802.1Q tag", b(E / Dot1Q(vlan=10) / IP(src=OK4) / TCP(flags="A")),
         R.PASS),
    Case("vlan_qinq", "802.1ad outer and 802.1Q inner tag",
         b(E / Dot1AD(vlan=20) / Dot1Q(vlan=10) / IP(src=OK4) / TCP(flags="A")), R.PASS),
    Case("vlan_three", "three tags exceed PE_VLAN_MAX",
         b(E / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / IP(src=OK4) / TCP()),
         R.DROP_VLAN_DEPTH),
    Case("vlan_cut", "a VLAN EtherType with the tag cut off",
         b(E / Dot1Q(vlan=10) / IP(src=OK4) / TCP())[:16], R.DROP_TRUNCATED),
    Case("vlan_denied_inside", "the filter sees through two tags",
         b(E / Dot1AD(vlan=20) / Dot1Q(vlan=10) / IP(src="198.51.100.7") / TCP()),
         R.DROP_DENYLIST),
    Case("vlan_ipv6", "IPv6 behind a tag", b(E / Dot1Q(vlan=5) / v6_layer() / TCP(flags="A")),
         R.PASS),
    # -- IPv4 header -------------------------------------------------------------------------------
    Case("ipv4_cut_19", "an IPv4 header one byte short", v4()[:IP_OFF + 19], R.DROP_TRUNCATED),
    Case("ipv4_cut_at_ip", "the frame ends where IPv4 begins", v4()[:IP_OFF], R.DROP_TRUNCATED),
    Case("ipv4_ihl_4", "IHL under 5", patch(v4(), IP_OFF, b"\x44"), R.DROP_BAD_IHL),
    Case("ipv4_ihl_0", "IHL zero", patch(v4(), IP_OFF, b"\x40"), R.DROP_BAD_IHL),
    Case("ipv4_options_cut", "IHL 15 with 40 bytes of IP in the frame",
         patch(v4(), IP_OFF, b"\x4f")[:IP_OFF + 40], R.DROP_TRUNCATED),
    Case("ipv4_options_ok", "IHL 6 with a NOP-padded option",
         v4(options=[b"\x01\x01\x01\x00"]), R.PASS),
    Case("ipv4_totlen_over", "total length past the end of the frame",
         patch(v4(), IP_OFF + 2, (2000).to_bytes(2, "big")), R.DROP_BAD_LENGTH),
    Case("ipv4_totlen_under_ihl", "total length shorter than the header",
         patch(v4(), IP_OFF + 2, (16).to_bytes(2, "big")), R.DROP_BAD_LENGTH),
    Case("ipv4_eth_padding", "Ethernet padding after a short packet is fine",
         v4() + b"\x00" * 12, R.PASS),
    Case("ipv4_version_6", "IPv6 version in an IPv4 EtherType",
         patch(v4(), IP_OFF, b"\x65"), R.DROP_BAD_VERSION),
    Case("ipv4_sctp", "other protocols pass when no rule names them",
         v4(l4=Raw(b"\x00" * 16), proto=132), R.PASS),
    Case("ipv4_gre_rule", "an L4 rule on protocol alone (GRE)", v4(l4=GRE()), R.DROP_L4_RULE),
    # -- IPv4 fragments ----------------------------------------------------------------------------
    Case("frag4_first_ok", "first fragment holding the whole TCP header",
         v4(flags="MF", l4=TCP(flags="A") / Raw(b"x" * 8)), R.PASS),
    Case("frag4_first_cut", "first fragment with 8 bytes of TCP header",
         v4(flags="MF", l4=Raw(b"\x00" * 8), proto=6), R.DROP_BAD_FRAGMENT),
    Case("frag4_nonfirst", "a later fragment: no L4 header to judge",
         v4(frag=100, l4=Raw(b"x" * 24), proto=6), R.PASS_FRAGMENT),
    Case("frag4_offset1_tcp", "offset 1 exists only to rewrite TCP flags (RFC 1858)",
         v4(frag=1, l4=Raw(b"x" * 24), proto=6), R.DROP_BAD_FRAGMENT),
    Case("frag4_offset1_udp", "offset 1 is only suspicious for TCP",
         v4(frag=1, l4=Raw(b"x" * 24), proto=17), R.PASS_FRAGMENT),
    Case("frag4_nonfirst_denied", "address checks apply to every fragment",
         v4("198.51.100.7", frag=100, l4=Raw(b"x" * 24), proto=17), R.DROP_DENYLIST),
    Case("frag4_nonfirst_bogon", "bogon sources are dropped fragment or not",
         v4("10.9.9.9", frag=100, l4=Raw(b"x" * 24), proto=17), R.DROP_BOGON),
    Case("frag4_nonfirst_reflection", "no ports in a later UDP fragment: no L4 rule",
         v4(frag=100, l4=Raw(b"\x00\x7b" + b"x" * 22), proto=17), R.PASS_FRAGMENT),
    # -- IPv6 header and extensions ----------------------------------------------------------------
    Case("ipv6_cut_39", "an IPv6 header one byte short", v6()[:IP_OFF + 39], R.DROP_TRUNCATED),
    Case("ipv6_version_4", "IPv4 version in an IPv6 EtherType",
         patch(v6(), IP_OFF, b"\x40"), R.DROP_BAD_VERSION),
    Case("ipv6_payload_over", "payload length past the frame",
         patch(v6(), IP_OFF + 4, (1500).to_bytes(2, "big")), R.DROP_BAD_LENGTH),
    Case("ipv6_hbh", "hop-by-hop first, then TCP", v6(None, None, IPv6ExtHdrHopByHop()), R.PASS),
    Case("ipv6_chain_6", "six extension headers: exactly the bound",
         v6(None, None, IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(),
            IPv6ExtHdrDestOpt(), AH(nh=44, payloadlen=1), IPv6ExtHdrFragment(m=1)), R.PASS),
    Case("ipv6_chain_7", "seven extension headers exceed PE_IPV6_EXT_MAX",
         v6(None, None, IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(),
            IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt(),
            IPv6ExtHdrDestOpt()), R.DROP_EXTHDR_DEPTH),
    Case("ipv6_hbh_second", "hop-by-hop must come first (RFC 8200)",
         v6(None, None, IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop()), R.DROP_BAD_EXTHDR),
    Case("ipv6_ext_cut", "destination options cut after 4 bytes",
         patch(v6(None, Raw(b""), IPv6ExtHdrDestOpt(nh=59)), IP_OFF + 4, b"\x00\x04")[:IP_OFF + 44],
         R.DROP_TRUNCATED),
    Case("ipv6_ext_over_payload", "an extension longer than the payload length",
         patch(v6(None, None, IPv6ExtHdrDestOpt(len=4)), IP_OFF + 4, (16).to_bytes(2, "big")),
         R.DROP_BAD_LENGTH),
    Case("ipv6_ah_tcp", "authentication header, then TCP",
         v6(None, None, AH(nh=6, payloadlen=1)), R.PASS),
    Case("ipv6_no_next", "next header 59: nothing follows",
         v6(None, Raw(b""), IPv6ExtHdrDestOpt(nh=59)), R.PASS),
    Case("ipv6_frag_first_udp", "first fragment with the UDP header",
         v6(None, UDP(sport=4000, dport=53), IPv6ExtHdrFragment(m=1)), R.PASS),
    Case("ipv6_frag_first_cut", "first fragment with 4 bytes of UDP header",
         v6(None, Raw(b"\x0f\xa0\x00\x35"), IPv6ExtHdrFragment(m=1, nh=17)),
         R.DROP_BAD_FRAGMENT),
    Case("ipv6_frag_nonfirst", "a later IPv6 fragment",
         v6(None, Raw(b"x" * 16), IPv6ExtHdrFragment(offset=10, nh=17)), R.PASS_FRAGMENT),
    Case("ipv6_frag_nonfirst_denied", "address checks apply to later fragments",
         v6("2001:db8:bad::9", Raw(b"x" * 16), IPv6ExtHdrFragment(offset=10, nh=17)),
         R.DROP_DENYLIST),
    # -- L4 headers --------------------------------------------------------------------------------
    Case("tcp_cut", "TCP header of 10 bytes", v4(l4=Raw(b"\x00" * 10), proto=6),
         R.DROP_TRUNCATED),
    Case("tcp_doff_4", "TCP data offset under 5",
         patch(v4(l4=TCP(flags="A")), IP_OFF + 20 + 12, b"\x40"), R.DROP_BAD_L4),
    Case("tcp_doff_past_payload", "TCP data offset 60 with 20 bytes of payload",
         patch(v4(l4=TCP(flags="A")), IP_OFF + 20 + 12, b"\xf0"), R.DROP_TRUNCATED),
    Case("tcp_options", "TCP with MSS and window scale options",
         v4(l4=TCP(flags="S", options=[("MSS", 1460), ("WScale", 7), ("NOP", None)])), R.PASS),
    Case("udp_cut", "UDP header of 4 bytes", v4(l4=Raw(b"\x00" * 4), proto=17),
         R.DROP_TRUNCATED),
    Case("udp_len_7", "UDP length under 8",
         patch(v4(l4=UDP(sport=4000, dport=53)), IP_OFF + 20 + 4, b"\x00\x07"), R.DROP_BAD_L4),
    Case("udp_len_over", "UDP length past the IP payload",
         patch(v4(l4=UDP(sport=4000, dport=53)), IP_OFF + 20 + 4, b"\x01\x00"), R.DROP_BAD_L4),
    Case("udp_len_short_ok", "UDP length under the IP payload is allowed",
         patch(v4(l4=UDP(sport=4000, dport=53) / Raw(b"x" * 10)), IP_OFF + 20 + 4, b"\x00\x08"),
         R.PASS),
    Case("icmp_echo", "ICMP echo request", v4(l4=ICMP()), R.PASS),
    Case("icmp_cut", "ICMP header of 4 bytes", v4(l4=Raw(b"\x08\x00\x00\x00"), proto=1),
         R.DROP_TRUNCATED),
    Case("icmpv6_echo", "ICMPv6 echo request", v6(None, ICMPv6EchoRequest()), R.PASS),
    Case("icmpv6_cut", "ICMPv6 header of 4 bytes",
         patch(v6(None, Raw(b"\x80\x00\x00\x00")), IP_OFF + 6, b"\x3a"), R.DROP_TRUNCATED),
    # -- denylist ----------------------------------------------------------------------------------
    Case("deny_v4_exact", "a /32 in the exact table", v4("198.51.100.7"), R.DROP_DENYLIST),
    Case("deny_v4_exact_neighbor", "the next address is not denied", v4("198.51.100.8"),
         R.PASS),
    Case("deny_v4_cover_24", "a /24 judged by the summary alone", v4("203.0.113.77"),
         R.DROP_DENYLIST),
    Case("deny_v4_cover_16", "a /16 spread over 256 summary entries", v4("100.70.200.1"),
         R.DROP_DENYLIST),
    Case("deny_v4_cover_edge", "first address after the /16", v4("100.71.0.0"), R.PASS),
    Case("deny_v4_lpm_28", "a /28 in the trie", v4("198.51.100.30"), R.DROP_DENYLIST),
    Case("deny_v4_lpm_28_out", "just outside the /28", v4("198.51.100.32"), R.PASS),
    Case("deny_v4_expiring", "an entry with a future expiry", v4("198.51.100.99"),
         R.DROP_DENYLIST),
    Case("deny_v4_expired", "an entry past its expiry", v4("198.51.100.98"), R.PASS),
    Case("deny_v4_allowed_half", "allowlisted /25 inside a denied /24", v4("192.0.2.200"),
         R.PASS_ALLOW),
    Case("deny_v4_other_half", "the other half of that /24 stays denied", v4("192.0.2.5"),
         R.DROP_DENYLIST),
    Case("deny_v4_exact_allowlisted", "a denied /32 inside an allowlisted /28",
         v4("198.51.100.243"), R.PASS_ALLOW),
    Case("deny_v4_exact_h2", "a /32 that overflowed into its second bucket", v4(OVERFLOWED),
         R.DROP_DENYLIST),
    Case("deny_v4_exact_spilled", "a /32 whose both buckets were full, in the trie",
         v4(SPILLED), R.DROP_DENYLIST),
    Case("deny_v4_exact_primary", "a /32 in a full first bucket", v4(PRIMARY), R.DROP_DENYLIST),
    Case("deny_v4_exact_full_miss", "not listed, first bucket full: both buckets miss",
         v4(FULL_MISS), R.PASS),
    Case("deny_v6_prefix", "an IPv6 /48", v6("2001:db8:bad:ff::1"), R.DROP_DENYLIST),
    Case("deny_v6_host", "an IPv6 /128", v6("2001:db8:dead::1"), R.DROP_DENYLIST),
    Case("deny_v6_neighbor", "next to the /128", v6("2001:db8:dead::2"), R.PASS),
    Case("deny_v6_allowed", "allowlisted /64 inside a denied /48", v6("2001:db8:bad:1::7"),
         R.PASS_ALLOW),
    Case("deny_v6_expiring", "an IPv6 entry with a future expiry", v6("2001:db8:beef::3"),
         R.DROP_DENYLIST),
    Case("deny_v6_expired", "an IPv6 entry past its expiry", v6("2001:db8:cafe::3"), R.PASS),
    Case("deny_v6_udp", "denylist before L4 rules", v6("2001:db8:bad::1", UDP(sport=123)),
         R.DROP_DENYLIST),
    # -- bogons ------------------------------------------------------------------------------------
    Case("bogon_v4_private", "RFC 1918 source on a public interface", v4("10.9.9.9"),
         R.DROP_BOGON),
    Case("bogon_v4_multicast", "a multicast source address", v4("224.0.0.5"), R.DROP_BOGON),
    Case("bogon_v4_loopback", "a loopback source", v4("127.0.0.1"), R.DROP_BOGON),
    Case("bogon_v4_allowed", "the operator allowlisted part of 10/8", v4("10.1.1.1"),
         R.PASS_ALLOW),
    Case("bogon_v6_linklocal", "a link-local IPv6 source", v6("fe80::1"), R.DROP_BOGON),
    Case("bogon_v6_multicast", "a multicast IPv6 source", v6("ff02::1"), R.DROP_BOGON),
    Case("nd_neighbour_solicit", "neighbour discovery from a link-local address, hop limit "
         "255: on-link by RFC 4861, never a bogon",
         b(E / IPv6(src="fe80::1", dst="ff02::1:ff00:1", hlim=255, nh=58) / NS_BODY),
         R.PASS),
    Case("nd_router_advert", "a router advertisement from a link-local address",
         b(E / IPv6(src="fe80::1", dst="ff02::1", hlim=255, nh=58) / Raw(b"\x86\x00" + bytes(14))),
         R.PASS),
    Case("nd_routed_from", "the same ICMPv6 type with hop limit 64 came through a router",
         b(E / IPv6(src="fe80::1", dst="ff02::1:ff00:1", hlim=64, nh=58) / NS_BODY),
         R.DROP_BOGON),
    Case("nd_echo_not_nd", "an echo request from link-local is no discovery",
         b(E / IPv6(src="fe80::1", dst=DST6, hlim=255) / ICMPv6EchoRequest()), R.DROP_BOGON),
    Case("backbone_private_ok", "no bogon check on a backbone interface", v4("10.9.9.9"),
         R.PASS, rules="backbone"),
    Case("backbone_v6_ok", "nor for IPv6", v6("fe80::1"), R.PASS, rules="backbone"),
    Case("backbone_still_denies", "the denylist holds on the backbone too",
         v4("198.51.100.7"), R.DROP_DENYLIST, rules="backbone"),
    # -- L4 rules ----------------------------------------------------------------------------------
    Case("l4_ntp_reflection", "UDP from port 123 to a client port",
         v4(l4=UDP(sport=123, dport=40000)), R.DROP_L4_RULE),
    Case("l4_ntp_symmetric", "NTP server to server, 123 to 123",
         v4(l4=UDP(sport=123, dport=123)), R.PASS),
    Case("l4_memcached", "UDP from memcached's port", v4(l4=UDP(sport=11211, dport=80)),
         R.DROP_L4_RULE),
    Case("l4_ssdp", "UDP from SSDP", v4(l4=UDP(sport=1900, dport=443)), R.DROP_L4_RULE),
    Case("l4_chargen_v6", "reflection rules hold for IPv6",
         v6(None, UDP(sport=19, dport=5000)), R.DROP_L4_RULE),
    Case("l4_udp_ok", "a DNS query", v4(l4=UDP(sport=40000, dport=53)), R.PASS),
    Case("l4_tcp_from_123", "TCP from port 123 is not the UDP rule", v4(l4=TCP(sport=123)),
         R.PASS),
    Case("l4_telnet", "a TCP destination-port rule", v4(l4=TCP(dport=23)), R.DROP_L4_RULE),
    Case("l4_allowlisted", "the allowlist overrides L4 rules",
         v4("198.51.100.241", l4=UDP(sport=123, dport=40000)), R.PASS_ALLOW),
    # -- rate limits (burst 3 SYN, 5 UDP, 1 per second) --------------------------------------------
    Case("rate_syn", "the 4th and later SYNs in one burst are dropped",
         v4("198.51.100.50", l4=TCP(flags="S")), R.DROP_RATE_SYN, rules="rate", count=7,
         counts={R.PASS: 3, R.DROP_RATE_SYN: 4}),
    Case("rate_synack_free", "SYN-ACKs are not SYNs", v4("198.51.100.51", l4=TCP(flags="SA")),
         R.PASS, rules="rate", count=7),
    Case("rate_udp", "the 6th and later datagrams are dropped",
         v4("198.51.100.52", l4=UDP(sport=4000, dport=53)), R.DROP_RATE_UDP, rules="rate",
         count=8, counts={R.PASS: 5, R.DROP_RATE_UDP: 3}),
    Case("rate_syn_v6", "IPv6 sources are limited per /64",
         v6("2001:db8:1::53", TCP(flags="S")), R.DROP_RATE_SYN, rules="rate", count=5,
         counts={R.PASS: 3, R.DROP_RATE_SYN: 2}),
    Case("rate_allowlisted", "the allowlist overrides rate limits",
         v4("198.51.100.242", l4=TCP(flags="S")), R.PASS_ALLOW, rules="rate", count=5,
         counts={R.PASS: 3, R.PASS_ALLOW: 2}),
    Case("rate_udp_fragment", "later UDP fragments count against the UDP limit",
         v4("198.51.100.54", frag=100, l4=Raw(b"x" * 24), proto=17), R.DROP_RATE_UDP,
         rules="rate", count=7, counts={R.PASS_FRAGMENT: 5, R.DROP_RATE_UDP: 2}),
]



# -- running the table -----------------------------------------------------------------------

_current: dict[str, str | None] = {"rules": None}


def _use(edge, name: str) -> None:
    if _current["rules"] != name:
        edge.apply(RULE_SETS[name](edge.base_rules()))
        _current["rules"] = name
    edge.clear_rate_state()


def _reason_seen(deltas: dict[Reason, int]) -> str:
    return ", ".join(f"{r.name} x{n}" for r, n in deltas.items()) or "no counter"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case(edge, case: Case) -> None:
    _use(edge, case.rules)
    frame = case.frame() if callable(case.frame) else case.frame
    before = edge.counters()
    runs = [edge.run(frame) for _ in range(case.count)]
    after = edge.counters()
    deltas = {Reason(i): after[i][0] - before[i][0] for i in range(len(Reason))
              if after[i][0] != before[i][0]}
    want = case.counts or {case.reason: case.count}
    assert deltas == want, f"{case.name}: expected {_reason_seen(want)} got {_reason_seen(deltas)}"
    for i in range(len(before)):
        r = Reason(i) if i < len(Reason) else None
        assert after[i][1] - before[i][1] == want.get(r, 0) * len(frame), \
            f"{case.name}: bytes counted under {r} are off"
    last = runs[-1]
    expect = XdpAction.DROP if case.reason.verdict == "DROP" else XdpAction.PASS
    assert last.verdict == expect, \
        f"{case.name}: expected {case.reason.name} got verdict {last.verdict}"
    if expect == XdpAction.PASS:
        assert last.data == frame, f"{case.name}: a passed frame was modified"


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)
    covered = {c.reason for c in CASES} | {r for c in CASES for r in (c.counts or {})}
    never = {R.PASS_NO_RULES, R.PASS_NO_PROGRAM}  # tested in test_lifecycle
    # Steering's reasons have their own table (test_steering.py).
    filtering = {r for r in Reason if r <= R.DROP_RATE_UDP}
    assert filtering - never <= covered, f"no case for {filtering - never - covered}"


def test_standard_table_shape(edge) -> None:
    """The crafted overflow addresses assume a 64-bucket exact table."""
    from agent.compile import compile_rules

    c = compile_rules(RULE_SETS["standard"](edge.base_rules()), 1)
    assert c.exact_shift == EXACT_SHIFT
    assert c.counts["deny4_spill"] == 1
