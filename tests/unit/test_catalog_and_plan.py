"""The saved rule set round-trips; live exact-table plans keep the invariant."""

from __future__ import annotations

import random

import numpy as np

from agent import catalog
from agent.compile import build_exact, exact_hashes
from agent.config import NodeConfig
from agent.live import ExactPlan
from agent.prefixes import Prefix, PrefixTables
from agent.rules import ruleset_from_config


def test_catalog_round_trip(tmp_path) -> None:
    rules = ruleset_from_config(NodeConfig(interface="x", allow=["203.0.113.0/24"]))
    rules = rules.with_deny("adhoc", PrefixTables.from_prefixes(
        [Prefix(4, 0xC0000200, 24), Prefix(6, 0x20010DB8 << 96, 32)], 1234.5))
    catalog.save(tmp_path, rules)
    back = catalog.load(tmp_path)
    assert back is not None
    assert back.l4_rules == rules.l4_rules and back.limits == rules.limits
    assert back.public == rules.public and back.capacity == rules.capacity
    assert np.array_equal(back.deny["adhoc"].v4, rules.deny["adhoc"].v4)
    assert np.array_equal(back.deny["adhoc"].v6, rules.deny["adhoc"].v6)
    assert np.array_equal(back.allow.v4, rules.allow.v4)
    assert catalog.load(tmp_path / "missing") is None


def _check_invariant(t: np.ndarray, shift: int) -> None:
    b, s = np.nonzero(t)
    h1, _ = exact_hashes(t[b, s], shift)
    for bucket, home in zip(b.tolist(), h1.tolist(), strict=True):
        if bucket != home:
            assert np.all(t[home] != 0), "an address sits in h2 while its h1 has room"


def test_plan_keeps_members_and_invariant() -> None:
    rng = random.Random(2)
    pool = np.arange(1, 3000, dtype=np.uint32) * np.uint32(2654435761)
    start = np.unique(pool[:400])
    table, shift, _ = build_exact(start, 64)
    want = set(start.tolist())
    for _ in range(30):
        adds = rng.sample(pool.tolist(), 40)
        removes = rng.sample(sorted(want), min(len(want), 35))
        want = (want - set(removes)) | set(adds)
        plan = ExactPlan(table, shift)
        _, _, spill = plan(np.array(sorted(want), np.uint32))
        for bucket, slot, value in plan.writes:  # replay as the live path does
            table[bucket, slot] = value
        assert np.array_equal(table, plan.t)
        assert set(table[table != 0].tolist()) | set(spill.tolist()) == want
        _check_invariant(table, shift)


def test_next_expiry_is_the_earliest_operator_deadline(tmp_path) -> None:
    rules = ruleset_from_config(NodeConfig(interface="x"))
    catalog.save(tmp_path, rules)
    assert catalog.next_expiry(tmp_path) is None
    rules = rules.with_deny("adhoc", PrefixTables.from_prefixes([Prefix(4, 1, 32)], 500.0))
    rules = rules.with_deny("list", PrefixTables.from_prefixes(
        [Prefix(6, 1, 128), Prefix(4, 2, 32)], 300.0))
    catalog.save(tmp_path, rules)
    assert catalog.next_expiry(tmp_path) == 300.0
