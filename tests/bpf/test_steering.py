"""Regional Services steering in the real edge program (BPF_PROG_TEST_RUN).

Two nodes like two DCs' links: `iad` (region us, an internet link that
steers) and `dus` (region eu, a backbone link that decapsulates). The
frames run inside a namespace of the test's own with a backbone link, so
bpf_fib_lookup() finds routes and neighbours there:

    bb0 198.18.0.3/24, MTU 1600     neighbours .1 (dus) .2 (fra) .8 (tiny)
                                    route to .8 with MTU 1000; .9 (lost) has
                                    no neighbour entry

Each case checks the verdict, the counters (zeros included) and, for a
tunnelled packet, every byte of the output: outer header fields and
checksum, and the inner packet unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw, raw

from agent import abi
from agent.abi import Reason
from agent.config import Capacity, NodeConfig, Steering
from agent.flowhash import flow_hash
from agent.libbpf import XdpAction
from agent.rules import ruleset_from_config
from agent.steering import region_tables
from lab import fibrig, netns
from lab.netns import inside_netns
from tests.harness import EdgeUnderTest

R = Reason
SLOTS = 251
NS = f"pe{os.getpid()}st"
CLIENT_MAC, EDGE_MAC = "02:00:00:00:01:01", "02:00:00:00:01:02"
NEIGH = fibrig.NEIGHBOURS
CLIENT4, CLIENT6 = "203.0.113.10", "2001:db8:113::10"
DENIED4 = "203.0.113.66"
EU4, EU6 = "198.51.100.65", "2001:db8:100::65"
US4, SHARED4, NODC4, TINY4, LOST4 = ("198.51.100.80", "198.51.100.10", "198.51.100.70",
                                     "198.51.100.90", "198.51.100.91")

DCS = [
    {"name": "dus", "region": "eu", "backbone": "198.18.0.1"},
    {"name": "fra", "region": "eu", "backbone": "198.18.0.2"},
    {"name": "iad", "region": "us", "backbone": "198.18.0.3"},
    {"name": "tiny", "region": "small", "backbone": "198.18.0.8"},
    {"name": "lost", "region": "dark", "backbone": "198.18.0.9"},
    {"name": "syd", "region": "ap", "backbone": "198.18.0.7", "enabled": False},
]
SERVICES = [
    {"address": EU4, "region": "eu", "zone": "shop-eu"},
    {"address": EU6, "region": "eu", "zone": "shop-eu"},
    {"address": US4, "region": "us"},
    {"address": NODC4, "region": "ap"},
    {"address": TINY4, "region": "small"},
    {"address": LOST4, "region": "dark"},
]


def steering(dc: str, dcs: list[dict] | None = None) -> Steering:
    me = next(d for d in DCS if d["name"] == dc)
    return Steering(dc=dc, region=me["region"], backbone_interface="bb0",
                    backbone_address=me["backbone"], dcs=dcs or DCS, services=SERVICES)


@dataclass
class Rig:
    iad: EdgeUnderTest
    dus: EdgeUnderTest
    bb_mac: str
    ifindex: int
    dcs: list[dict] = field(default_factory=lambda: DCS)

    def rules(self, dc: str, role: str, dcs: list[dict] | None = None):
        link = "bb0" if role == "backbone" else "tr0"  # the backbone link is bb0
        cfg = NodeConfig(interface=link, role=role, capacity=Capacity(maglev_slots=SLOTS),
                         bogons=(), deny={"prefixes": [f"{DENIED4}/32"]},
                         steering=steering(dc, dcs))
        return ruleset_from_config(cfg, backbone_ifindex=self.ifindex)

    def choose(self, src: str, dst: str, proto: int, sport: int = 0, dport: int = 0,
               fragment: bool = False, dcs: list[dict] | None = None) -> str:
        """The backbone address the kernel should pick for a flow to the EU."""
        tables = region_tables(steering("iad", dcs), SLOTS)
        n = tables["eu"][flow_hash(src, dst, proto, sport, dport, fragment) % SLOTS]
        return DCS[n]["backbone"]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    try:
        bb_mac, idx = fibrig.create(NS)
        cap = Capacity(maglev_slots=SLOTS)
        iad, dus = EdgeUnderTest("steer-iad", cap), EdgeUnderTest("steer-dus", cap)
        try:
            r = Rig(iad, dus, bb_mac, idx)
            iad.apply(r.rules("iad", "public"))
            dus.apply(r.rules("dus", "backbone"))
            with inside_netns(NS):
                yield r
        finally:
            iad.close()
            dus.close()
    finally:
        netns.delete(NS)


def run(edge: EdgeUnderTest, frame: bytes, count: int = 1):
    before = edge.counters()
    runs = [edge.run(frame) for _ in range(count)]
    after = edge.counters()
    deltas = {Reason(i): after[i][0] - before[i][0] for i in range(len(Reason))
              if after[i][0] != before[i][0]}
    return runs[-1], deltas


def eth(vlan: int | None = None):
    e = Ether(src=CLIENT_MAC, dst=EDGE_MAC)
    return e / Dot1Q(vlan=vlan) if vlan else e


def tunnelled(rig: Rig, inner, to: str) -> bytes:
    """What iad must send: Ethernet to the next hop, outer IPv4, inner unchanged."""
    inner_raw = raw(inner)
    proto = 4 if inner_raw[0] >> 4 == 4 else 41
    tos = inner_raw[1] if proto == 4 else ((inner_raw[0] & 0xF) << 4) | (inner_raw[1] >> 4)
    outer = IP(src="198.18.0.3", dst=to, proto=proto, ttl=64, id=0, flags="DF", tos=tos)
    return raw(Ether(src=rig.bb_mac, dst=NEIGH[to], type=0x0800) / outer / Raw(inner_raw))


# -- steering: the internet link of a DC outside the region --------------------------------


@dataclass(frozen=True)
class SteerCase:
    name: str
    why: str
    inner: object                   # the IP packet the client sent
    vlan: int | None = None
    reason: Reason = R.REDIRECT_STEER


def _tcp4(dst: str = EU4, src: str = CLIENT4, **kw):
    return IP(src=src, dst=dst, **kw) / TCP(sport=40000, dport=443, flags="S")


STEER_CASES = [
    SteerCase("steer_v4_syn", "a TLS SYN to the EU zone's IP, from the US", _tcp4()),
    SteerCase("steer_v4_data", "payload goes the same way, TOS kept in the outer header",
              IP(src=CLIENT4, dst=EU4, tos=0x28) / TCP(sport=40000, dport=443, flags="PA") /
              Raw(b"\x17\x03\x03" + b"x" * 100)),
    SteerCase("steer_v4_udp", "QUIC-like UDP to the regional IP",
              IP(src=CLIENT4, dst=EU4) / UDP(sport=5000, dport=443) / Raw(b"q" * 40)),
    SteerCase("steer_v4_icmp", "ping to the regional IP: hashed without ports",
              IP(src=CLIENT4, dst=EU4) / ICMP()),
    SteerCase("steer_v4_first_fragment", "first fragment: hashed without ports",
              IP(src=CLIENT4, dst=EU4, flags="MF", id=7) / UDP(sport=5000, dport=443) /
              Raw(b"f" * 64)),
    SteerCase("steer_v4_later_fragment", "later fragment: same DC as the first",
              IP(src=CLIENT4, dst=EU4, frag=9, id=7, proto=17) / Raw(b"g" * 64)),
    SteerCase("steer_v6_syn", "IPv6 inner packet, carried in 6in4",
              IPv6(src=CLIENT6, dst=EU6, tc=0x20) / TCP(sport=40001, dport=443, flags="S")),
    SteerCase("steer_vlan", "a VLAN tag is not carried over the backbone", _tcp4(), vlan=7),
    SteerCase("steer_tiny_dc", "fits the 1000-byte route to tiny",
              IP(src=CLIENT4, dst=TINY4) / UDP(sport=1, dport=443) / Raw(b"s" * 100)),
]


def _flow(inner) -> tuple[str, str, int, int, int, bool]:
    ip = inner[IP] if IP in inner else inner[IPv6]
    proto = ip.proto if IP in inner else ip.nh
    frag = IP in inner and (ip.flags.MF or ip.frag > 0)
    l4 = inner.getlayer(TCP) or inner.getlayer(UDP)
    ports = (l4.sport, l4.dport) if l4 is not None and not (IP in inner and ip.frag) else (0, 0)
    return ip.src, ip.dst, proto, *ports, bool(frag)


@pytest.mark.parametrize("case", STEER_CASES, ids=lambda c: c.name)
def test_steer(rig: Rig, case: SteerCase) -> None:
    frame = raw(eth(case.vlan) / case.inner)
    src, dst, proto, sport, dport, frag = _flow(case.inner)
    to = "198.18.0.8" if dst == TINY4 else rig.choose(src, dst, proto, sport, dport, frag)
    steered_before = rig.iad.node.counters("steered")
    out, deltas = run(rig.iad, frame)
    assert deltas == {case.reason: 1}, f"{case.name}: {deltas}"
    assert out.verdict == XdpAction.REDIRECT, case.name
    want = tunnelled(rig, case.inner, to)
    assert out.data == want, f"{case.name}:\n got  {Ether(out.data)!r}\n want {Ether(want)!r}"
    # The checksum scapy computed for `want` is the one a receiver verifies.
    assert IP(out.data[14:34]).chksum == IP(raw(IP(out.data[14:34]))).chksum
    n = next(i for i, d in enumerate(DCS) if d["backbone"] == to)
    after = rig.iad.node.counters("steered")
    assert after[n].packets - steered_before[n].packets == 1


@dataclass(frozen=True)
class KeepCase:
    name: str
    why: str
    inner: object
    reason: Reason


KEEP_CASES = [
    KeepCase("deny_before_steer", "a denylisted source aimed at the regional IP is dropped "
             "in the first DC", _tcp4(src=DENIED4), R.DROP_DENYLIST),
    KeepCase("in_region_served_here", "a us zone's IP in a us DC: to the stack",
             _tcp4(dst=US4), R.PASS_IN_REGION),
    KeepCase("shared_ip_not_steered", "the shared anycast IP is served everywhere",
             _tcp4(dst=SHARED4), R.PASS),
    KeepCase("region_without_dc", "the region's only DC is drained: dropped, not served here",
             _tcp4(dst=NODC4), R.DROP_NO_REGION_DC),
    KeepCase("no_neighbour", "the in-region DC has no neighbour entry",
             _tcp4(dst=LOST4), R.DROP_STEER_FAIL),
    KeepCase("too_big_for_backbone", "1200 bytes plus 20 exceed the 1000-byte route",
             IP(src=CLIENT4, dst=TINY4) / UDP(sport=1, dport=443) / Raw(b"b" * 1172),
             R.DROP_TOO_BIG),
    KeepCase("tunnel_on_internet_link", "IPIP to iad's backbone address on the internet "
             "link is not opened there", IP(src=CLIENT4, dst="198.18.0.3") / _tcp4(),
             R.PASS),
]


@pytest.mark.parametrize("case", KEEP_CASES, ids=lambda c: c.name)
def test_not_steered(rig: Rig, case: KeepCase) -> None:
    frame = raw(eth() / case.inner)
    out, deltas = run(rig.iad, frame)
    assert deltas == {case.reason: 1}, f"{case.name}: {deltas}"
    want = XdpAction.DROP if case.reason.verdict == "DROP" else XdpAction.PASS
    assert out.verdict == want, case.name
    if want == XdpAction.PASS:
        assert out.data == frame, f"{case.name}: a passed frame was modified"


# -- decapsulation: the backbone link of the in-region DC ------------------------------------


def _to_dus(inner, outer_dst: str = "198.18.0.1") -> bytes:
    proto = 4 if raw(inner)[0] >> 4 == 4 else 41
    return raw(Ether(src="02:00:00:00:bb:03", dst="02:00:00:00:bb:01") /
               IP(src="198.18.0.3", dst=outer_dst, proto=proto, flags="DF") / inner)


@pytest.mark.parametrize("inner", [
    pytest.param(_tcp4(), id="v4"),
    pytest.param(IPv6(src=CLIENT6, dst=EU6) / TCP(sport=1, dport=443, flags="S"), id="v6"),
    pytest.param(IP(src=CLIENT4, dst=EU4) / ICMP(), id="icmp"),
])
def test_decap(rig: Rig, inner) -> None:
    out, deltas = run(rig.dus, _to_dus(inner))
    assert deltas == {R.PASS_DECAP: 1}
    assert out.verdict == XdpAction.PASS
    ethertype = 0x0800 if IP in inner and inner.version == 4 else 0x86DD
    want = raw(Ether(src="02:00:00:00:bb:03", dst="02:00:00:00:bb:01", type=ethertype) / inner)
    assert out.data == want, f"got {Ether(out.data)!r}"


def test_steer_strips_two_vlan_tags(rig: Rig) -> None:
    """QinQ in front of the packet: the tunnel header takes their place."""
    from scapy.layers.l2 import Dot1AD

    inner = _tcp4()
    frame = raw(Ether(src=CLIENT_MAC, dst=EDGE_MAC) / Dot1AD(vlan=5) / Dot1Q(vlan=7) / inner)
    out, deltas = run(rig.iad, frame)
    assert deltas == {R.REDIRECT_STEER: 1} and out.verdict == XdpAction.REDIRECT
    assert out.data == tunnelled(rig, inner, rig.choose(CLIENT4, EU4, 6, 40000, 443))


@pytest.mark.parametrize("outer", [
    pytest.param(lambda inner: Ether(src="02:00:00:00:bb:03", dst="02:00:00:00:bb:01") /
                 Dot1Q(vlan=9) / IP(src="198.18.0.3", dst="198.18.0.1", proto=4) / inner,
                 id="outer_vlan"),
    pytest.param(lambda inner: Ether(src="02:00:00:00:bb:03", dst="02:00:00:00:bb:01") /
                 IP(src="198.18.0.3", dst="198.18.0.1", proto=4,
                    options=[IPOption_NOP()] * 8) / inner,
                 id="outer_ip_options"),
])
def test_decap_strips_whatever_precedes_the_inner_packet(rig: Rig, outer) -> None:
    inner = _tcp4()
    out, deltas = run(rig.dus, raw(outer(inner)))
    assert deltas == {R.PASS_DECAP: 1}
    want = raw(Ether(src="02:00:00:00:bb:03", dst="02:00:00:00:bb:01", type=0x0800) / inner)
    assert out.data == want, f"got {Ether(out.data)!r}"


def test_steer_then_decap_restores_the_packet(rig: Rig) -> None:
    """iad's output, received by dus, is the client's packet again."""
    sport = next(p for p in range(40100, 40200) if rig.choose(CLIENT4, EU4, 6, p, 443)
                 == "198.18.0.1")
    inner = IP(src=CLIENT4, dst=EU4) / TCP(sport=sport, dport=443, flags="PA") / Raw(b"z" * 50)
    steered = rig.iad.run(raw(eth() / inner))
    assert steered.verdict == XdpAction.REDIRECT
    out, deltas = run(rig.dus, steered.data)
    assert deltas == {R.PASS_DECAP: 1}
    assert out.data[14:] == raw(inner)


@pytest.mark.parametrize("frame,reason", [
    pytest.param(_to_dus(IP(src="198.18.0.2", dst="198.18.0.1", proto=4) / _tcp4()),
                 R.DROP_BAD_TUNNEL, id="tunnel_in_tunnel"),
    pytest.param(_to_dus(_tcp4(src=DENIED4)), R.DROP_DENYLIST, id="inner_source_denied"),
    pytest.param(_to_dus(_tcp4())[:14 + 20 + 10], R.DROP_BAD_LENGTH, id="outer_cut_short"),
    pytest.param(_to_dus(_tcp4(), outer_dst="198.18.0.2"), R.PASS, id="not_for_this_dc"),
    pytest.param(_to_dus(_tcp4(dst="203.0.113.99")), R.DROP_TUNNEL_DEST,
                 id="inner_not_a_service: no relaying through a DC"),
    pytest.param(_to_dus(_tcp4(dst=US4)), R.DROP_TUNNEL_DEST,
                 id="inner_for_another_region"),
])
def test_decap_refuses(rig: Rig, frame: bytes, reason: Reason) -> None:
    _, deltas = run(rig.dus, frame)
    assert deltas == {reason: 1}


def test_backbone_link_does_not_steer(rig: Rig) -> None:
    """dus's backbone link has no steering flag: a regional packet passes."""
    _, deltas = run(rig.dus, raw(eth() / _tcp4(dst=US4)))
    assert deltas == {R.PASS: 1}


