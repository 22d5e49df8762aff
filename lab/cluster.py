"""The multi-DC lab: lab/topology.yaml built from network namespaces.

    <p>client <p>attacker <p>uscustomer <p>origin  <p>dus  <p>fra  <p>iad
        └──────────┴──────────┴────────────┴────────┴──────┴──────┘
                 inet0 of each, on br0 in namespace <p>inet
                                           <p>core  <p>dus  <p>fra  <p>iad
                                               └───────┴──────┴──────┘
                                          bb0 of each, on br0 in <p>bb

Two layers, so the same provisioning runs on the namespace lab and on VMs:

- `provision(topology, host, ifmap)` runs INSIDE one host's network (a lab
  namespace, or a Vagrant VM whose NICs are eth1/eth2): sysctls, MTU,
  addresses, the DCs' anycast loopback, the hosts' anycast routes. It is what
  `python -m lab provision HOST --if inet=eth1` runs, and it is idempotent:
  it returns the changes it made, none on a second run.
- `Lab` builds the wiring around it on one machine (switch namespaces with a
  bridge each, one veth per host per segment), runs `python -m lab provision`
  in every namespace through nsenter, and starts one agent per DC.

Safety: only namespaces named <prefix><name> are made and removed; the
host's own interfaces and routes are never touched; processes are stopped
by recorded PID after checking /proc/PID/cmdline is ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import yaml
from pyroute2 import IPRoute, NetNS
from pyroute2 import netns as pyroute2_netns

from lab import netns, services
from lab.services import Service
from lab.topology import Node, Topology, dump_topology

ROOT = Path(__file__).resolve().parents[1]
STATE_ROOT = Path("/run/privedge-lab")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}-$")
IFA_F_NODAD = 0x02
IFF_UP = 0x1
RTN_LOCAL = 2
TABLE_MAIN, TABLE_LOCAL = 254, 255
PROVISION_TIMEOUT = 120.0
AGENT_READY_TIMEOUT = 120.0
ORIGIN_READY_TIMEOUT = 20.0
PROMETHEUS = "/usr/bin/prometheus"    # Debian's package (scripts/setup.sh)
PROMETHEUS_WEB = "127.0.0.1:9090"     # in the core's namespace: query it there
PROMETHEUS_INTERVAL = 2.0             # seconds between scrapes: a lab run is short
PROMETHEUS_READY_TIMEOUT = 30.0
LOGSTORE_READY_TIMEOUT = 30.0
LAB_OPERATORS = {"lab-admin": "admin"}
AGENT_STOP_TIMEOUT = 30.0


class LabError(RuntimeError):
    """Something the lab could not do; the message says what and what next."""


# -- provisioning: inside one host's network ---------------------------------


def _sysctl(parts: Sequence[str], value: str, changes: list[str]) -> None:
    """Set /proc/sys/<parts> (of the current network namespace) if it differs.

    Parts, not a dotted key: interface names may contain dots."""
    path = Path("/proc/sys", *parts)
    try:
        if path.read_text().strip() == value:
            return
        path.write_text(value)
    except OSError as e:
        raise LabError(f"sysctl {'.'.join(parts)}={value}: {e.strerror} ({path})") from None
    changes.append(f"sysctl {'.'.join(parts)}={value}")


def _addresses(ipr, index: int) -> set[tuple[str, int]]:
    return {(str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))), a["prefixlen"])
            for a in ipr.get_addr(index=index)}


def _address(ipr, index: int, ifname: str, ip: str, prefixlen: int,
             changes: list[str]) -> None:
    """Add ip/prefixlen unless present; IPv6 without duplicate address detection,
    so it is usable at once."""
    ip = str(ipaddress.ip_address(ip))
    if (ip, prefixlen) in _addresses(ipr, index):
        return
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    kw = {"flags": IFA_F_NODAD} if family == socket.AF_INET6 else {}
    ipr.addr("add", index=index, address=ip, prefixlen=prefixlen, family=family, **kw)
    changes.append(f"address {ip}/{prefixlen} on {ifname}")


def _routes(ipr, net: ipaddress._BaseNetwork, table: int) -> list:
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    return [r for r in ipr.route("dump", family=family, table=table)
            if r["dst_len"] == net.prefixlen
            and r.get_attr("RTA_DST") is not None
            and ipaddress.ip_address(r.get_attr("RTA_DST")) == net.network_address]


def anycast_gateways(ipr, topology: Topology) -> dict[str, str | None]:
    """"v4"/"v6" -> the gateway of this network's route to the anycast prefix."""
    out: dict[str, str | None] = {}
    for key, net in (("v4", topology.anycast.v4), ("v6", topology.anycast.v6)):
        if net is None:
            continue
        gws = [r.get_attr("RTA_GATEWAY") for r in _routes(ipr, net, TABLE_MAIN)]
        out[key] = str(gws[0]) if gws and gws[0] else None
    return out


def set_anycast_routes(ipr, topology: Topology, host: Node, dc: str,
                       changes: list[str]) -> None:
    """Route the anycast prefixes via `dc`'s public address (v4, and v6 where
    both ends have one). `ipr` is an IPRoute, or a NetNS from outside."""
    seg = topology.public.name
    mine, theirs = host.link(seg), topology.dc(dc).link(seg)
    if mine is None or theirs is None:
        raise LabError(f"{host.name} is not on the {seg} segment: it has no anycast route")
    have = anycast_gateways(ipr, topology)
    for key, net, gw, own in (("v4", topology.anycast.v4, theirs.v4, mine.v4),
                              ("v6", topology.anycast.v6, theirs.v6, mine.v6)):
        if net is None or gw is None or own is None:
            continue
        if have.get(key) is not None and ipaddress.ip_address(have[key]) == gw:
            continue
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        ipr.route("replace", dst=str(net), gateway=str(gw), family=family)
        changes.append(f"route {net} via {gw} ({dc})")


