"""The lab network (lab/topology.yaml), validated into frozen dataclasses.

One file describes the network for both ways of running it: namespaces on
one machine (lab/cluster.py) and one VM per host (the Vagrantfile). Every
problem is found before anything is built, and each error names the file,
the path inside it, the value and why:

    lab/topology.yaml: dcs.fra.region: "apac" is not a region (defined: eu, us)

Shape (see lab/topology.yaml for the real one):

    segments: {NAME: {role: public|backbone, v4: CIDR, v6: CIDR?, mtu: N}}
    anycast: {v4: CIDR, v6: CIDR?}          on every DC's loopback
    regions: [NAME, ...]
    maglev_slots: PRIME                       Maglev table size per region
    dcs:   {NAME: {region, city?, SEGMENT: ADDRS, ...}}   on every segment
    hosts: {NAME: {SEGMENT: ADDRS, ..., anycast_via: DC?}}
    zones: [{name, hostnames: [...], region?, addresses: [...], l7?: {...}}]
    deny:  [PREFIX, ...]
    origin: {host: HOST, name: DNSNAME, port: N}   the lab's origin server

A zone's `l7` mapping (origin, page rules, firewall, WAF, cache, bots,
login) goes as it is into each DC's serve config, which validates it
(agent/l7/config.py).

ADDRS is one address ("198.18.0.1") or {v4: ..., v6: ...}.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_PATH = Path(__file__).resolve().parent / "topology.yaml"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ROLES = ("public", "backbone")
# Node names become namespace suffixes and the bridge-side veth names (at
# most 15 characters); segment names become "<segment>0" on the hosts.
NODE_RE = re.compile(r"^[a-z][a-z0-9-]{0,14}$")
SEGMENT_RE = re.compile(r"^[a-z][a-z0-9]{0,13}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9*]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
RESERVED_NODE_NAMES = {"br0", "lo"}
MAGLEV_MIN, MAGLEV_MAX = 7, 1 << 20     # what the agent accepts (agent/config.py)


class TopologyError(ValueError):
    """The topology is invalid; the message lists every problem, one a line."""


@dataclass(frozen=True)
class Segment:
    name: str
    role: Literal["public", "backbone"]
    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network | None
    mtu: int

    @property
    def ifname(self) -> str:
        """The interface name on a host in the namespace lab: inet -> inet0."""
        return f"{self.name}0"


@dataclass(frozen=True)
class Link:
    """One host's attachment to one segment."""

    segment: str
    v4: ipaddress.IPv4Address | None
    v6: ipaddress.IPv6Address | None


@dataclass(frozen=True)
class Node:
    """A DC (kind "dc", has a region) or another host (kind "host")."""

    name: str
    kind: Literal["dc", "host"]
    links: tuple[Link, ...]             # in segment order
    region: str | None = None
    city: str | None = None
    anycast_via: str | None = None

    @property
    def is_dc(self) -> bool:
        return self.kind == "dc"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(link.segment for link in self.links)

    def link(self, segment: str) -> Link | None:
        return next((lk for lk in self.links if lk.segment == segment), None)


@dataclass(frozen=True)
class Anycast:
    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network | None

    @property
    def loopback_v4(self) -> str:
        """The address put on every DC's lo: its prefix makes the whole range local."""
        return f"{self.v4[1]}/{self.v4.prefixlen}"

    @property
    def loopback_v6(self) -> str | None:
        return None if self.v6 is None else f"{self.v6[1]}/128"


@dataclass(frozen=True)
class Zone:
    name: str
    hostnames: tuple[str, ...]
    region: str | None
    addresses: tuple[IPAddress, ...]
    l7: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class OriginHost:
    """The lab's origin server (lab/origin.py): which host runs it, its name."""

    host: str
    name: str
    port: int = 443


@dataclass(frozen=True)
class Service:
    """A Regional Services dedicated IP: steered to a DC of `region`."""

    address: IPAddress
    region: str
    zone: str


