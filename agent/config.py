"""The agent's node config: YAML validated into typed, immutable objects.

Everything is checked before anything touches the kernel. Errors name the
file, the path inside it, the value and why, e.g.
    node.yaml: limits.syn.pps: -5: must be >= 0
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent import abi
from agent.prefixes import Prefix, PrefixError, parse_prefix

M = TypeVar("M", bound=BaseModel)

IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "gre": 47, "esp": 50, "ah": 51,
             "sctp": 132}


class ConfigError(ValueError):
    """The config is invalid; the message lists every problem."""


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _prefix(value: str) -> str:
    try:
        return str(parse_prefix(str(value)))
    except PrefixError as e:
        raise ValueError(str(e)) from None


PrefixText = Annotated[str, AfterValidator(_prefix)]


def _ifname(value: str) -> str:
    if not IFNAME_RE.match(value):
        raise ValueError(f"{value!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")
    return value


IfName = Annotated[str, AfterValidator(_ifname)]


class PortRange(Frozen):
    lo: int = Field(ge=0, le=65535)
    hi: int = Field(ge=0, le=65535)

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.lo > self.hi:
            raise ValueError(f"port range {self.lo}-{self.hi} is reversed")
        return self

    @classmethod
    def parse(cls, value: int | str) -> PortRange:
        """80, "80" or "1024-65535"."""
        text = str(value).strip()
        lo, dash, hi = text.partition("-")
        if not lo.strip().isdigit() or (dash and not hi.strip().isdigit()):
            raise ValueError(f"{value!r} is not a port or a port range like 1024-65535")
        return cls(lo=int(lo), hi=int(hi) if dash else int(lo))

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


def _ports(value: object) -> tuple[PortRange, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    return tuple(v if isinstance(v, PortRange) else
                 PortRange.model_validate(v) if isinstance(v, dict) else PortRange.parse(v)
                 for v in items)


class L4Rule(Frozen):
    """Protocol and port sets -> drop or pass. The first matching rule wins."""

    name: str = Field(min_length=1, max_length=40)
    proto: int
    sport: tuple[PortRange, ...] = ()   # empty: any port
    dport: tuple[PortRange, ...] = ()
    action: Literal["drop", "pass"]

    @field_validator("proto", mode="before")
    @classmethod
    def _proto(cls, v: object) -> int:
        if isinstance(v, str) and v.lower() in PROTOCOLS:
            return PROTOCOLS[v.lower()]
        if isinstance(v, int) and 0 <= v <= 255:
            return v
        raise ValueError(f"{v!r} is not a protocol (one of {', '.join(PROTOCOLS)} or 0-255)")

    @field_validator("sport", "dport", mode="before")
    @classmethod
    def _port_list(cls, v: object) -> tuple[PortRange, ...]:
        return _ports(v)

    @model_validator(mode="after")
    def _ports_need_tcp_udp(self) -> L4Rule:
        if (self.sport or self.dport) and self.proto not in (6, 17):
            raise ValueError("ports can only be matched for tcp and udp")
        return self


class RateLimit(Frozen):
    """Per-source token bucket; pps 0 switches it off."""

    pps: int = Field(ge=0, le=100_000_000)
    burst: int = Field(ge=1, le=100_000_000)

    @property
    def interval_ns(self) -> int:
        return 0 if self.pps == 0 else max(1, 1_000_000_000 // self.pps)

    @property
    def burst_ns(self) -> int:
        return self.interval_ns * self.burst


class Limits(Frozen):
    syn: RateLimit = RateLimit(pps=200, burst=400)
    udp: RateLimit = RateLimit(pps=10_000, burst=20_000)


class Capacity(Frozen):
    """Map sizes. Lists over a capacity are refused whole."""

    deny4_exact: int = Field(default=1_048_576, ge=64, le=1 << 26)
    deny4_lpm: int = Field(default=262_144, ge=16, le=1 << 24)
    deny6: int = Field(default=262_144, ge=16, le=1 << 24)
    allow: int = Field(default=4096, ge=16, le=1 << 20)
    bogons: int = Field(default=1024, ge=16, le=1 << 16)
    rate_sources: int = Field(default=65_536, ge=1024, le=1 << 24)
    # Maglev slots per region: a prime well above the DC count (the paper's
    # rule of thumb is M > 100 N) so flows spread evenly.
    maglev_slots: int = Field(default=65_537, ge=7, le=1 << 20)
    services: int = Field(default=4096, ge=16, le=1 << 20)

    @field_validator("maglev_slots")
    @classmethod
    def _prime(cls, v: int) -> int:
        from agent.maglev import is_prime

        if not is_prime(v):
            raise ValueError(f"{v} is not a prime (Maglev tables need a prime size, "
                             "e.g. 65537 or 251)")
        return v


DEFAULT_BOGONS: tuple[str, ...] = (
    # IPv4 special-purpose and unallocated space (RFC 6890 and friends).
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    # IPv6: unspecified/loopback/mapped, discard, benchmarking, ORCHID,
    # documentation, 6bone, ULA, link-local, site-local, multicast.
    "::/8", "100::/64", "2001:2::/48", "2001:10::/28", "2001:db8::/32", "3ffe::/16",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
)

# UDP source ports of well-known amplification (reflection) services.
REFLECTION_PORTS = (17, 19, 111, 123, 137, 161, 389, 520, 1900, 3702, 5353, 11211)

DEFAULT_L4_RULES: tuple[L4Rule, ...] = (
    # NTP servers talk to each other from 123 to 123: let those through.
    L4Rule(name="ntp-symmetric", proto=17, sport=("123",), dport=("123",), action="pass"),
    L4Rule(name="udp-reflection", proto=17, sport=tuple(str(p) for p in REFLECTION_PORTS),
           action="drop"),
)


class DenyConfig(Frozen):
    prefixes: tuple[PrefixText, ...] = ()
    files: tuple[str, ...] = ()


def _ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


IPv4Text = Annotated[str, AfterValidator(_ipv4)]
IPText = Annotated[str, AfterValidator(_ip)]
NAME_RE = r"^[a-z0-9][a-z0-9-]{0,31}$"


class SteeringDc(Frozen):
    """A DC of the network, as steering sees it."""

    name: str = Field(pattern=NAME_RE)
    region: str = Field(pattern=NAME_RE)
    backbone: IPv4Text
    enabled: bool = True    # false: drained, takes no new flows (out of the Maglev table)


class Service(Frozen):
    """A Regional Services dedicated IP: traffic to it is inspected only in `region`."""

    address: IPText
    region: str = Field(pattern=NAME_RE)
    zone: str = ""


class Steering(Frozen):
    """Regional Services steering: who this DC is, and where regions live."""

    dc: str = Field(pattern=NAME_RE)
    region: str = Field(pattern=NAME_RE)
    backbone_interface: IfName
    backbone_address: IPv4Text
    dcs: tuple[SteeringDc, ...]
    services: tuple[Service, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Steering:
        names = [d.name for d in self.dcs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"dcs: names must be unique: {', '.join(dup)} repeated")
        if len(self.dcs) > abi.DCS_MAX:
            raise ValueError(f"dcs: {len(self.dcs)} DCs; at most {abi.DCS_MAX} fit the table")
        me = next((d for d in self.dcs if d.name == self.dc), None)
        if me is None:
            raise ValueError(f"dc: {self.dc!r} is not in dcs ({', '.join(names)})")
        if me.region != self.region or me.backbone != self.backbone_address:
            raise ValueError(f"dc: {self.dc!r} is listed in dcs with region {me.region} and "
                             f"backbone {me.backbone}, not {self.region} and "
                             f"{self.backbone_address}")
        addrs = [d.backbone for d in self.dcs]
        dup = sorted({a for a in addrs if addrs.count(a) > 1})
        if dup:
            raise ValueError(f"dcs: backbone address {', '.join(dup)} listed twice")
        if "0.0.0.0" in addrs:
            raise ValueError("dcs: 0.0.0.0 is not a backbone address")
        homeless = sorted({s.region for s in self.services} - {d.region for d in self.dcs})
        if homeless:
            raise ValueError(f"services: region {', '.join(homeless)} has no DC (regions with "
                             f"DCs: {', '.join(sorted({d.region for d in self.dcs}))}); a "
                             "region whose DCs are all drained keeps them with enabled: false")
        regions = {d.region for d in self.dcs} | {s.region for s in self.services}
        if len(regions) > abi.REGIONS_MAX:
            raise ValueError(f"{len(regions)} regions; at most {abi.REGIONS_MAX}")
        addrs = [s.address for s in self.services]
        dup = sorted({a for a in addrs if addrs.count(a) > 1})
        if dup:
            raise ValueError(f"services: address {', '.join(dup)} listed twice")
        return self

    @property
    def regions(self) -> tuple[str, ...]:
        """Region names in index order (the kernel knows regions by index)."""
        return tuple(sorted({d.region for d in self.dcs} | {s.region for s in self.services}))


def check_l4_rules(rules: tuple[L4Rule, ...]) -> tuple[L4Rule, ...]:
    """At most L4_RULES_MAX rules (the bit vectors' width), names unique."""
    if len(rules) > abi.L4_RULES_MAX:
        raise ValueError(f"{len(rules)} rules; at most {abi.L4_RULES_MAX} fit the bit vectors")
    names = [r.name for r in rules]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"rule names must be unique: {', '.join(dup)} repeated")
    return rules


