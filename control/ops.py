"""Operator changes to a running node, through its pinned maps.

Each verb takes the node's lock, reads the rule set last applied
(agent/catalog.py), makes its change to a copy, and applies it: small
changes live in place, whole lists as one generation swap. Parsing,
validation and capacity checks happen before anything is written, so a
refused change leaves the node exactly as it was. With dry_run the change
is compiled and checked but not applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent import catalog
from agent.apply import LIMITS_ONLY, apply_changes, apply_generation
from agent.compile import compile_rules
from agent.config import Limits, RateLimit
from agent.node import Node, NodeError
from agent.prefixes import Prefix, PrefixTables, parse_file, parse_prefix
from agent.rules import DENY_SOURCES, RuleSet


class OpError(RuntimeError):
    """An operator change was refused; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    prefix: Prefix
    source: str
    expires: float  # wall clock seconds, 0 = never


def current_rules(node: Node) -> RuleSet:
    rules = catalog.load(node.run_dir)
    if rules is None:
        raise OpError(f"{node.ifname}: no rule set in {node.run_dir}; is the agent running "
                      "on this interface?")
    return rules


def entries(rules: RuleSet, source: str | None = None) -> list[Entry]:
    out = []
    for s in DENY_SOURCES:
        if source in (None, s):
            out += [Entry(p, s, e) for p, e in rules.deny[s].prefixes()]
    return sorted(out, key=lambda e: (e.prefix.version, e.prefix.addr, e.prefix.plen))


def _apply_live(node: Node, rules: RuleSet, dry_run: bool) -> dict:
    if dry_run:
        counts = compile_rules(rules, node.active().generation).counts
        return {"kind": "dry-run", "counts": counts}
    return apply_changes(node, rules)


def deny_add(node: Node, texts: list[str], expires_in: float = 0.0,
             dry_run: bool = False) -> dict:
    prefixes = [parse_prefix(t) for t in texts]
    expires = time.time() + expires_in if expires_in else 0.0
    with node.lock():
        rules = current_rules(node)
        adhoc = PrefixTables.concat(rules.deny["adhoc"].without(prefixes),
                                    PrefixTables.from_prefixes(prefixes, expires))
        return _apply_live(node, rules.with_deny("adhoc", adhoc), dry_run)


def deny_remove(node: Node, texts: list[str], dry_run: bool = False) -> dict:
    """Remove prefixes from the operator's sources (adhoc and list)."""
    prefixes = [parse_prefix(t) for t in texts]
    with node.lock():
        rules = current_rules(node)
        found = {s: rules.deny[s].has(prefixes) for s in DENY_SOURCES}
        missing = [str(p) for i, p in enumerate(prefixes)
                   if not any(found[s][i] for s in DENY_SOURCES)]
        if missing:
            raise OpError(f"not on the denylist: {', '.join(missing)} (nothing removed)")
        in_config = [str(p) for i, p in enumerate(prefixes) if found["config"][i]]
        if in_config:
            raise OpError(f"{', '.join(in_config)} come(s) from the node config; remove them "
                          "there and reload the agent (nothing removed)")
        new = rules
        for s in ("adhoc", "list"):
            new = new.with_deny(s, new.deny[s].without(prefixes))
        return _apply_live(node, new, dry_run)


def deny_load(node: Node, path: str, expires_in: float = 0.0, dry_run: bool = False) -> dict:
    """Replace the `list` source with a file's prefixes, as one generation."""
    t0 = time.perf_counter()
    tables = parse_file(path, time.time() + expires_in if expires_in else 0.0)
    parse_s = time.perf_counter() - t0
    with node.lock():
        new = current_rules(node).with_deny("list", tables)
        if dry_run:
            counts = compile_rules(new, node.active().generation + 1).counts
            return {"kind": "dry-run", "entries": len(tables), "counts": counts}
        report = apply_generation(node, new)
    return {**report, "entries": len(tables), "parse_s": round(parse_s, 4),
            "total_s": round(time.perf_counter() - t0, 4)}


def allow_change(node: Node, add: list[str], remove: list[str], dry_run: bool = False) -> dict:
    adds = [parse_prefix(t) for t in add]
    removes = [parse_prefix(t) for t in remove]
    with node.lock():
        rules = current_rules(node)
        missing = [str(p) for p, there in zip(removes, rules.allow.has(removes), strict=True)
                   if not there]
        if missing:
            raise OpError(f"not on the allowlist: {', '.join(missing)} (nothing changed)")
        allow = PrefixTables.concat(rules.allow.without(removes + adds),
                                    PrefixTables.from_prefixes(adds))
        return _apply_live(node, rules.replace(allow=allow), dry_run)


def limits_set(node: Node, syn: tuple[int | None, int | None],
               udp: tuple[int | None, int | None], dry_run: bool = False) -> dict:
    """New token-bucket limits: a generation that rebuilds only the parameters."""
    with node.lock():
        rules = current_rules(node)
        cur = rules.limits

        def merged(old: RateLimit, new: tuple[int | None, int | None]) -> RateLimit:
            pps, burst = new
            return RateLimit(pps=old.pps if pps is None else pps,
                             burst=old.burst if burst is None else burst)

        limits = Limits(syn=merged(cur.syn, syn), udp=merged(cur.udp, udp))
        if dry_run:
            return {"kind": "dry-run", "limits": limits.model_dump()}
        return apply_generation(node, rules.replace(limits=limits), LIMITS_ONLY)


def open_node(ifname: str | None, bpffs: str, run_dir: str) -> Node:
    """The node to work on: the named one, or the only one there is."""
    import os

    if ifname is None:
        names = sorted(d for d in os.listdir(bpffs) if ":new" not in d) \
            if os.path.isdir(bpffs) else []
        if len(names) != 1:
            raise OpError("which interface? use --iface (protected here: "
                          f"{', '.join(names) or 'none'})")
        ifname = names[0].replace(":", ".")
    try:
        return Node(ifname, bpffs, run_dir).open()
    except NodeError as e:
        raise OpError(str(e)) from None
