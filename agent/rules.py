"""The rule set of one interface: what the filter enforces, before compiling.

Deny entries come from three sources, each replaced on its own:
  config  the node config's deny prefixes and files (replaced on reload)
  list    the last `privedge deny load FILE` (replaced by the next load)
  adhoc   `privedge deny add` entries, optionally expiring
The compiled form (agent/compile.py) merges them; an entry in two sources
counts with the later expiry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pydantic import ValidationError

from agent.config import (
    Capacity,
    ConfigError,
    L4Rule,
    Limits,
    NodeConfig,
    Service,
    Steering,
    SteeringDc,
)
from agent.prefixes import PrefixTables, parse_file

DENY_SOURCES = ("config", "list", "adhoc")


@dataclass(frozen=True)
class RuleSet:
    deny: dict[str, PrefixTables]
    allow: PrefixTables
    bogons: PrefixTables
    l4_rules: tuple[L4Rule, ...]
    limits: Limits
    public: bool
    capacity: Capacity = field(default_factory=Capacity)
    steering: Steering | None = None
    # The backbone link's ifindex, resolved by the agent in its namespace
    # (the kernel's FIB lookups and redirects name links by index).
    backbone_ifindex: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.deny) - set(DENY_SOURCES)
        if unknown:
            raise ValueError(f"unknown deny source(s) {sorted(unknown)}")
        full = {s: self.deny.get(s, PrefixTables.empty()) for s in DENY_SOURCES}
        object.__setattr__(self, "deny", full)

    def with_deny(self, source: str, tables: PrefixTables) -> RuleSet:
        return dataclasses.replace(self, deny={**self.deny, source: tables})

    def replace(self, **changes) -> RuleSet:
        return dataclasses.replace(self, **changes)

    def deny_all(self) -> PrefixTables:
        """Every deny entry of every source (duplicates included)."""
        return PrefixTables.concat(*(self.deny[s] for s in DENY_SOURCES))


@dataclass(frozen=True)
class NetworkShare:
    """What the network config (a control plane generation) decides for
    every link of a DC; the node config keeps what is the link's own
    (interface, bogons, capacity, who this DC is)."""

    deny: PrefixTables
    allow: PrefixTables
    l4_rules: tuple[L4Rule, ...]
    limits: Limits
    dcs: tuple[SteeringDc, ...]
    services: tuple[Service, ...]

    def steering(self, local: Steering | None) -> Steering | None:
        """The link's steering with the network's DCs and dedicated addresses;
        ConfigError when they do not fit (this DC missing from them, say)."""
        if local is None:
            return None
        try:
            return Steering(dc=local.dc, region=local.region,
                            backbone_interface=local.backbone_interface,
                            backbone_address=local.backbone_address,
                            dcs=self.dcs, services=self.services)
        except ValidationError as e:
            why = "; ".join(err["msg"] for err in e.errors())
            raise ConfigError(f"the network's steering does not fit this DC: {why}") from None


def ruleset_from_config(cfg: NodeConfig, keep: RuleSet | None = None,
                        backbone_ifindex: int | None = None,
                        network: NetworkShare | None = None) -> RuleSet:
    """The config's rules; `keep` carries the operator's list and adhoc denies
    (and the backbone ifindex, unless a fresh one is given). `network`: the
    network generation's share, which replaces the config's deny and allow
    lists, L4 rules, limits and steering tables.

    Reads the config's deny files: raises PrefixError naming the bad line.
    """
    if network is None:
        config_deny = PrefixTables.concat(
            PrefixTables.from_prefixes(cfg.prefixes(cfg.deny.prefixes)),
            *(parse_file(path) for path in cfg.deny.files))
        allow = PrefixTables.from_prefixes(cfg.prefixes(cfg.allow))
        l4_rules, limits, steering = cfg.l4_rules, cfg.limits, cfg.steering
    else:
        config_deny, allow = network.deny, network.allow
        l4_rules, limits = network.l4_rules, network.limits
        steering = network.steering(cfg.steering)
        if steering is not None and len(steering.services) > cfg.capacity.services:
            raise ConfigError(f"the network has {len(steering.services)} dedicated addresses; "
                              f"{cfg.interface}'s capacity.services is {cfg.capacity.services}")
    deny = {"config": config_deny}
    if keep is not None:
        deny.update({s: keep.deny[s] for s in ("list", "adhoc")})
    return RuleSet(
        deny=deny,
        allow=allow,
        bogons=PrefixTables.from_prefixes(cfg.prefixes(cfg.bogons)),
        l4_rules=l4_rules,
        limits=limits,
        public=cfg.public,
        capacity=cfg.capacity,
        steering=steering,
        backbone_ifindex=(backbone_ifindex if backbone_ifindex is not None
                          else keep.backbone_ifindex if keep is not None else 0),
    )