# -- stickiness and change ------------------------------------------------------------------


def _dest(rig: Rig, sport: int) -> str:
    tcp = TCP(sport=sport, dport=443, flags="A")  # not SYN: no rate limit in the way
    out = rig.iad.run(raw(eth() / IP(src=CLIENT4, dst=EU4) / tcp))
    assert out.verdict == XdpAction.REDIRECT
    return IP(out.data[14:34]).dst


@pytest.mark.parametrize("v6", [False, True], ids=["v4_frag_needed", "v6_packet_too_big"])
def test_icmp_error_follows_the_flow_it_quotes(rig: Rig, v6: bool) -> None:
    """A router's ICMP error about a DC's reply (DSR) goes to the DC that
    holds that connection, not wherever the router's own address hashes."""
    from scapy.layers.inet6 import ICMPv6PacketTooBig

    wanted = set()
    for cport in range(41000, 41040):
        if v6:
            quoted = IPv6(src=EU6, dst=CLIENT6) / TCP(sport=443, dport=cport, flags="A")
            err = IPv6(src="2001:db8:113::fe", dst=EU6) / ICMPv6PacketTooBig(mtu=1280) / quoted
            want = rig.choose(CLIENT6, EU6, 6, cport, 443)
        else:
            quoted = IP(src=EU4, dst=CLIENT4, flags="DF") / TCP(sport=443, dport=cport, flags="A")
            err = IP(src="203.0.113.254", dst=EU4) / ICMP(type=3, code=4, nexthopmtu=1280) / \
                raw(quoted)[:28]
            want = rig.choose(CLIENT4, EU4, 6, cport, 443)
        out = rig.iad.run(raw(eth() / err))
        assert out.verdict == XdpAction.REDIRECT
        assert IP(out.data[14:34]).dst == want, f"client port {cport}"
        wanted.add(want)
    # Both EU DCs hold some of these flows: one hash of the router's address
    # (the ICMP packet's own flow) could not have sent each to its own.
    assert len(wanted) == 2


