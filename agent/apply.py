"""Apply a rule set to an interface: as a new generation, or live in place.

Callers hold the node's lock. Both paths compile first, so invalid input or
a list over capacity raises before any map is touched, and both save the
applied rule set to the run directory (agent/catalog.py) after success.
"""

from __future__ import annotations

import time

from agent import catalog
from agent import libbpf as lb
from agent.compile import Compiled, compile_rules
from agent.generation import KINDS, apply_compiled, close_all, live_inner_fds
from agent.live import apply_live
from agent.maps import inner_entries
from agent.node import Node, NodeError
from agent.prefixes import PrefixTables
from agent.rules import RuleSet

# What each kind of change has to rebuild (params always: it names the generation).
LIMITS_ONLY = ("params",)
L4_ONLY = ("params", "l4ports")


# Array inner maps whose size is fixed when a node is built (their lookups
# are inlined for that size): setting -> kind.
FIXED_SIZES = {"deny4_exact": "d4exact", "maglev_slots": "maglev"}


def check_fixed_sizes(node: Node, rules: RuleSet) -> None:
    """A capacity that asks for another size of a fixed-size map (the exact
    table, the Maglev tables) needs the node rebuilt; say so by name."""
    kinds = tuple(FIXED_SIZES.values())
    try:
        fds = live_inner_fds(node, kinds)
    except lb.BpfError:
        return  # no generation yet: the node was just built from this capacity
    try:
        have = {kind: lb.map_info(fds[kind]).max_entries for kind in kinds}
    finally:
        close_all(fds)
    for setting, kind in FIXED_SIZES.items():
        want = inner_entries(kind, rules.capacity)
        if have[kind] != want:
            value = getattr(rules.capacity, setting)
            raise NodeError(f"capacity.{setting} {value:,} needs a {kind} map of {want:,} "
                            f"entries, but {node.ifname} was built with {have[kind]:,}; run "
                            f"`privedge-agent detach {node.ifname}` and start again to resize")


def apply_generation(node: Node, rules: RuleSet, kinds: tuple[str, ...] = KINDS,
                     compiled: Compiled | None = None) -> dict[str, object]:
    """Compile, build and swap in a new generation; returns a report.
    `compiled`: `rules` compiled already, for the next generation number
    (compiled again if that number is no longer next)."""
    check_fixed_sizes(node, rules)
    t0 = time.perf_counter()
    generation = node.active().generation + 1
    if compiled is None or int(compiled.params.generation) != generation:
        compiled = compile_rules(rules, generation)
    t1 = time.perf_counter()
    timings = apply_compiled(node, compiled, rules.capacity, kinds)
    catalog.save(node.run_dir, rules)
    report = {"kind": "generation", "generation": generation, "at": time.time(),
              "compile_s": round(t1 - t0, 4), **{k: round(v, 4) for k, v in timings.items()},
              "total_s": round(time.perf_counter() - t0, 4), "counts": compiled.counts}
    catalog.save_report(node.run_dir, report)
    return report


def apply_changes(node: Node, rules: RuleSet) -> dict[str, object]:
    """Change the live generation in place (small edits, expiry sweeps)."""
    t0 = time.perf_counter()
    changed, counts = apply_live(node, rules)
    catalog.save(node.run_dir, rules)
    report = {"kind": "live", "generation": node.active().generation, "at": time.time(),
              **changed, "total_s": round(time.perf_counter() - t0, 4), "counts": counts}
    catalog.save_report(node.run_dir, report)
    return report


def expire_entries(node: Node, now: float | None = None) -> dict[str, object] | None:
    """Drop expired operator entries from the rule set (the kernel already
    ignores them, this returns their /24s to the fast path). None when
    nothing had expired."""
    now = time.time() if now is None else now
    with node.lock():
        rules = catalog.load(node.run_dir)
        if rules is None:
            return None
        new, gone = rules, 0
        for s in ("adhoc", "list"):
            t = rules.deny[s]
            k4 = (t.v4["expires"] == 0) | (t.v4["expires"] > now)
            k6 = (t.v6["expires"] == 0) | (t.v6["expires"] > now)
            gone += int((~k4).sum() + (~k6).sum())
            new = new.with_deny(s, PrefixTables(t.v4[k4], t.v6[k6]))
        if not gone:
            return None
        return {**apply_changes(node, new), "expired": gone}
