"""What the network config means for one DC, and what a change would change.

    view = dc_view(net, "dus", base)         # the DC's share of the network
    changes = diff(old, new, base_old, base_new)   # per DC: counts, zone names

A DC's share (DcView): its region; the zones it inspects (global ones and
its region's regional ones: the guard refuses the others); the zones whose
private key it may hold (a geo key policy names regions; keyless zones'
keys stay with the customer); the deny and allow lists as prefix tables
(inline entries and files, parsed); L4 rules and limits; what steering
needs (every DC, every dedicated address of a regional zone).

`diff` is what `privedge diff` prints before an apply (issue 6 §3): per DC,
prefixes added and removed, zones added, removed and changed, and whether
rules, limits or steering change. Nothing is sent or written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agent.prefixes import PrefixTables, parse_file, parse_list
from control.network import NetworkConfig, NetworkZone, PrefixList


@dataclass(frozen=True)
class DcView:
    name: str
    region: str
    zones: dict[str, NetworkZone]          # inspected here
    keys: frozenset[str]                   # zones whose private key this DC may hold
    deny: PrefixTables
    allow: PrefixTables
    rules: tuple                           # (l4_rules, limits): compared whole
    steering: tuple                        # (dcs, services): compared whole


def prefix_table(lst: PrefixList, base: Path) -> PrefixTables:
    """Inline prefixes and every file's, in one table."""
    tables = [parse_list(lst.prefixes, "inline")]
    for f in lst.files:
        tables.append(parse_file(str(f if Path(f).is_absolute() else base / f)))
    return PrefixTables.concat(*tables)


def key_here(zone: NetworkZone, region: str) -> bool:
    policy = zone.key_policy
    if policy.mode == "keyless":
        return False
    return policy.mode == "local" or region in policy.regions


def dc_view(net: NetworkConfig, dc: str, base: Path = Path("."),
            lists: tuple[PrefixTables, PrefixTables] | None = None) -> DcView:
    """`lists`: the deny and allow tables when already parsed (they are the
    same for every DC)."""
    me = net.dcs[dc]
    zones = {z.name: z for z in net.zones if z.region is None or z.region == me.region}
    deny, allow = lists or (prefix_table(net.deny, base), prefix_table(net.allow, base))
    services = tuple(sorted((a, z.region, z.name) for z in net.zones if z.region
                            for a in z.addresses))
    dcs = tuple(sorted((n, d.region, d.backbone) for n, d in net.dcs.items()))
    return DcView(dc, me.region, zones,
                  frozenset(z.name for z in zones.values() if key_here(z, me.region)),
                  deny, allow, (net.l4_rules, net.limits), (dcs, services))


@dataclass
class DcDiff:
    deny_added: int = 0
    deny_removed: int = 0
    allow_added: int = 0
    allow_removed: int = 0
    zones_added: list[str] = field(default_factory=list)
    zones_removed: list[str] = field(default_factory=list)
    zones_changed: list[str] = field(default_factory=list)
    keys_added: list[str] = field(default_factory=list)
    keys_removed: list[str] = field(default_factory=list)
    rules_changed: bool = False
    steering_changed: bool = False
    new_dc: bool = False

    @property
    def empty(self) -> bool:
        return not (self.deny_added or self.deny_removed or self.allow_added
                    or self.allow_removed or self.zones_added or self.zones_removed
                    or self.zones_changed or self.keys_added or self.keys_removed
                    or self.rules_changed or self.steering_changed or self.new_dc)

    def summary(self) -> str:
        if self.empty:
            return "no change"
        parts = []
        if self.new_dc:
            parts.append("new DC: everything")
        for what, added, removed in (("deny", self.deny_added, self.deny_removed),
                                     ("allow", self.allow_added, self.allow_removed)):
            if added or removed:
                parts.append(f"{what} +{added:,} -{removed:,} prefixes")
        for what, names in (("zones added", self.zones_added),
                            ("zones removed", self.zones_removed),
                            ("zones changed", self.zones_changed),
                            ("keys added", self.keys_added),
                            ("keys removed", self.keys_removed)):
            if names:
                parts.append(f"{what}: {', '.join(names)}")
        if self.rules_changed:
            parts.append("L4 rules or limits changed")
        if self.steering_changed:
            parts.append("steering changed")
        return "; ".join(parts)


def diff(old: NetworkConfig | None, new: NetworkConfig, base_old: Path = Path("."),
         base_new: Path = Path(".")) -> dict[str, DcDiff]:
    """Per DC of `new`: what applying it over `old` changes there (a DC that
    `old` did not have gets everything)."""
    new_lists = (prefix_table(new.deny, base_new), prefix_table(new.allow, base_new))
    old_lists = None if old is None else (prefix_table(old.deny, base_old),
                                          prefix_table(old.allow, base_old))
    out: dict[str, DcDiff] = {}
    for dc in new.dcs:
        after = dc_view(new, dc, base_new, new_lists)
        if old is None or dc not in old.dcs:
            d = DcDiff(new_dc=True)
            d.deny_added, d.allow_added = len(after.deny), len(after.allow)
            d.zones_added = sorted(after.zones)
            d.keys_added = sorted(after.keys)
            out[dc] = d
            continue
        before = dc_view(old, dc, base_old, old_lists)
        d = DcDiff()
        d.deny_added, d.deny_removed = before.deny.changes(after.deny)
        d.allow_added, d.allow_removed = before.allow.changes(after.allow)
        d.zones_added = sorted(set(after.zones) - set(before.zones))
        d.zones_removed = sorted(set(before.zones) - set(after.zones))
        d.zones_changed = sorted(n for n in set(after.zones) & set(before.zones)
                                 if after.zones[n] != before.zones[n])
        d.keys_added = sorted(after.keys - before.keys)
        d.keys_removed = sorted(before.keys - after.keys)
        d.rules_changed = after.rules != before.rules
        d.steering_changed = after.steering != before.steering
        out[dc] = d
    return out
