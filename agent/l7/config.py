"""The L7 serve config: YAML validated into typed, immutable objects.

    dc: dus                      # this DC's name
    region: eu                   # this DC's region
    listen: ["0.0.0.0", "::"]
    port: 443
    certs: /etc/privedge/certs   # <zone>.crt (PEM chain) and <zone>.key per zone
    status_socket: /run/privedge/el-dus/l7.sock
    unknown_sni: refuse          # or the name of a zone to serve by default
    zones:
      - {name: shop-eu, hostnames: [shop.example.eu], region: eu,
         addresses: [198.51.100.65, "2001:db8:100::65"]}
      - {name: www, hostnames: [www.example.com], addresses: [198.51.100.10]}

A zone without a region is global. A zone with a region may be inspected
only by a DC of that region (agent/l7/guard.py enforces it). Errors name the
file, the path inside it, the value and why, like agent/config.py:
    serve.yaml: zones[1].hostnames[0]: 'shop.example.eu': already a hostname of zones[0]
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.config import (
    DEFER_CROSS_CHECKS,
    ConfigError,
    Frozen,
    parse_checked,
    read_yaml_mapping,
)
from agent.l7.cache import CacheStoreSettings, CacheZoneSettings
from agent.l7.credstuff import LoginSettings
from agent.l7.waf import WafSettings

__all__ = ["REFUSE", "ConfigError", "ServeConfig", "Zone", "load_serve_config",
           "normalise_ip", "parse_serve_config"]

# Zone names become file names (<certs>/<zone>.crt) and metric labels, so
# they are kept to a DNS-label-like alphabet: no dots, no slashes.
LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
REFUSE = "refuse"
# Validation context key: parse_serve_config runs the cross-zone checks itself
# so it can name each problem's path (a model validator can only name the top).
_DEFER = DEFER_CROSS_CHECKS


def _name(value: str) -> str:
    if not LABEL_RE.match(value):
        raise ValueError(f"{value!r} is not a name (1-63 of a-z 0-9 -, not starting or "
                         "ending with -)")
    return value


def _hostname(value: str) -> str:
    """Lowercase DNS name, trailing dot dropped; '*.' may lead (one label)."""
    host = value.strip().lower().removesuffix(".")
    labels = host.removeprefix("*.").split(".")
    if len(host) > 253 or not all(LABEL_RE.match(label) for label in labels):
        raise ValueError(f"{value!r} is not a hostname (labels of a-z 0-9 -, optionally "
                         "led by '*.')")
    return host


def normalise_ip(value: str) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 becomes plain IPv4.

    A dual-stack socket reports an IPv4 peer or local address as
    ::ffff:a.b.c.d; the guard must see the same text the config holds.
    A zone suffix (fe80::1%eth0) is dropped: it is not part of the address.
    """
    ip = ipaddress.ip_address(str(value).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _address(value: str) -> str:
    try:
        return normalise_ip(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


Name = Annotated[str, AfterValidator(_name)]
Hostname = Annotated[str, AfterValidator(_hostname)]
Address = Annotated[str, AfterValidator(_address)]


class ForwardCfg(Frozen):
    status: Literal[301, 302] = 301
    url: str = Field(min_length=1)


class PageRuleCfg(Frozen):
    pattern: str = Field(min_length=1)
    cache_level: Literal["bypass", "standard", "cache_everything"] | None = None
    edge_ttl: int | None = Field(default=None, ge=0)
    always_https: bool = False
    forwarding_url: ForwardCfg | None = None
    disable_waf: bool = False


class FirewallRuleCfg(Frozen):
    expression: str = Field(min_length=1)
    action: Literal["block", "challenge", "allow", "log", "skip"]
    description: str = ""

    @field_validator("expression")
    @classmethod
    def _parses(cls, v: str) -> str:
        from agent.l7.firewall import RuleError, compile_expression

        try:
            compile_expression(v)
        except RuleError as e:
            raise ValueError(str(e)) from None
        return v


class RateLimitCfg(Frozen):
    name: Name
    requests: int = Field(ge=1)
    period: float = Field(gt=0, le=86400)
    block: float = Field(ge=0, le=86400)
    key: Literal["ip", "ip+path", "ip+header"] = "ip"
    header: str | None = None
    path_prefix: str = "/"

    @model_validator(mode="after")
    def _header_with_key(self) -> RateLimitCfg:
        if (self.key == "ip+header") != (self.header is not None):
            raise ValueError("a header goes with key ip+header, and only with it")
        return self


class OriginCfg(Frozen):
    """Where a zone's requests go after the edge: https (verified) or http."""

    url: str = Field(min_length=1)            # http(s)://host[:port]; no path
    verify: bool = True                       # https: check certificate and name
    ca_file: str | None = None                # https: trust this CA instead of the system's
    server_name: str | None = None            # https: SNI and name to verify, if not the host
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    response_timeout: float = Field(default=30.0, gt=0, le=600)   # to the response head
    read_timeout: float = Field(default=30.0, gt=0, le=600)       # between body reads
    pool: int = Field(default=16, ge=0, le=1024)                  # idle connections kept

    @field_validator("url")
    @classmethod
    def _origin_url(cls, v: str) -> str:
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") \
                or u.query or u.fragment or u.username:
            raise ValueError(f"{v!r} is not an origin: http://host[:port] or https://host[:port]")
        try:
            u.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            raise ValueError(f"{v!r}: the port is not a number in 0-65535") from None
        return v


class BotSettings(Frozen):
    """What the zone does with requests that look automated (agent/l7/bots.py)."""

    mode: Literal["off", "challenge", "block"] = "challenge"
    threshold: int = Field(default=60, ge=1, le=100)   # score at which mode applies
    challenge_ttl: int = Field(default=3600, ge=60, le=86400)  # cookie lifetime, seconds


class HstsCfg(Frozen):
    """Strict-Transport-Security on the zone's HTTPS answers (RFC 6797)."""

    max_age: int = Field(default=15552000, ge=0, le=63072000)   # seconds; 0 revokes
    include_subdomains: bool = False
    preload: bool = False

    @property
    def header(self) -> str:
        return "; ".join([f"max-age={self.max_age}",
                          *(["includeSubDomains"] if self.include_subdomains else []),
                          *(["preload"] if self.preload else [])])


class Zone(Frozen):
    """A customer zone as the L7 front end sees it."""

    name: Name
    hostnames: tuple[Hostname, ...] = Field(min_length=1)
    region: Name | None = None       # None: global, any DC may inspect it
    addresses: tuple[Address, ...] = ()  # dedicated IPs; a regional zone needs them
    plain_http: Literal["redirect", "serve"] = "redirect"  # what port 80 does for it
    page_rules: tuple[PageRuleCfg, ...] = ()
    firewall: tuple[FirewallRuleCfg, ...] = ()
    rate_limits: tuple[RateLimitCfg, ...] = ()
    origin: OriginCfg | None = None  # None: the edge answers itself (a small JSON document)
    bots: BotSettings = BotSettings()
    login: LoginSettings = LoginSettings()   # credential stuffing (agent/l7/credstuff.py)
    cache: CacheZoneSettings = CacheZoneSettings()
    waf: WafSettings = WafSettings()
    hsts: HstsCfg | None = None      # None: no HSTS header (the zone's owner decides)

    @property
    def regional(self) -> bool:
        return self.region is not None

    @model_validator(mode="after")
    def _regional_needs_addresses(self) -> Zone:
        # XDP steers by destination address only: without dedicated IPs a
        # regional zone could never reach its region from elsewhere.
        if self.region is not None and not self.addresses:
            raise ValueError(f"zone {self.name!r} is restricted to region {self.region}, so it "
                             "needs dedicated addresses (steering goes by address)")
        return self


class HttpLimits(Frozen):
    """What one client may ask of HTTP/1.1 (agent/l7/http1.py)."""

    head_bytes: int = Field(default=16 * 1024, ge=1024, le=1 << 20)  # 431 above
    headers: int = Field(default=100, ge=8, le=1000)                 # 431 above
    body_bytes: int = Field(default=1 << 20, ge=0, le=1 << 30)       # 413 above
    head_timeout: float = Field(default=10.0, gt=0, le=300)          # 408: slowloris
    body_timeout: float = Field(default=30.0, gt=0, le=600)          # 408 per read


class ServeConfig(Frozen):
    """One DC's L7 front end: where to listen, which zones, which region."""

    dc: Name
    region: Name
    listen: tuple[Address, ...] = Field(default=("0.0.0.0", "::"), min_length=1)
    port: int = Field(default=443, ge=0, le=65535)  # 0: a free port per listener (tests)
    plain_port: int | None = Field(default=None, ge=0, le=65535)  # plain HTTP (80); None: off
    certs: str = Field(min_length=1)
    status_socket: str | None = None
    unknown_sni: str = REFUSE
    handshake_timeout: float = Field(default=10.0, gt=0, le=120)
    idle_timeout: float = Field(default=30.0, gt=0, le=600)     # kept-alive, between requests
    http: HttpLimits = HttpLimits()
    countries: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # for ip.geoip.country
    tls_resumption: bool = True        # false: every connection is a full handshake
    cache_store: CacheStoreSettings = CacheStoreSettings()   # shared by the zones
    client_ip_header: str = Field(default="True-Client-IP", pattern=r"^[A-Za-z0-9-]{1,64}$")

    @field_validator("countries")
    @classmethod
    def _country_table(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        from agent.l7.geo import CountryTable

        CountryTable(v)  # raises ValueError naming the bad code or prefix
        return v
    zones: tuple[Zone, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> ServeConfig:
        if info.context and info.context.get(_DEFER):
            return self
        problems = cross_problems(self)
        if problems:
            raise ValueError("; ".join(f"{path}: {value!r}: {why}"
                                       for path, value, why in problems))
        return self

    def zone(self, name: str) -> Zone:
        return next(z for z in self.zones if z.name == name)

    @property
    def certs_dir(self) -> Path:
        return Path(self.certs)


def zone_problems(zones: Sequence[Zone]) -> list[tuple[str, object, str]]:
    """Checks that span zones (names, hostnames and dedicated addresses each
    in one zone only): (path, value, why) for each problem found. Also the
    network config's (control/network.py)."""
    problems: list[tuple[str, object, str]] = []
    names: dict[str, int] = {}
    hosts: dict[str, int] = {}
    addrs: dict[str, int] = {}
    for i, zone in enumerate(zones):
        if zone.name == REFUSE:
            problems.append((f"zones[{i}].name", zone.name,
                             f"{REFUSE!r} is reserved for unknown_sni"))
        if zone.name in names:
            problems.append((f"zones[{i}].name", zone.name,
                             f"zone names must be unique: already zones[{names[zone.name]}]"))
        names.setdefault(zone.name, i)
        for j, host in enumerate(zone.hostnames):
            if host in hosts:
                problems.append((f"zones[{i}].hostnames[{j}]", host,
                                 f"already a hostname of zones[{hosts[host]}]"))
            hosts.setdefault(host, i)
        for j, addr in enumerate(zone.addresses):
            if addr in addrs:
                problems.append((f"zones[{i}].addresses[{j}]", addr,
                                 f"already an address of zones[{addrs[addr]}]"))
            addrs.setdefault(addr, i)
    return problems


def cross_problems(cfg: ServeConfig) -> list[tuple[str, object, str]]:
    """Checks that span zones and listeners: (path, value, why) for each."""
    problems = zone_problems(cfg.zones)
    names = list(dict.fromkeys(z.name for z in cfg.zones))   # in order, once each
    seen: set[str] = set()
    for i, addr in enumerate(cfg.listen):
        if addr in seen:
            problems.append((f"listen[{i}]", addr, "listed twice"))
        seen.add(addr)
    if cfg.unknown_sni != REFUSE and cfg.unknown_sni not in names:
        problems.append(("unknown_sni", cfg.unknown_sni,
                         f"must be {REFUSE!r} or a zone name "
                         f"(zones: {', '.join(names) or 'none'})"))
    return problems


def parse_serve_config(data: object, source: str = "<serve config>") -> ServeConfig:
    """Validate a mapping; ConfigError lists every problem, one per line."""
    return parse_checked(ServeConfig, data, source, cross_problems)


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read and validate a serve config file; ConfigError says what and where."""
    return parse_serve_config(read_yaml_mapping(path), str(path))