def _dc_loopback(ipr, topology: Topology, changes: list[str]) -> None:
    """Every anycast address local: v4 by a covering prefix on lo (the kernel
    adds `local <prefix> dev lo` for it), v6 by an explicit local route."""
    lo = ipr.link_lookup(ifname="lo")[0]
    if not ipr.get_links(lo)[0]["flags"] & IFF_UP:
        ipr.link("set", index=lo, state="up")
        changes.append("lo up")
    addr, plen = topology.anycast.loopback_v4.split("/")
    _address(ipr, lo, "lo", addr, int(plen), changes)
    v6 = topology.anycast.v6
    if v6 is not None:
        if not any(r["type"] == RTN_LOCAL for r in _routes(ipr, v6, TABLE_LOCAL)):
            ipr.route("replace", dst=str(v6), type="local", oif=lo, table=TABLE_LOCAL,
                      family=socket.AF_INET6)
            changes.append(f"route local {v6} dev lo")
        addr, plen = topology.anycast.loopback_v6.split("/")
        _address(ipr, lo, "lo", addr, int(plen), changes)


def resolve_ifmap(specs: Mapping[str, str]) -> dict[str, str]:
    """segment -> interface name; a value "mac:02:00:..." is looked up by MAC
    address in the current network (how Vagrant VMs find their NICs)."""
    out = {}
    with IPRoute() as ipr:
        links = {(lk.get_attr("IFLA_ADDRESS") or "").lower(): lk.get_attr("IFLA_IFNAME")
                 for lk in ipr.get_links()}
    for seg, spec in specs.items():
        if spec.startswith("mac:"):
            mac = spec[4:].lower()
            if mac not in links:
                raise LabError(f"no interface has MAC {mac} (segment {seg}); "
                               f"have: {', '.join(f'{n} {m}' for m, n in links.items() if m)}")
            out[seg] = links[mac]
        else:
            out[seg] = spec
    return out


def _tx_checksums(ifname: str, changes: list[str]) -> None:
    """Hosts put real checksums in what they send, as on a wire. A veth
    leaves them to "offload"; a frame that a DC's XDP then redirects over
    the backbone loses that promise, and the DC terminating it would drop
    it for a bad checksum. (VMs' NICs checksum anyway; this changes nothing.)"""
    out = subprocess.run(["ethtool", "-k", ifname], capture_output=True, text=True, timeout=10)
    if "tx-checksumming: on" not in out.stdout:
        return
    subprocess.run(["ethtool", "-K", ifname, "tx", "off"], capture_output=True, timeout=10,
                   check=True)
    changes.append(f"tx checksum offload off on {ifname}")


def in_named_netns() -> bool:
    """Is this thread in a named network namespace (one under /run/netns)?

    Anything else counts as the machine's own network. Fails closed: what
    cannot be read is not a lab namespace.
    """
    try:
        here = os.stat("/proc/thread-self/ns/net")
        return any(os.stat(entry).st_ino == here.st_ino and os.stat(entry).st_dev == here.st_dev
                   for entry in Path("/run/netns").iterdir())
    except OSError:
        return False


def _refuse_default_route_links(ipr, index: Mapping[str, int]) -> None:
    """The lab never touches the interface this machine reaches the world by."""
    for route in (*ipr.get_routes(family=socket.AF_INET, dst_len=0),
                  *ipr.get_routes(family=socket.AF_INET6, dst_len=0)):
        oif = route.get_attr("RTA_OIF")
        for seg, i in index.items():
            if oif == i:
                name = ipr.get_links(i)[0].get_attr("IFLA_IFNAME")
                raise LabError(f"{name} (segment {seg}) carries this machine's default route; "
                               "the lab never changes it: name the lab NIC (--if SEG=mac:MAC)")