def test_icmp_error_quoting_someone_else_hashes_as_itself(rig: Rig) -> None:
    """An ICMP error quoting a packet that was not from the regional IP is
    no reply of ours: it is hashed as its own (3-tuple) flow."""
    quoted = IP(src="192.0.2.9", dst=CLIENT4) / TCP(sport=443, dport=41000, flags="A")
    err = IP(src="203.0.113.254", dst=EU4) / ICMP(type=3, code=4) / raw(quoted)[:28]
    out = rig.iad.run(raw(eth() / err))
    assert IP(out.data[14:34]).dst == rig.choose("203.0.113.254", EU4, 1)


def test_flows_stick_and_spread(rig: Rig) -> None:
    flows = range(20000, 20200)
    first = {s: _dest(rig, s) for s in flows}
    assert all(_dest(rig, s) == first[s] for s in list(flows)[::7]), "a flow changed DC"
    assert all(first[s] == rig.choose(CLIENT4, EU4, 6, s, 443) for s in flows)
    share = sum(d == "198.18.0.1" for d in first.values()) / len(first)
    assert 0.3 < share < 0.7, f"dus got {share:.0%} of flows"


def test_drain_moves_only_its_flows_and_returns_them(rig: Rig) -> None:
    flows = range(21000, 21300)
    before = {s: _dest(rig, s) for s in flows}
    drained = [dict(d, enabled=d["name"] != "fra") for d in DCS]
    gen = rig.iad.node.active().generation
    rig.iad.apply(rig.rules("iad", "public", drained))  # one generation swap
    assert rig.iad.node.active().generation == gen + 1
    try:
        during = {s: _dest(rig, s) for s in flows}
        assert set(during.values()) == {"198.18.0.1"}
        assert all(during[s] == before[s] for s in flows if before[s] == "198.18.0.1"), \
            "a flow that was on dus moved"
    finally:
        rig.iad.apply(rig.rules("iad", "public"))
    assert {s: _dest(rig, s) for s in flows} == before