class NodeConfig(Frozen):
    """One edge interface: where to attach and which rules to enforce."""

    interface: IfName
    role: Literal["public", "backbone"] = "public"
    netns: str | None = None
    bpffs: str = "/sys/fs/bpf/privedge"
    run_dir: str = "/run/privedge"
    capacity: Capacity = Capacity()
    limits: Limits = Limits()
    allow: tuple[PrefixText, ...] = ()
    bogons: tuple[PrefixText, ...] = DEFAULT_BOGONS
    deny: DenyConfig = DenyConfig()
    l4_rules: tuple[L4Rule, ...] = DEFAULT_L4_RULES
    steering: Steering | None = None

    @field_validator("bogons", mode="before")
    @classmethod
    def _bogon_preset(cls, v: object) -> object:
        return DEFAULT_BOGONS if v == "default" else v

    @field_validator("l4_rules", mode="before")
    @classmethod
    def _l4_preset(cls, v: object) -> object:
        return DEFAULT_L4_RULES if v == "default" else v

    @field_validator("l4_rules")
    @classmethod
    def _l4_count(cls, v: tuple[L4Rule, ...]) -> tuple[L4Rule, ...]:
        return check_l4_rules(v)

    @model_validator(mode="after")
    def _steering_fits(self) -> NodeConfig:
        st = self.steering
        if st is None:
            return self
        if len(st.services) > self.capacity.services:
            raise ValueError(f"steering.services: {len(st.services)} addresses; "
                             f"capacity.services is {self.capacity.services}")
        if self.public and self.interface == st.backbone_interface:
            raise ValueError(f"steering.backbone_interface: {st.backbone_interface!r} is this "
                             "link, whose role is public; the backbone link has role backbone")
        if not self.public and self.interface != st.backbone_interface:
            raise ValueError(f"steering.backbone_interface: {st.backbone_interface!r}, but this "
                             f"backbone link is {self.interface!r}")
        return self

    @property
    def public(self) -> bool:
        return self.role == "public"

    @staticmethod
    def prefixes(texts: tuple[str, ...]) -> list[Prefix]:
        return [parse_prefix(p) for p in texts]