@dataclass(frozen=True)
class Topology:
    segments: tuple[Segment, ...]
    anycast: Anycast
    regions: tuple[str, ...]
    maglev_slots: int
    dcs: tuple[Node, ...]
    hosts: tuple[Node, ...]
    zones: tuple[Zone, ...]
    deny: tuple[str, ...]
    origin: OriginHost | None = None
    source: str = field(default="<topology>", compare=False)
    # The mapping it was read from, so the same network can be handed to
    # another process (`python -m lab provision --topology FILE`).
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # -- lookups ---------------------------------------------------------

    @property
    def nodes(self) -> tuple[Node, ...]:
        return self.dcs + self.hosts

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise TopologyError(f"{self.source}: no host or DC named {name!r} "
                            f"(defined: {', '.join(n.name for n in self.nodes)})")

    def dc(self, name: str) -> Node:
        n = self.node(name)
        if not n.is_dc:
            raise TopologyError(f"{self.source}: {name!r} is a host, not a DC "
                                f"(DCs: {', '.join(self.dc_names())})")
        return n

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise TopologyError(f"{self.source}: no segment named {name!r} "
                            f"(defined: {', '.join(s.name for s in self.segments)})")

    @property
    def public(self) -> Segment:
        return next(s for s in self.segments if s.role == "public")

    @property
    def backbone(self) -> Segment:
        return next(s for s in self.segments if s.role == "backbone")

    def dc_names(self, region: str | None = None) -> tuple[str, ...]:
        """DC names in topology order, optionally only those of one region."""
        return tuple(d.name for d in self.dcs if region is None or d.region == region)

    def regional_zones(self, region: str | None = None) -> tuple[Zone, ...]:
        """Zones restricted to a region (Regional Services), optionally one region's."""
        return tuple(z for z in self.zones
                     if z.region is not None and (region is None or z.region == region))

    def services(self) -> tuple[Service, ...]:
        """One entry per dedicated address of every regional zone, in topology order."""
        return tuple(Service(a, z.region, z.name)
                     for z in self.regional_zones() for a in z.addresses)  # type: ignore[arg-type]

    def anycast_hosts(self) -> tuple[Node, ...]:
        return tuple(h for h in self.hosts if h.anycast_via)

    def dc_by_public_address(self, address: str | IPAddress) -> str | None:
        """Which DC owns this address on the public segment (a route's gateway)."""
        ip = ipaddress.ip_address(str(address))
        for d in self.dcs:
            link = d.link(self.public.name)
            if link and ip in (link.v4, link.v6):
                return d.name
        return None


# -- loading ---------------------------------------------------------------


def load_topology(path: str | Path = DEFAULT_PATH) -> Topology:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise TopologyError(f"{p}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise TopologyError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") \
            from None
    return parse_topology(data, str(p))


def dump_topology(topology: Topology) -> str:
    """The YAML a topology was read from (for another process to read back)."""
    return yaml.safe_dump(_plain(topology.data), sort_keys=False, allow_unicode=True)


def parse_topology(data: object, source: str = "<topology>") -> Topology:
    """Validate a mapping; raise TopologyError listing every problem."""
    v = _Validator(source)
    topo = v.topology(data)
    if v.errors or topo is None:
        raise TopologyError("\n".join(v.errors))
    return topo


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


