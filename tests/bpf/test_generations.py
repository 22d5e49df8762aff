"""Atomic generations: a swap of 1M-prefix rule sets is never seen half done.

A prober thread runs four frames through the program, over and over,
while the main thread swaps rule set A for B and back:

  p_flip   A passes it, B denies it: shows when the swap happened
  p_cover  A denies its /24 in the summary, B denies it as an exact /32; B's
           summary with A's exact table lets it pass
  p_exact  the other way round: A's summary with B's exact table passes it
  p_l4     A denies the source, B lets it through to an L4 rule that drops
           it; B's denylist with A's L4 rules lets it pass

Both sets drop the last three, so any mix shows as a PASS. A negative control
installs B kind by kind into the live slot (what the agent never does) and
must be caught, which proves the probes can see a mix.
"""

from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from agent import libbpf as lb
from agent.compile import compile_rules
from agent.config import L4Rule
from agent.generation import KINDS, build_inner, close_all
from agent.libbpf import XdpAction
from agent.prefixes import V4_DTYPE, PrefixTables, v4_text

N = 1_000_000
# 10.99.10.5, 11.99.11.5, 12.99.12.5, 13.99.13.5
FLIP, COVER, EXACT, L4SRC = 0x0A630A05, 0x0B630B05, 0x0D630D05, 0x0C630C05


def _frame(src: int, l4) -> bytes:
    return raw(Ether() / IP(src=v4_text(src), dst="198.18.0.1") / l4)


PROBES = {
    "p_flip": _frame(FLIP, TCP(flags="A")),
    "p_cover": _frame(COVER, TCP(flags="A")),
    "p_exact": _frame(EXACT, TCP(flags="A")),
    "p_l4": _frame(L4SRC, UDP(sport=123, dport=40000)),
}


def _table(addrs: np.ndarray, plens: np.ndarray) -> PrefixTables:
    t = np.zeros(len(addrs), V4_DTYPE)
    t["addr"], t["plen"] = addrs, plens
    return PrefixTables(t, np.zeros(0, PrefixTables.empty().v6.dtype))


def _big_set(seed: int, n_exact: int) -> tuple[np.ndarray, np.ndarray]:
    """n_exact random /32s and /24s filling the rest up to N, away from the probes."""
    rng = np.random.default_rng(seed)
    addrs = rng.integers(0x2000_0000, 0xDF00_0000, N, dtype=np.uint64).astype(np.uint32)
    plens = np.full(N, 32, np.uint8)
    plens[n_exact:] = 24
    addrs[n_exact:] &= np.uint32(0xFFFFFF00)
    return addrs, plens


@pytest.fixture(scope="module")
def sets(big_edge):
    base = big_edge.base_rules().replace(public=False, allow=PrefixTables.empty())
    a_addr, a_plen = _big_set(1, 900_000)
    b_addr, b_plen = _big_set(2, 300_000)
    a_addr[:4], a_plen[:4] = [COVER & ~0xFF, EXACT, L4SRC, EXACT], [24, 32, 32, 32]
    b_addr[:4], b_plen[:4] = [COVER, EXACT & ~0xFF, FLIP, FLIP], [32, 24, 32, 32]
    pass_123 = L4Rule(name="ntp-any", proto="udp", sport=("123",), action="pass")
    drop_123 = L4Rule(name="ntp-drop", proto="udp", sport=("123",), action="drop")
    a = base.replace(deny={"config": _table(a_addr, a_plen)}, l4_rules=(pass_123,))
    b = base.replace(deny={"config": _table(b_addr, b_plen)}, l4_rules=(drop_123,))
    return a, b


class Prober(threading.Thread):
    def __init__(self, edge) -> None:
        super().__init__(daemon=True)
        self.edge, self.stop = edge, threading.Event()
        self.seen: dict[str, list[int]] = {k: [] for k in PROBES}

    def run(self) -> None:
        deadline = time.monotonic() + 60  # bounded even if the test hangs
        while not self.stop.is_set() and time.monotonic() < deadline:
            for name, frame in PROBES.items():
                self.seen[name].append(self.edge.run(frame).verdict)

    def __enter__(self) -> Prober:
        self.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.05)
        self.stop.set()
        self.join()


def _mixes(p: Prober) -> int:
    return sum(v == XdpAction.PASS for k in ("p_cover", "p_exact", "p_l4") for v in p.seen[k])


def test_swap_is_atomic(big_edge, sets) -> None:
    edge = big_edge
    a, b = sets
    edge.apply(a)
    for new, flip_verdict in ((b, XdpAction.DROP), (a, XdpAction.PASS)):
        with Prober(edge) as p:
            edge.apply(new)
        flips = p.seen["p_flip"]
        assert _mixes(p) == 0, f"{_mixes(p)} probe runs saw a mix of two generations"
        assert set(flips) == {XdpAction.PASS, XdpAction.DROP}, "the prober missed the swap"
        # One switch, never back: the old slot is gone once the new one is live.
        first_new = flips.index(flip_verdict)
        assert all(v == flip_verdict for v in flips[first_new:])
        assert len(flips) > 100


def test_negative_control_catches_a_kind_by_kind_install(big_edge, sets) -> None:
    """Installing B map by map into the live slot must be caught by the probes."""
    edge = big_edge
    a, b = sets
    edge.apply(a)
    node = edge.node
    fresh = build_inner(compile_rules(b, node.active().generation + 1), b.capacity)
    try:
        live = node.active().slot
        with Prober(edge) as p:
            for kind in KINDS:  # deliberately wrong: live maps replaced one by one
                lb.map_update(node.fd(kind), ctypes.c_uint32(live),
                              ctypes.c_uint32(fresh[kind]))
                time.sleep(0.02)
        assert _mixes(p) > 0, "the probes cannot see a mixed generation"
    finally:
        close_all(fresh)
        edge.apply(a)