def _format_errors(source: str, err: ValidationError, data: object) -> str:
    lines = []
    for e in err.errors():
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        shown = "" if isinstance(value, dict | list) or value is data else f" {value!r}:"
        lines.append(f"{source}: {path or '(top)'}:{shown} {msg}")
    return "\n".join(lines)


# A model's validation context key: skip the cross-field checks inside
# validation, so parse_checked can report each with its own path.
DEFER_CROSS_CHECKS = "privedge_defer_cross_checks"


def parse_checked(model: type[M], data: object, source: str,
                  cross_problems: Callable[[M], list[tuple[str, object, str]]]) -> M:
    """Validate `data` as `model`, then its cross-field checks; ConfigError
    lists every problem, one per line, each as `source: path: value: why`."""
    try:
        cfg = model.model_validate(data, context={DEFER_CROSS_CHECKS: True})
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e, data)) from None
    problems = cross_problems(cfg)
    if problems:
        raise ConfigError("\n".join(f"{source}: {path}: {value!r}: {why}"
                                    for path, value, why in problems))
    return cfg


def parse_config(data: object, source: str = "<config>") -> NodeConfig:
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e, data)) from None


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; ConfigError names the file, and the
    line and column of a syntax error."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    return data


def load_config(path: str | Path) -> NodeConfig:
    return parse_config(read_yaml_mapping(path), str(path))