def test_reasons_all_have_a_case() -> None:
    from tests.bpf.test_fixtures import CASES

    covered = ({c.reason for c in CASES} | {r for c in CASES for r in (c.counts or {})} |
               {c.reason for c in STEER_CASES} | {c.reason for c in KEEP_CASES} |
               {R.PASS_DECAP, R.DROP_BAD_TUNNEL, R.DROP_TUNNEL_DEST})
    never = {R.PASS_NO_RULES, R.PASS_NO_PROGRAM}  # tested in test_lifecycle
    assert set(Reason) - never <= covered, f"no case for {set(Reason) - never - covered}"
    assert abi.REDIRECT_REASONS_MASK == 1 << R.REDIRECT_STEER


def test_a_new_maglev_size_needs_a_rebuild_and_says_so() -> None:
    """The Maglev array's size is fixed when a node is built; asking for
    another is refused by name and changes nothing."""
    from agent.node import NodeError

    edge = EdgeUnderTest("steer-size", Capacity(maglev_slots=SLOTS))
    try:
        cfg = NodeConfig(interface="tr0", role="public", capacity=Capacity(maglev_slots=SLOTS),
                         bogons=(), steering=steering("iad"))
        edge.apply(ruleset_from_config(cfg))
        gen = edge.node.active().generation
        bigger = cfg.model_copy(update={"capacity": Capacity(maglev_slots=257)})
        with pytest.raises(NodeError, match=r"capacity\.maglev_slots 257 needs a maglev map"):
            edge.apply(ruleset_from_config(bigger))
        assert edge.node.active().generation == gen
    finally:
        edge.close()


