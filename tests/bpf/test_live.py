"""Live changes (no swap) keep the kernel equal to the rules, step by step.

Random adds and removes of /32s that crowd a few buckets of a 64-bucket
exact table (so they overflow into second buckets and spill into the trie),
of /24 and /28 denies over them, of expiring entries and of allowlist
holes. After every step, every address of the universe is run through the
program and judged against the reference model.
"""

from __future__ import annotations

import random
import time

import numpy as np

from agent.compile import exact_hashes
from agent.prefixes import Prefix, PrefixTables, v4_text
from tests import model
from tests.bpf.cases import v4

SHIFT = 32 - 6  # fewer than 512 exact entries: 64 buckets


def _universe(rng: random.Random) -> list[int]:
    """/32s from 100.81.0.0/16 whose first bucket is one of two."""
    cand = np.arange(0x64510000, 0x64520000, dtype=np.uint32)
    h1, _ = exact_hashes(cand, SHIFT)
    crowded = rng.sample(sorted(set(h1.tolist())), 2)
    pick = cand[np.isin(h1, crowded)]
    return rng.sample(pick.tolist(), 70)


def test_random_live_changes_match_the_model(edge) -> None:
    rng = random.Random(7)
    hosts = _universe(rng)
    nets24 = sorted({h & 0xFFFFFF00 for h in hosts})
    probes = hosts + [n | 0xFE for n in nets24] + [n | 0x03 for n in nets24]
    now = time.time()
    deny: dict[Prefix, float] = {Prefix(4, h, 32): 0.0 for h in hosts[:50]}
    allow: set[Prefix] = set()
    base = edge.base_rules()

    def rules():
        return base.replace(
            deny={"adhoc": PrefixTables.from_prefixes([p for p, e in deny.items() if e == 0]),
                  "list": PrefixTables.from_prefixes([p for p, e in deny.items() if e], now + 600)},
            allow=PrefixTables.from_prefixes(sorted(allow, key=lambda p: (p.addr, p.plen))))

    edge.apply(rules())
    moved = 0
    for step in range(40):
        for _ in range(rng.randrange(1, 8)):
            roll = rng.random()
            if roll < 0.45:
                deny[Prefix(4, rng.choice(hosts), 32)] = rng.choice([0.0, 0.0, 0.0, 1.0])
            elif roll < 0.8 and deny:
                deny.pop(rng.choice(sorted(deny, key=lambda p: (p.addr, p.plen))))
            elif roll < 0.9:
                n = rng.choice(nets24)
                p = Prefix(4, n, 24) if rng.random() < 0.5 else Prefix(4, n | 0x10, 28)
                if p in deny:
                    deny.pop(p)
                else:
                    deny[p] = 0.0
            else:
                p = Prefix(4, rng.choice(hosts), 32)
                allow.symmetric_difference_update({p})
        r = rules()
        report = edge.change(r)
        moved += report["exact_moved"]
        wrong = []
        for a in probes:
            frame = v4(v4_text(a))
            before = edge.counters()
            edge.run(frame)
            after = edge.counters()
            got = [i for i in range(len(after)) if after[i][0] != before[i][0]]
            want = model.verdict(frame, r, time.time())
            if got != [want]:
                wrong.append(f"{v4_text(a)}: model {want.name}, kernel {got}")
        assert not wrong, f"step {step}: " + "; ".join(wrong[:5])
    assert moved > 0, "no delete ever pulled an overflowed address home"