def provision(topology: Topology, host: str, ifmap: Mapping[str, str], *,
              anycast_via: str | None = None, vm: bool = False) -> list[str]:
    """Provision `host` in the current network namespace; return what changed.

    `ifmap` maps each segment the host is on to its interface here
    ({"inet": "inet0", "bb": "bb0"} in a namespace, eth1/eth2 on a VM).
    `anycast_via` overrides the topology's (a moved client). Links are
    brought up only after their sysctls are set, so no router solicitation
    or address autoconfiguration happens first.
    """
    node = topology.node(host)
    missing = [s for s in node.segments if s not in ifmap]
    extra = [s for s in ifmap if s not in node.segments]
    if missing or extra:
        raise LabError(f"{host} is on {', '.join(node.segments)}: "
                       + "; ".join([f"no interface given for {', '.join(missing)}"] * bool(missing)
                                   + [f"not on {', '.join(extra)}"] * bool(extra))
                       + " (use --if SEGMENT=IFNAME)")
    via = anycast_via or node.anycast_via
    if via is not None:
        topology.dc(via)
    if not vm and not in_named_netns():
        raise LabError("this is not a lab namespace but the machine's own network: "
                       "provisioning changes sysctls, addresses and routes, so it runs only in "
                       "a lab namespace or, with --vm, on a VM made for the lab")
    changes: list[str] = []
    with IPRoute() as ipr:
        index = {}
        for seg, ifname in ifmap.items():
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                have = ", ".join(lk.get_attr("IFLA_IFNAME") for lk in ipr.get_links())
                raise LabError(f"{host}: no interface {ifname} for segment {seg} (have: {have})")
            index[seg] = found[0]
        _refuse_default_route_links(ipr, index)

        # Sysctls first. Writing ip_forward resets every device's forwarding
        # flag, so it goes before bb0's; it is only written if it is not 0.
        _sysctl(("net", "ipv4", "ip_forward"), "0", changes)
        # Replies come back by direct server return, from a DC other than
        # the one a client routes to: no reverse-path filter anywhere.
        for dev in ("all", "default", "lo", *ifmap.values()):
            _sysctl(("net", "ipv4", "conf", dev, "rp_filter"), "0", changes)
        for seg, ifname in ifmap.items():
            # A DC keeps IPv6 on every link: bb0 must accept decapsulated IPv6.
            v6 = node.is_dc or node.link(seg).v6 is not None
            _sysctl(("net", "ipv6", "conf", ifname, "disable_ipv6"), "0" if v6 else "1", changes)
            if v6:
                _sysctl(("net", "ipv6", "conf", ifname, "accept_ra"), "0", changes)
                _sysctl(("net", "ipv6", "conf", ifname, "autoconf"), "0", changes)
        if node.is_dc:
            _sysctl(("net", "ipv6", "conf", "lo", "disable_ipv6"), "0", changes)
            # bpf_fib_lookup refuses devices without forwarding. The agent
            # sets this too, with an nftables guard that drops whatever the
            # kernel would forward from bb0 (agent/backbone.py).
            bb = ifmap[topology.backbone.name]
            _sysctl(("net", "ipv4", "conf", bb, "forwarding"), "1", changes)

        for seg, ifname in ifmap.items():
            segment, link, i = topology.segment(seg), node.link(seg), index[seg]
            info = ipr.get_links(i)[0]
            if info.get_attr("IFLA_MTU") != segment.mtu:
                ipr.link("set", index=i, mtu=segment.mtu)
                changes.append(f"mtu {segment.mtu} on {ifname}")
            if not info["flags"] & IFF_UP:
                ipr.link("set", index=i, state="up")
                changes.append(f"{ifname} up")
            if link.v4 is not None:
                _address(ipr, i, ifname, str(link.v4), segment.v4.prefixlen, changes)
            if link.v6 is not None and segment.v6 is not None:
                _address(ipr, i, ifname, str(link.v6), segment.v6.prefixlen, changes)

        if not node.is_dc:
            for ifname in ifmap.values():
                _tx_checksums(ifname, changes)
        if node.is_dc:
            _dc_loopback(ipr, topology, changes)
        if via is not None:
            set_anycast_routes(ipr, topology, node, via, changes)
    return changes


# -- the namespace lab -------------------------------------------------------