def test_pins_of_an_older_version_are_upgraded_in_place() -> None:
    """A node pinned before steering existed (no pe_steer_v1, pe_maglev_v1,
    pe_steered_v1, ...) is adopted without a detach: the agent pins the new
    maps, swaps the new program in, and the next generation steers."""
    from agent.loader import ensure_state, upgrade_edge
    from agent.maps import OUTERS, PLAIN

    edge = EdgeUnderTest("steer-old", Capacity(maglev_slots=SLOTS))
    ns = f"pe{os.getpid()}old"
    try:
        new = [OUTERS[k].name for k in ("steer", "dcs", "svc4", "svc6", "maglev")]
        new.append(PLAIN["steered"].name)
        edge.node.close()
        for name in new:
            os.unlink(edge.node.pin_dir / name)
        said: list[str] = []
        with edge.node.lock():
            assert not ensure_state(edge.node, edge.cap, lambda _n, d: said.append(d))
            upgrade_edge(edge.node, edge.cap)
        assert any(all(n in d for n in new) for d in said), said
        _, ifindex = fibrig.create(ns)
        cfg = NodeConfig(interface="tr0", role="public", capacity=edge.cap, bogons=(),
                         steering=steering("iad"))
        edge.apply(ruleset_from_config(cfg, backbone_ifindex=ifindex))
        with inside_netns(ns):
            out = edge.run(raw(eth() / _tcp4()))
        assert out.verdict == XdpAction.REDIRECT
    finally:
        edge.close()
        netns.delete(ns)