class _Validator:
    """Collects every error with its path; each method returns None on failure."""

    TOP_KEYS = ("segments", "anycast", "regions", "maglev_slots", "dcs", "hosts", "zones",
                "deny", "origin")

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def err(self, path: str, msg: str, value: object = None, show: bool = True) -> None:
        shown = f" {_show(value)}" if show and value is not None else ""
        self.errors.append(f"{self.source}: {path}:{shown} {msg}")

    # -- generic helpers

    def mapping(self, path: str, value: object, keys: Iterable[str] | None,
                required: Iterable[str] = ()) -> dict | None:
        if not isinstance(value, Mapping):
            self.err(path, f"expected a mapping, got {type(value).__name__}", show=False)
            return None
        out = {str(k): v for k, v in value.items()}
        if keys is not None:
            known = list(keys)
            for k in out:
                if k not in known:
                    self.err(f"{path}.{k}" if path else k,
                             f"unknown key (known: {', '.join(known)})", show=False)
        for k in required:
            if k not in out or out[k] is None:
                self.err(f"{path}.{k}" if path else k, "is required", show=False)
        return out

    def network(self, path: str, value: object, version: int) -> ipaddress._BaseNetwork | None:
        try:
            net = ipaddress.ip_network(str(value), strict=True)
        except ValueError as e:
            self.err(path, f"is not a network ({e})", value)
            return None
        if net.version != version:
            self.err(path, f"is not an IPv{version} network", value)
            return None
        return net

    def address(self, path: str, value: object) -> IPAddress | None:
        try:
            return ipaddress.ip_address(str(value))
        except ValueError:
            self.err(path, "is not an IPv4 or IPv6 address", value)
            return None

    # -- sections

    def topology(self, data: object) -> Topology | None:
        top = self.mapping("", data, self.TOP_KEYS,
                           required=("segments", "anycast", "regions", "dcs"))
        if top is None:
            self.errors[-1] = f"{self.source}: expected a mapping at the top level"
            return None
        # A section that failed is reported once: later checks that depend
        # on it are skipped rather than repeated for every host.
        raw_segments = top.get("segments")
        declared = [str(k) for k in raw_segments] if isinstance(raw_segments, Mapping) else []
        segments = self.segments(raw_segments)
        anycast = self.anycast(top.get("anycast"), segments)
        regions = self.regions(top.get("regions"))
        slots = self.maglev_slots(top.get("maglev_slots", 65537))
        seg_by_name = {s.name: s for s in segments}
        dcs = self.nodes("dcs", top.get("dcs"), "dc", declared, seg_by_name, regions)
        hosts = self.nodes("hosts", top.get("hosts") or {}, "host", declared, seg_by_name,
                           regions)
        self.cross_checks(dcs, hosts, seg_by_name, anycast)
        zones = self.zones(top.get("zones") or [], regions, anycast, dcs)
        deny = self.deny(top.get("deny") or [])
        origin = self.origin(top.get("origin"), hosts)
        if self.errors or anycast is None or slots is None:
            return None
        return Topology(segments=tuple(segments), anycast=anycast, regions=tuple(regions or ()),
                        maglev_slots=slots, dcs=tuple(dcs), hosts=tuple(hosts),
                        zones=tuple(zones), deny=tuple(deny), origin=origin,
                        source=self.source, data=dict(top))

    def origin(self, value: object, hosts: list[Node]) -> OriginHost | None:
        if value is None:
            return None
        m = self.mapping("origin", value, ("host", "name", "port"), required=("host", "name"))
        if m is None:
            return None
        host, name, port = m.get("host"), m.get("name"), m.get("port", 443)
        ok = True
        if host not in [h.name for h in hosts]:
            self.err("origin.host", "is not one of hosts", host)
            ok = False
        if not isinstance(name, str) or not HOSTNAME_RE.match(name):
            self.err("origin.name", "is not a host name", name)
            ok = False
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            self.err("origin.port", "is not a port (1-65535)", port)
            ok = False
        return OriginHost(str(host), str(name), port) if ok else None

    def segments(self, value: object) -> list[Segment]:
        segs = self.mapping("segments", value, None)
        if segs is None:
            return []
        out = []
        for name, raw in segs.items():
            path = f"segments.{name}"
            if not SEGMENT_RE.match(name):
                self.err(path, "is not a segment name (a-z then a-z 0-9, at most 14)", name)
                continue
            m = self.mapping(path, raw, ("role", "v4", "v6", "mtu"), required=("role", "v4"))
            if m is None:
                continue
            role = m.get("role")
            if role is not None and role not in ROLES:
                self.err(f"{path}.role", f"is not a role (one of {', '.join(ROLES)})", role)
            v4 = self.network(f"{path}.v4", m["v4"], 4) if m.get("v4") is not None else None
            v6 = self.network(f"{path}.v6", m["v6"], 6) if m.get("v6") is not None else None
            if m.get("v6") is not None and v6 is None:
                continue
            mtu = m.get("mtu", 1500)
            low = 1280 if v6 is not None else 576
            if not isinstance(mtu, int) or isinstance(mtu, bool) or not low <= mtu <= 9000:
                self.err(f"{path}.mtu", f"must be an integer from {low} to 9000", mtu)
                mtu = None
            if role in ROLES and v4 is not None and mtu is not None:
                out.append(Segment(name, role, v4, v6, mtu))  # type: ignore[arg-type]
        for role in ROLES:
            have = [s.name for s in out if s.role == role]
            if len(out) == len(segs) and len(have) != 1:
                self.err("segments", f"need exactly one segment with role {role} "
                                     f"(have: {', '.join(have) or 'none'})", show=False)
        return out

    def anycast(self, value: object, segments: list[Segment]) -> Anycast | None:
        m = self.mapping("anycast", value, ("v4", "v6"), required=("v4",))
        if m is None or m.get("v4") is None:
            return None
        v4 = self.network("anycast.v4", m["v4"], 4)
        v6 = self.network("anycast.v6", m["v6"], 6) if m.get("v6") is not None else None
        if v4 is None or (m.get("v6") is not None and v6 is None):
            return None
        for s in segments:
            for mine, theirs in ((v4, s.v4), (v6, s.v6)):
                if mine is not None and theirs is not None and mine.overlaps(theirs):
                    self.err(f"anycast.v{mine.version}", f"overlaps segment {s.name} ({theirs})",
                             str(mine))
        return Anycast(v4, v6)  # type: ignore[arg-type]

    def regions(self, value: object) -> list[str] | None:
        """The region names, or None when the list itself is unusable."""
        if not isinstance(value, list) or not value:
            self.err("regions", "must be a non-empty list of region names", show=False)
            return None
        out = []
        for i, r in enumerate(value):
            if not isinstance(r, str) or not NAME_RE.match(r):
                self.err(f"regions[{i}]", "is not a region name (a-z 0-9 -)", r)
            elif r in out:
                self.err(f"regions[{i}]", "is listed twice", r)
            else:
                out.append(r)
        return out

    def maglev_slots(self, value: object) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) \
                or not MAGLEV_MIN <= value <= MAGLEV_MAX:
            self.err("maglev_slots", f"must be a prime from {MAGLEV_MIN} to {MAGLEV_MAX}",
                     value)
            return None
        if not _is_prime(value):
            self.err("maglev_slots", "is not prime (Maglev needs a prime table size, "
                                     "e.g. 65537)", value)
            return None
        return value

    def nodes(self, section: str, value: object, kind: str, declared: list[str],
              segs: dict[str, Segment], regions: list[str] | None) -> list[Node]:
        m = self.mapping(section, value, None)
        if m is None:
            return []
        out = []
        for name, raw in m.items():
            path = f"{section}.{name}"
            if not NODE_RE.match(name) or name in RESERVED_NODE_NAMES:
                self.err(path, "is not a host name (a-z then a-z 0-9 -, at most 15; "
                               "not br0 or lo)", name)
                continue
            if name in declared:
                self.err(path, f"has the name of a segment (segment namespaces are "
                               f"<prefix>{name} too)", name)
                continue
            extra = ("region", "city") if kind == "dc" else ("anycast_via",)
            node = self.mapping(path, raw, (*declared, *extra),
                                required=("region",) if kind == "dc" else ())
            if node is None:
                continue
            region = node.get("region")
            if kind == "dc" and region is not None and regions is not None \
                    and region not in regions:
                self.err(f"{path}.region",
                         f"is not a region (defined: {', '.join(regions)})", region)
            city = node.get("city")
            if city is not None and not isinstance(city, str):
                self.err(f"{path}.city", "must be a string", city)
            links = [lk for s in segs.values() if s.name in node
                     if (lk := self.link(f"{path}.{s.name}", node[s.name], s)) is not None]
            missing = [s for s in declared if kind == "dc" and s not in node]
            if missing:
                self.err(path, f"a DC needs an address on every segment (missing: "
                               f"{', '.join(missing)})", show=False)
            if declared and not any(s in node for s in declared):
                self.err(path, f"is on no segment (segments: {', '.join(declared)})",
                         show=False)
            via = node.get("anycast_via")
            out.append(Node(name, kind, tuple(links), region=region if kind == "dc" else None,
                            city=city, anycast_via=None if via is None else str(via)))
        return out

    def link(self, path: str, value: object, seg: Segment) -> Link | None:
        if isinstance(value, Mapping):
            m = self.mapping(path, value, ("v4", "v6"))
            if m is None:
                return None
            items = [(f"{path}.{k}", m[k], int(k[1])) for k in ("v4", "v6") if m.get(k)]
        else:
            items = [(path, value, 0)]
        found: dict[int, IPAddress] = {}
        for p, raw, version in items:
            ip = self.address(p, raw)
            if ip is None:
                continue
            if version and ip.version != version:
                self.err(p, f"is not an IPv{version} address", str(ip))
                continue
            net = seg.v4 if ip.version == 4 else seg.v6
            if net is None:
                self.err(p, f"segment {seg.name} has no IPv{ip.version} network", str(ip))
            elif ip not in net:
                self.err(p, f"is not in segment {seg.name} ({net})", str(ip))
            elif ip.version == 4 and ip in (net.network_address, net.broadcast_address):
                self.err(p, f"is the network or broadcast address of {net}", str(ip))
            elif ip.version in found:
                self.err(p, f"a second IPv{ip.version} address", str(ip))
            else:
                found[ip.version] = ip
        if not found:
            if not items:
                self.err(path, "needs a v4 or v6 address", show=False)
            return None
        return Link(seg.name, found.get(4), found.get(6))  # type: ignore[arg-type]

    def cross_checks(self, dcs: list[Node], hosts: list[Node], segs: dict[str, Segment],
                     anycast: Anycast | None) -> None:
        seen: dict[IPAddress, str] = {}
        for n in dcs + hosts:
            for lk in n.links:
                for ip in (lk.v4, lk.v6):
                    if ip is None:
                        continue
                    if ip in seen:
                        self.err(f"{'dcs' if n.is_dc else 'hosts'}.{n.name}.{lk.segment}",
                                 f"is already the address of {seen[ip]}", str(ip))
                    seen[ip] = n.name
        names = [n.name for n in dcs]
        for n in hosts:
            if n.name in names:
                self.err(f"hosts.{n.name}", "is also the name of a DC", n.name)
        public = next((s for s in segs.values() if s.role == "public"), None)
        by_name = {d.name: d for d in dcs}
        for h in hosts:
            if h.anycast_via is None:
                continue
            path = f"hosts.{h.name}.anycast_via"
            dc = by_name.get(h.anycast_via)
            if dc is None:
                self.err(path, f"is not a DC (DCs: {', '.join(names)})", h.anycast_via)
                continue
            if public is None:
                continue        # reported with the segments
            mine, theirs = h.link(public.name), dc.link(public.name)
            if mine is None or theirs is None:
                self.err(path, f"needs the host on the public segment ({public.name})",
                         show=False)
            elif mine.v4 and not theirs.v4:
                self.err(path, f"{dc.name} has no IPv4 address on {public.name}", show=False)
            elif anycast and anycast.v6 and mine.v6 and not theirs.v6:
                self.err(path, f"{dc.name} has no IPv6 address on {public.name}", show=False)

    def zones(self, value: object, regions: list[str] | None, anycast: Anycast | None,
              dcs: list[Node]) -> list[Zone]:
        if not isinstance(value, list):
            self.err("zones", "must be a list of zones", show=False)
            return []
        out: list[Zone] = []
        owner: dict[IPAddress, tuple[str, str | None]] = {}
        for i, raw in enumerate(value):
            path = f"zones[{i}]"
            m = self.mapping(path, raw, ("name", "hostnames", "region", "addresses", "l7"),
                             required=("name", "hostnames", "addresses"))
            if m is None:
                continue
            name = m.get("name")
            if name is not None and (not isinstance(name, str) or not NAME_RE.match(name)):
                self.err(f"{path}.name", "is not a zone name (a-z 0-9 -)", name)
            elif name in [z.name for z in out]:
                self.err(f"{path}.name", "is used by another zone", name)
            region = m.get("region")
            if region is not None and regions is not None:
                if region not in regions:
                    self.err(f"{path}.region",
                             f"is not a region (defined: {', '.join(regions)})", region)
                elif not any(d.region == region for d in dcs):
                    self.err(f"{path}.region", "has no DC to serve it", region)
            hostnames = m.get("hostnames") or []
            if not isinstance(hostnames, list) or not hostnames:
                self.err(f"{path}.hostnames", "must be a non-empty list", show=False)
                hostnames = []
            for j, h in enumerate(hostnames):
                if not isinstance(h, str) or not HOSTNAME_RE.match(h):
                    self.err(f"{path}.hostnames[{j}]", "is not a host name", h)
            addrs: list[IPAddress] = []
            raw_addrs = m.get("addresses") or []
            if not isinstance(raw_addrs, list) or not raw_addrs:
                self.err(f"{path}.addresses", "must be a non-empty list", show=False)
                raw_addrs = []
            for j, a in enumerate(raw_addrs):
                p = f"{path}.addresses[{j}]"
                ip = self.address(p, a)
                if ip is None:
                    continue
                if anycast and not (ip in anycast.v4 or (anycast.v6 and ip in anycast.v6)):
                    self.err(p, "is not in the anycast range "
                                f"({', '.join(str(n) for n in (anycast.v4, anycast.v6) if n)})",
                             str(ip))
                    continue
                prev = owner.get(ip)
                if prev and prev[1] != region:
                    self.err(p, f"is also an address of zone {prev[0]} "
                                f"(region {prev[1] or 'none'}); steering goes by address, "
                                "so a regional zone needs its own", str(ip))
                owner.setdefault(ip, (str(name), region))
                addrs.append(ip)
            l7 = m.get("l7") or {}
            if not isinstance(l7, Mapping):
                self.err(f"{path}.l7", "must be a mapping (the zone's serve settings)", l7)
                l7 = {}
            if isinstance(name, str):
                out.append(Zone(name, tuple(str(h) for h in hostnames), region, tuple(addrs),
                                dict(l7)))
        return out

    def deny(self, value: object) -> list[str]:
        if not isinstance(value, list):
            self.err("deny", "must be a list of prefixes", show=False)
            return []
        out = []
        for i, raw in enumerate(value):
            try:
                out.append(str(ipaddress.ip_network(str(raw), strict=True)))
            except ValueError as e:
                self.err(f"deny[{i}]", f"is not a prefix ({e})", raw)
        return out
