"""The program's life: no rules yet, no program in the slot, upgrades, adoption,
layout checks, expiry in the kernel, refused changes."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest

from agent import abi
from agent import libbpf as lb
from agent.compile import CapacityError
from agent.config import Capacity
from agent.loader import upgrade_edge
from agent.maps import PLAIN, LayoutError, check_layout
from agent.node import Node
from agent.prefixes import Prefix, PrefixTables
from tests.bpf.cases import v4
from tests.harness import EdgeUnderTest, tables

R = abi.Reason


def _delta(edge, frame: bytes) -> dict[R, int]:
    before = edge.counters()
    edge.run(frame)
    after = edge.counters()
    return {R(i): after[i][0] - before[i][0] for i in range(len(R))
            if after[i][0] != before[i][0]}


@pytest.fixture()
def fresh():
    e = EdgeUnderTest("life")
    yield e
    e.close()


def test_no_generation_yet_passes_and_counts(fresh) -> None:
    assert _delta(fresh, v4("198.51.100.7")) == {R.PASS_NO_RULES: 1}


def test_empty_program_slot_passes_and_counts(fresh) -> None:
    fresh.apply(fresh.base_rules().with_deny("adhoc", tables("198.51.100.7")))
    lb.map_delete(fresh.node.fd("progs"), ctypes.c_uint32(abi.ProgSlot.EDGE))
    assert _delta(fresh, v4("198.51.100.7")) == {R.PASS_NO_PROGRAM: 1}
    upgrade_edge(fresh.node, fresh.cap)
    assert _delta(fresh, v4("198.51.100.7")) == {R.DROP_DENYLIST: 1}


def test_upgrade_under_traffic_never_lets_a_denied_packet_through(edge) -> None:
    edge.apply(edge.base_rules().with_deny("adhoc", tables("198.51.100.7")))
    frame = v4("198.51.100.7")
    verdicts: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            verdicts.append(edge.run(frame).verdict)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    tags = {upgrade_edge(edge.node, edge.cap) for _ in range(3)}
    stop.set()
    t.join()
    assert len(tags) == 1  # the same source gives the same program
    assert len(verdicts) > 100
    assert set(verdicts) == {lb.XdpAction.DROP}


def test_adopting_the_pins_sees_the_same_state(edge) -> None:
    edge.apply(edge.base_rules().with_deny("adhoc", tables("198.51.100.7")))
    with Node("tr0", edge.bpffs, edge.run_root).open() as again:
        assert again.active().generation == edge.node.active().generation
        assert again.counters()[R.DROP_DENYLIST].packets == \
            edge.node.counters()[R.DROP_DENYLIST].packets


def test_a_pin_with_another_layout_is_refused_by_name(tmp_path) -> None:
    spec = PLAIN["active"]
    fd = lb.map_create(spec.map_type, "pe_wrong", 4, ctypes.sizeof(abi.Active) + 8, 1)
    try:
        with pytest.raises(LayoutError, match=r"value 24 bytes instead of 16 \(pe_active\)"):
            check_layout(fd, spec, "/sys/fs/bpf/x/pe_active_v1")
    finally:
        os.close(fd)


def test_expiry_is_enforced_by_the_kernel_alone(edge) -> None:
    """No agent runs here: the deadline in the trie does the work."""
    edge.apply(edge.base_rules().with_deny(
        "adhoc", tables("198.51.100.77", "2001:db8:77::/64", expires=time.time() + 1.5)))
    assert _delta(edge, v4("198.51.100.77")) == {R.DROP_DENYLIST: 1}
    time.sleep(1.7)
    assert _delta(edge, v4("198.51.100.77")) == {R.PASS: 1}


def test_a_list_over_capacity_changes_nothing(edge) -> None:
    rules = edge.base_rules().with_deny("adhoc", tables("198.51.100.7"))
    edge.apply(rules)
    gen = edge.node.active().generation
    small = rules.replace(capacity=Capacity(deny4_exact=64))
    too_many = PrefixTables.from_prefixes([Prefix(4, 0x2D000000 + i, 32) for i in range(1, 100)])
    with pytest.raises(CapacityError, match=r"100 IPv4 /32 denies exceed the capacity of 64 "
                                            r"\(capacity.deny4_exact\)"):
        edge.apply(small.with_deny("list", too_many))
    with pytest.raises(CapacityError):
        edge.change(small.with_deny("list", too_many))
    assert edge.node.active().generation == gen
    assert _delta(edge, v4("45.0.0.5")) == {R.PASS: 1}
    assert _delta(edge, v4("198.51.100.7")) == {R.DROP_DENYLIST: 1}