def _terminate(pid: int, still_ours: Callable[[], bool],
               proc: subprocess.Popen | None = None) -> None:
    """SIGTERM, a grace of AGENT_STOP_TIMEOUT to exit, then SIGKILL, but only
    if the PID is still the process we mean (PIDs are reused)."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + AGENT_STOP_TIMEOUT
    while time.monotonic() < deadline:
        if (proc is not None and proc.poll() is not None) or not _alive(pid):
            return
        time.sleep(0.05)
    if still_ours():
        os.kill(pid, signal.SIGKILL)


def _wait_for_line(log: Path, offset: int, proc: subprocess.Popen, needle: str,
                   deadline: float) -> tuple[bool, str]:
    """Poll what a process logged after `offset` until `needle` shows up:
    (True, text); (False, text) if the process ended or the deadline passed."""
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if needle in text:
            return True, text
        if proc.poll() is not None or time.monotonic() > deadline:
            return False, text
        time.sleep(0.05)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces): run it with sudo")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Lab:
    """The namespaces of a topology, named <prefix><name>.

    State (generated configs, agent PIDs and logs, the PKI, a record of what
    was made) lives in `state_dir`, by default /run/privedge-lab/<prefix
    without its dash>. `down()` works from the topology and that record, and
    copes with either being incomplete after a crash.
    """

    def __init__(self, topology: Topology, prefix: str = "el-",
                 state_dir: str | Path | None = None, python: str = sys.executable) -> None:
        if not PREFIX_RE.match(prefix):
            raise LabError(f"prefix {prefix!r}: a-z then a-z 0-9 (at most 10), ending in '-'")
        self.topology = topology
        self.prefix = prefix
        self.state_dir = Path(state_dir or STATE_ROOT / prefix.rstrip("-")).absolute()
        if len(self.state_dir.parts) < 3:
            raise LabError(f"state dir {self.state_dir} is too close to / to be removed by down")
        self.python = python
        self._procs: dict[str, subprocess.Popen] = {}

    # -- names

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def switch_namespaces(self) -> list[str]:
        return [self.ns(s.name) for s in self.topology.segments]

    @property
    def node_namespaces(self) -> list[str]:
        return [self.ns(n.name) for n in self.topology.nodes]

    @property
    def namespaces(self) -> list[str]:
        return self.switch_namespaces + self.node_namespaces

    def bpffs(self, dc: str) -> str:
        return f"/sys/fs/bpf/privedge-{self.prefix}{dc}"

    def dc_dir(self, dc: str) -> Path:
        return self.state_dir / dc

    def ifmap(self, node: Node) -> dict[str, str]:
        return {s: self.topology.segment(s).ifname for s in node.segments}

    # -- state

    @property
    def _record_file(self) -> Path:
        return self.state_dir / "lab.json"

    def _recorded(self) -> dict:
        try:
            data = json.loads(self._record_file.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _record(self) -> None:
        """What up() makes, written before it makes it (down() after a crash)."""
        old = self._recorded()
        rec = {"prefix": self.prefix,
               "namespaces": sorted(set(old.get("namespaces", [])) | set(self.namespaces)),
               "dcs": sorted(set(old.get("dcs", [])) | set(self.topology.dc_names())),
               "moves": old.get("moves", {})}
        self._write_record(rec)

    def _write_record(self, rec: dict) -> None:
        tmp = self._record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
        tmp.replace(self._record_file)

    def _expected_links(self, name: str) -> set[str]:
        """The interfaces a lab namespace of this topology may hold."""
        for seg in self.topology.segments:
            if name == self.ns(seg.name):
                return {"lo", "br0", *(n.name for n in self.topology.nodes
                                       if seg.name in n.segments)}
        for node in self.topology.nodes:
            if name == self.ns(node.name):
                return {"lo", *(self.topology.segment(s).ifname for s in node.segments)}
        return {"lo"}

    def _foreign(self, name: str) -> list[str]:
        """Interfaces in an existing namespace that this lab would not have
        made: it belongs to something else (the demo also uses el-client
        and el-dus)."""
        if name in self._recorded().get("namespaces", []) or not netns.exists(name):
            return []
        with NetNS(name) as ns:
            have = {lk.get_attr("IFLA_IFNAME") for lk in ns.get_links()}
        return sorted(have - self._expected_links(name))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One up/down/move at a time per lab."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @property
    def topology_file(self) -> Path:
        return self.state_dir / "topology.yaml"

    # -- up

    def up(self, agents: bool = True) -> dict:
        """Build (or repair) the lab; return the changes made (none when it
        was complete already)."""
        _require_root()
        changes: list[str] = []
        with self._locked():
            foreign = {n: f for n in self.namespaces if (f := self._foreign(n))}
            if foreign:
                raise LabError(
                    "namespaces of another lab are in the way: "
                    + "; ".join(f"{n} has {', '.join(f)}" for n, f in foreign.items())
                    + f". Remove them (the demo: python -m lab.demo --clean) or choose "
                      f"another --prefix than {self.prefix}")
            self._record()
            text = dump_topology(self.topology)
            if not self.topology_file.exists() or self.topology_file.read_text() != text:
                self.topology_file.write_text(text)
            for seg in self.topology.segments:
                self._switch(seg.name, changes)
            for node in self.topology.nodes:
                self._wire(node, changes)
            self._gro(changes)
            changes += self._provision_all()
            if agents:
                changes += self._agents_up()
        return {"changes": changes}

    def _ns_sysctls(self, ns: str, values: dict[str, str], changes: list[str]) -> None:
        keys = list(values)
        out = subprocess.run(netns.nsenter(ns, ["sysctl", "-n", *keys]), capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        todo = [f"{k}={v}" for k, v, have in zip(keys, values.values(), out, strict=True)
                if have != v]
        if todo:
            subprocess.run(netns.nsenter(ns, ["sysctl", "-qw", *todo]), check=True, timeout=30)
            changes += [f"{ns}: sysctl {t}" for t in todo]

    def _switch(self, seg: str, changes: list[str]) -> None:
        """Namespace <p><seg> with bridge br0: no IPv6 of its own (its ports
        send no solicitations), no STP delay, no multicast snooping (so
        neighbour discovery floods like on a plain switch)."""
        name = self.ns(seg)
        if not netns.exists(name):
            changes.append(f"{name}: namespace created")
        netns.create(name)
        self._ns_sysctls(name, {"net.ipv4.conf.all.rp_filter": "0",
                                "net.ipv4.conf.default.rp_filter": "0",
                                "net.ipv6.conf.all.disable_ipv6": "1",
                                "net.ipv6.conf.default.disable_ipv6": "1"}, changes)
        with NetNS(name) as ns:
            if not ns.link_lookup(ifname="br0"):
                ns.link("add", ifname="br0", kind="bridge", br_stp_state=0,
                        br_forward_delay=0, br_mcast_snooping=0)
                changes.append(f"{name}: bridge br0")
            br = ns.link_lookup(ifname="br0")[0]
            if not ns.get_links(br)[0]["flags"] & IFF_UP:
                ns.link("set", index=br, state="up")
                changes.append(f"{name}: br0 up")

    def _wire(self, node: Node, changes: list[str]) -> None:
        """Namespace <p><node>, and per segment a veth: <seg>0 on the host
        (left down: provisioning sets it up) and <node> on the bridge."""
        name = self.ns(node.name)
        if not netns.exists(name):
            changes.append(f"{name}: namespace created")
        netns.create(name)
        for seg_name in node.segments:
            seg = self.topology.segment(seg_name)
            sw = self.ns(seg.name)
            with NetNS(sw) as s:
                port = s.link_lookup(ifname=node.name)
            with NetNS(name) as n:
                mine = n.link_lookup(ifname=seg.ifname)
                if mine and not port:       # a half we cannot repair: make it again
                    n.link("del", index=mine[0])
                    mine = []
                if not mine:
                    n.link("add", ifname=seg.ifname, kind="veth",
                           peer={"ifname": node.name, "net_ns_fd": sw})
                    changes.append(f"{name}: veth {seg.ifname} <-> {sw}:{node.name}")
            with NetNS(sw) as s:
                port = s.link_lookup(ifname=node.name)[0]
                br = s.link_lookup(ifname="br0")[0]
                info = s.get_links(port)[0]
                if info.get_attr("IFLA_MTU") != seg.mtu:
                    s.link("set", index=port, mtu=seg.mtu)
                    changes.append(f"{sw}: mtu {seg.mtu} on {node.name}")
                if info.get_attr("IFLA_MASTER") != br:
                    s.link("set", index=port, master=br)
                    changes.append(f"{sw}: {node.name} on br0")
                if not info["flags"] & IFF_UP:
                    s.link("set", index=port, state="up")
                    changes.append(f"{sw}: {node.name} up")

    def _gro(self, changes: list[str]) -> None:
        """GRO on the backbone's bridge ports: a veth accepts XDP_REDIRECTed
        frames (a DC's bb0 sending steered packets) only if its peer has
        NAPI, which GRO switches on."""
        seg = self.topology.backbone
        sw = self.ns(seg.name)
        for node in self.topology.nodes:
            if seg.name not in node.segments:
                continue
            out = subprocess.run(netns.nsenter(sw, ["ethtool", "-k", node.name]),
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            if "generic-receive-offload: on" not in out:
                subprocess.run(netns.nsenter(sw, ["ethtool", "-K", node.name, "gro", "on"]),
                               capture_output=True, timeout=30, check=True)
                changes.append(f"{sw}: gro on {node.name}")

    def provision_argv(self, node: Node) -> list[str]:
        argv = [self.python, "-m", "lab", "provision", node.name,
                "--topology", str(self.topology_file), "--json"]
        for seg, ifname in self.ifmap(node).items():
            argv += ["--if", f"{seg}={ifname}"]
        via = self._recorded().get("moves", {}).get(node.name)
        if via:
            argv += ["--via", via]
        return argv

    def _provision_all(self) -> list[str]:
        """`python -m lab provision` in every host namespace, in parallel."""
        procs = {n.name: subprocess.Popen(netns.nsenter(self.ns(n.name), self.provision_argv(n)),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, cwd=ROOT, env=_env())
                 for n in self.topology.nodes}
        changes, failed = [], []
        deadline = time.monotonic() + PROVISION_TIMEOUT
        for name, p in procs.items():
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                failed.append(f"{name}: timed out after {PROVISION_TIMEOUT:.0f}s")
                continue
            if p.returncode != 0:
                failed.append(f"{name}: {err.strip() or out.strip()}")
                continue
            changes += [f"{self.ns(name)}: {c}" for c in json.loads(out)["changes"]]
        if failed:
            raise LabError("provisioning failed:\n  " + "\n  ".join(failed))
        return changes

    # -- agents

    def _pid_file(self, dc: str) -> Path:
        return self.dc_dir(dc) / "agent.pid"

    def agent_argv(self, dc: str) -> list[str]:
        d = self.dc_dir(dc)
        links = [f"{s.ifname}.yaml" for s in (self.topology.public, self.topology.backbone)]
        argv = [self.python, "-m", "agent.daemon", "run"]
        for f in links:
            argv += ["--config", str(d / f)]
        argv += ["--serve", str(d / "serve.yaml"), "--metrics", str(d / "metrics.yaml")]
        for flag in ("logs", "api"):
            if (d / f"{flag}.yaml").exists():
                argv += [f"--{flag}", str(d / f"{flag}.yaml")]
        return argv

    def _is_agent(self, pid: int, dc: str) -> bool:
        """PID is alive and is the agent of this DC (checked by its command line)."""
        cmd = _cmdline(pid)
        return _alive(pid) and "agent.daemon" in cmd and str(self.dc_dir(dc) / "serve.yaml") in cmd

    def agent_pid(self, dc: str) -> int | None:
        """The recorded PID of a DC's agent, if that process is still ours."""
        try:
            pid = int(self._pid_file(dc).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_agent(pid, dc) else None

    def _agents_up(self) -> list[str]:
        from lab.agents import dc_configs, lab_paths, pki_missing, pki_zones, write_configs
        try:
            from lab.certs import make_lab_pki
        except ImportError as e:
            raise LabError(f"lab/certs.py (make_lab_pki) cannot be imported ({e}); "
                           "start the lab without agents: python -m lab up --no-agents") from None
        changes = []
        pki = self.state_dir / "pki"
        if pki_missing(self.topology, pki):
            make_lab_pki(pki, pki_zones(self.topology))
            changes.append(f"lab PKI in {pki}")
        changes += self._origin_up(pki, make_lab_pki)
        netpki, issued = self._network_pki()
        changes += issued + self._network_file() + self._logstore_up(netpki)
        changes += self._service_up(self.control_service())   # agents pull from it at start
        starting: dict[str, tuple[subprocess.Popen, int]] = {}
        for dc in self.topology.dc_names():
            d = self.dc_dir(dc)
            configs = dc_configs(self.topology, dc, lab_paths(dc, self.prefix, self.state_dir,
                                                              self.topology))
            changes += [f"{self.ns(dc)}: wrote {d / f}" for f in write_configs(d, configs)]
            if self.agent_pid(dc) is not None:
                continue
            log = d / "agent.log"
            offset = log.stat().st_size if log.exists() else 0
            with open(log, "a") as f:
                p = subprocess.Popen(netns.nsenter(self.ns(dc), self.agent_argv(dc)), stdout=f,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, env=_env(), start_new_session=True)
            # nsenter execs the agent: this PID is the agent's.
            self._pid_file(dc).write_text(f"{p.pid}\n")
            self._procs[dc] = p
            starting[dc] = (p, offset)
            changes.append(f"{self.ns(dc)}: agent started (pid {p.pid})")
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        for dc, (p, offset) in starting.items():
            log = self.dc_dir(dc) / "agent.log"
            ready, text = _wait_for_line(log, offset, p, "[ready]", deadline)
            if not ready:
                why = (f"exited with {p.returncode}" if p.returncode is not None
                       else f"not ready after {AGENT_READY_TIMEOUT:.0f}s")
                tail = "\n    ".join(text.strip().splitlines()[-15:])
                raise LabError(f"agent of {dc} {why} (log {log}):\n    {tail}\n"
                               f"stop what started with: python -m lab down")
        return changes + self._prometheus_up(netpki)

    # -- servers on hosts: the origin, and the core's Prometheus (lab/services.py)

    def origin_service(self, pki: Path) -> Service | None:
        """lab/origin.py over TLS, a certificate for its name from the lab CA."""
        o = self.topology.origin
        if o is None:
            return None
        link = self.topology.node(o.host).link(self.topology.public.name)
        argv = [self.python, "-m", "lab.origin", "--port", str(o.port),
                "--cert", str(pki / "origin.crt"), "--key", str(pki / "origin.key")]
        for ip in (link.v4, link.v6):
            if ip is not None:
                argv += ["--listen", str(ip)]
        return Service("origin", self.ns(o.host), tuple(argv), self.state_dir, "listening on",
                       "lab.origin", ORIGIN_READY_TIMEOUT)

    def prometheus_service(self) -> Service | None:
        """Debian's prometheus in the core's namespace, its config generated
        from the topology (core/prometheus.py); its web API on the core's
        loopback only, so nothing but TLS crosses the backbone."""
        if "core" not in {n.name for n in self.topology.hosts}:
            return None
        d = self.state_dir / "prometheus"
        argv = [PROMETHEUS, f"--config.file={d / 'prometheus.yml'}",
                f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address={PROMETHEUS_WEB}",
                "--storage.tsdb.retention.time=1d", "--web.enable-lifecycle"]
        return Service("prometheus", self.ns("core"), tuple(argv), self.state_dir,
                       "Server is ready to receive web requests", "prometheus",
                       PROMETHEUS_READY_TIMEOUT)

    def logstore_service(self) -> Service | None:
        """The core log store (core/) in the core's namespace, on its backbone address."""
        if "core" not in {n.name for n in self.topology.hosts}:
            return None
        argv = [self.python, "-m", "core", "serve", str(self.state_dir / "core" / "core.yaml")]
        return Service("logstore", self.ns("core"), tuple(argv), self.state_dir,
                       "ready: https://", "core", LOGSTORE_READY_TIMEOUT)

    @property
    def control_store(self) -> Path:
        """The control plane's generations (control/generations.py)."""
        return self.state_dir / "control" / "generations"

    def control_service(self) -> Service | None:
        """The control plane's current generation, served to agents that start
        (control/genserver.py), on the core's backbone address."""
        if "core" not in {n.name for n in self.topology.hosts}:
            return None
        from lab.agents import core_address
        netpki = self.state_dir / "netpki"
        argv = [self.python, "-m", "control.netcli", "--store", str(self.control_store),
                "serve", "--listen", core_address(self.topology),
                "--cert", str(netpki / "core" / "core.crt"),
                "--key", str(netpki / "core" / "core.key"), "--ca", str(netpki / "ca.crt")]
        return Service("control", self.ns("core"), tuple(argv), self.state_dir,
                       "serving", "control.netcli", LOGSTORE_READY_TIMEOUT)

    def core_services(self) -> list[Service]:
        return [s for s in (self.control_service(), self.logstore_service(),
                            self.prometheus_service()) if s]

    def service_pid(self, service: Service | None) -> int | None:
        return None if service is None else services.running(service, _cmdline, _alive)

    def origin_pid(self) -> int | None:
        """The PID of the lab's origin server, if that process is still ours."""
        return self.service_pid(self.origin_service(self.state_dir / "pki"))

    def _service_up(self, service: Service | None) -> list[str]:
        if service is None or self.service_pid(service) is not None:
            return []
        try:
            pid = services.start(service, _env(), ROOT, _wait_for_line)
        except RuntimeError as e:
            raise LabError(str(e)) from None
        return [f"{service.namespace}: {service.name} started (pid {pid})"]

    def _origin_up(self, pki: Path, make_lab_pki: Callable[..., Path]) -> list[str]:
        o = self.topology.origin
        if o is None or self.origin_pid() is not None:
            return []
        changes = []
        if not (pki / "origin.crt").exists():
            make_lab_pki(pki, {"origin": [o.name]})
            changes.append(f"origin certificate for {o.name} in {pki}")
        return changes + self._service_up(self.origin_service(pki))

    def _network_pki(self) -> tuple[Path, list[str]]:
        """The network's own PKI (control/pki.py): agents, core, Prometheus."""
        from control import pki
        d = self.state_dir / "netpki"
        issued = pki.run(d, pki.plan_from_topology(self.topology_file, LAB_OPERATORS))
        return d, [f"network PKI: {party.path} ({why})" for party, why in issued]

    @property
    def network_file(self) -> Path:
        return self.state_dir / "network.yaml"

    def _network_file(self) -> list[str]:
        """The lab's network config (control/network.py), validated: what
        privedge-net reads to reach the DCs' APIs."""
        from control.network import parse_network
        from lab.agents import network_doc
        doc = network_doc(self.topology, str(self.state_dir / "pki"))
        parse_network(doc, str(self.network_file))   # ConfigError: the lab's own bug
        return self._write(self.network_file, yaml.safe_dump(doc, sort_keys=False))

    def _logstore_up(self, netpki: Path) -> list[str]:
        """The core log store in the core's namespace (before the agents that
        ship to it)."""
        if self.logstore_service() is None:
            return []
        from core.config import core_config_dict
        from core.crypto import init_master_key
        from lab.agents import CORE_PORT, CORE_REGION, core_address
        d = self.state_dir / "core"
        # The master key lives outside the store's data directory (the store
        # refuses otherwise): whoever copies the data does not get the key.
        secrets_dir = self.state_dir / "core-secrets"
        secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        master = secrets_dir / "master.key"
        changes = []
        if not master.exists():
            init_master_key(master)
            changes.append(f"core master key {master}")
        cfg = core_config_dict(
            [{"name": z.name, "region": z.region} for z in self.topology.zones],
            listen=core_address(self.topology), port=CORE_PORT, region=CORE_REGION,
            cert=netpki / "core" / "core.crt", key=netpki / "core" / "core.key",
            ca=netpki / "ca.crt", data_dir=d / "data", master_key=master)
        changes += self._write(d / "core.yaml", yaml.safe_dump(cfg, sort_keys=False))
        return changes + self._service_up(self.logstore_service())

    def _write(self, path: Path, text: str) -> list[str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.read_text() == text:
            return []
        path.write_text(text)
        return [f"wrote {path}"]

    def _prometheus_up(self, netpki: Path) -> list[str]:
        """Prometheus in the core's namespace, scraping every DC over mTLS."""
        from core.prometheus import prometheus_config
        service = self.prometheus_service()
        if service is None:
            return []
        d = self.state_dir / "prometheus"
        text = yaml.safe_dump(prometheus_config(self.topology, netpki, PROMETHEUS_INTERVAL),
                              sort_keys=False)
        return self._write(d / "prometheus.yml", text) + self._service_up(service)

    def stop_service(self, service: Service) -> int | None:
        """Stop one of the lab's servers (a core outage, say); its PID or None."""
        pid = self.service_pid(service)
        if pid is not None:
            _terminate(pid, lambda: self.service_pid(service) == pid)
        return pid

    def start_service(self, service: Service) -> list[str]:
        """Start it again (the lab's configs are in place from up)."""
        return self._service_up(service)

    def _services_down(self, removed: list[str]) -> None:
        for service in (*self.core_services(), self.origin_service(self.state_dir / "pki")):
            if service is not None and (pid := self.stop_service(service)) is not None:
                removed.append(f"{service.name} (pid {pid})")

    def restart_agent(self, dc: str) -> list[str]:
        """Stop a DC's agent (its programs stay attached) and start it again:
        the new one adopts the pins and re-attaches what is missing."""
        pid = self.agent_pid(dc)
        if pid is not None:
            self._stop_agent(dc, pid)
        return self.up(agents=True)

    def _remove_state(self, dcs: Sequence[str]) -> None:
        """The whole state dir when it is the lab's own (the default place,
        or recorded as this lab's); in a directory the user named, only
        what the lab writes there, so `--state-dir ~` cannot lose a home."""
        own = (self.state_dir.parent == STATE_ROOT
               or self._recorded().get("prefix") == self.prefix)
        if own:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            return
        for name in ("pki", *dcs, *self.topology.dc_names()):
            shutil.rmtree(self.state_dir / name, ignore_errors=True)
        for name in ("lab.json", "topology.yaml", ".lock"):
            (self.state_dir / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.state_dir.rmdir()  # only if nothing else is in it

    def stop_agent(self, dc: str) -> int | None:
        """Stop a DC's agent (a DC down, say); its programs stay attached.
        `up` starts it again. Its PID, or None if it was not running."""
        pid = self.agent_pid(dc)
        if pid is not None:
            self._stop_agent(dc, pid)
        return pid

    def _stop_agent(self, dc: str, pid: int) -> None:
        _terminate(pid, lambda: self._is_agent(pid, dc), self._procs.pop(dc, None))

    def _strays(self, names: Sequence[str]) -> dict[int, str]:
        """Agents (agent.daemon) running inside our namespaces without a
        record, e.g. after the state dir was lost: PID -> namespace."""
        inodes = {}
        for name in names:
            with contextlib.suppress(OSError):
                st = os.stat(f"/run/netns/{name}")
                inodes[(st.st_dev, st.st_ino)] = name
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                st = os.stat(entry / "ns" / "net")
            except OSError:
                continue
            name = inodes.get((st.st_dev, st.st_ino))
            if name and "agent.daemon" in _cmdline(int(entry.name)) and _alive(int(entry.name)):
                found[int(entry.name)] = name
        return found

    def _detach(self, dc: str, removed: list[str], errors: list[str]) -> None:
        bpffs, run_dir = self.bpffs(dc), self.dc_dir(dc) / "run"
        if netns.exists(self.ns(dc)) and (os.path.exists(bpffs) or run_dir.exists()):
            for seg in (self.topology.public, self.topology.backbone):
                r = subprocess.run(
                    [self.python, "-m", "agent.daemon", "detach", seg.ifname, "--netns",
                     self.ns(dc), "--bpffs", bpffs, "--run-dir", str(run_dir)],
                    capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env())
                if r.returncode != 0:
                    errors.append(f"detach {seg.ifname} in {self.ns(dc)}: {r.stderr.strip()}")
        if os.path.lexists(bpffs):
            shutil.rmtree(bpffs, ignore_errors=True)
            removed.append(bpffs)

    # -- down

    def down(self) -> dict:
        """Remove everything up() made, whatever state it is in."""
        _require_root()
        with self._locked():
            return self._down()

    def _down(self) -> dict:
        removed: list[str] = []
        errors: list[str] = []
        rec = self._recorded()
        names = [n for n in dict.fromkeys([*self.node_namespaces, *rec.get("namespaces", []),
                                           *self.switch_namespaces])
                 if n.startswith(self.prefix)]
        # Namespaces of the same name made by something else (the demo's
        # el-client and el-dus) are left alone, with their processes.
        foreign = {n: f for n in names if (f := self._foreign(n))}
        errors += [f"left {n} alone: not made by this lab (it has {', '.join(f)})"
                   for n, f in foreign.items()]
        names = [n for n in names if n not in foreign]
        dcs = [dc for dc in dict.fromkeys([*self.topology.dc_names(), *rec.get("dcs", [])])
               if self.ns(dc) not in foreign]
        for dc in dcs:
            pid = self.agent_pid(dc)
            if pid is not None:
                self._stop_agent(dc, pid)
                removed.append(f"agent of {dc} (pid {pid})")
        for pid, name in self._strays(names).items():
            dc = name.removeprefix(self.prefix)
            if "agent.daemon" in _cmdline(pid):
                _terminate(pid, lambda pid=pid: _alive(pid) and "agent.daemon" in _cmdline(pid))
                removed.append(f"unrecorded agent in {name} (pid {pid}, {dc})")
        self._services_down(removed)
        for dc in dcs:
            self._detach(dc, removed, errors)
        for name in names:      # hosts first: their veths go with them
            if netns.exists(name):
                netns.delete(name)
                removed.append(f"namespace {name}")
        if self.state_dir.exists():
            self._remove_state(dcs)
            removed.append(str(self.state_dir))
        if self.state_dir.parent == STATE_ROOT:
            with contextlib.suppress(OSError):
                STATE_ROOT.rmdir()                  # if no other lab is there
        left = [n for n in names if netns.exists(n)]
        if left:
            errors.append(f"namespaces still there: {', '.join(left)}")
        if errors:
            raise LabError("down: " + "; ".join(errors))
        return {"removed": removed}

    # -- nouns and verbs on a running lab

    def status(self) -> dict:
        """What is there: per namespace, addresses, anycast routes, agents."""
        _require_root()
        existing = set(pyroute2_netns.listnetns())
        out: dict = {"prefix": self.prefix, "state_dir": str(self.state_dir),
                     "up": all(n in existing for n in self.namespaces),
                     "namespaces": {}, "anycast": {}}
        for seg in self.topology.segments:
            name = self.ns(seg.name)
            info: dict = {"kind": "switch", "exists": name in existing}
            if info["exists"]:
                with NetNS(name) as ns:
                    br = ns.link_lookup(ifname="br0")
                    info["ports"] = sorted(
                        lk.get_attr("IFLA_IFNAME") for lk in ns.get_links()
                        if br and lk.get_attr("IFLA_MASTER") == br[0])
            out["namespaces"][name] = info
        for node in self.topology.nodes:
            name = self.ns(node.name)
            info = {"kind": node.kind, "exists": name in existing}
            if info["exists"]:
                with NetNS(name) as ns:
                    info["addresses"] = self._addresses(ns)
                    if node.is_dc:
                        lo = ns.link_lookup(ifname="lo")[0]
                        have = {a for a, _ in _addresses(ns, lo)}
                        v6 = self.topology.anycast.v6
                        info["anycast_local"] = {
                            "v4": self.topology.anycast.loopback_v4.split("/")[0] in have,
                            "v6": v6 is None or any(r["type"] == RTN_LOCAL
                                                    for r in _routes(ns, v6, TABLE_LOCAL))}
                    else:
                        gws = anycast_gateways(ns, self.topology)
                        routes = {k: {"via": gw, "dc": self.topology.dc_by_public_address(gw)}
                                  for k, gw in gws.items() if gw}
                        info["anycast_routes"] = routes
                        if routes:
                            out["anycast"][node.name] = {k: r["dc"] for k, r in routes.items()}
            if node.is_dc:
                pid = self.agent_pid(node.name)
                info["agent"] = {"pid": pid, "alive": pid is not None}
            out["namespaces"][name] = info
        out["services"] = {svc.name: self.service_pid(svc)
                           for svc in (self.origin_service(self.state_dir / "pki"),
                                       *self.core_services()) if svc is not None}
        return out

    @staticmethod
    def _addresses(ns) -> dict[str, list[str]]:
        names = {lk["index"]: lk.get_attr("IFLA_IFNAME") for lk in ns.get_links()}
        out: dict[str, list[str]] = {}
        for a in ns.get_addr():
            ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
            if ip.is_loopback or ip.is_link_local:
                continue
            out.setdefault(names.get(a["index"], str(a["index"])), []).append(
                f"{ip}/{a['prefixlen']}")
        return out

    def move(self, host: str, dc: str) -> list[str]:
        """Point a host's anycast routes at another DC (v4 and v6): `move
        client fra` is Katerina driving from Cologne to Frankfurt. Kept in
        the state, so a later `up` does not move her back."""
        _require_root()
        node = self.topology.node(host)
        if node.is_dc:
            raise LabError(f"{host} is a DC; only hosts route to the anycast prefixes")
        self.topology.dc(dc)
        if not netns.exists(self.ns(host)):
            raise LabError(f"namespace {self.ns(host)} does not exist: python -m lab up first")
        changes: list[str] = []
        with self._locked():
            with NetNS(self.ns(host)) as ns:
                set_anycast_routes(ns, self.topology, node, dc, changes)
            rec = self._recorded() or {"prefix": self.prefix, "namespaces": self.namespaces,
                                       "dcs": list(self.topology.dc_names())}
            moves = rec.setdefault("moves", {})
            if dc == node.anycast_via:
                moves.pop(host, None)
            else:
                moves[host] = dc
            self._write_record(rec)
        return changes

    def exec(self, host: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run argv in a lab namespace (a host, DC or segment name) through
        nsenter --net, which keeps the host's mounts (/sys/fs/bpf included)."""
        names = [n.name for n in self.topology.nodes] + [s.name for s in self.topology.segments]
        if host not in names:
            raise LabError(f"no host, DC or segment named {host!r} (defined: {', '.join(names)})")
        if not netns.exists(self.ns(host)):
            raise LabError(f"namespace {self.ns(host)} does not exist: python -m lab up first")
        return subprocess.run(netns.nsenter(self.ns(host), list(argv)), **kw)
