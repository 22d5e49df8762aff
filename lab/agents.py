"""The agent configs of a lab DC, generated from the topology.

Pure functions returning plain dicts (what goes into the YAML files), so
they are tested without root. Each DC gets one node config per link (the
public edge and the backbone, both carrying the same `steering` section)
and one `serve` config for the L7 side:

    <state>/<dc>/inet0.yaml   role public:   bogon filter, denylist, steering
    <state>/<dc>/bb0.yaml     role backbone: decapsulation, steering
    <state>/<dc>/serve.yaml   TLS listener: zones, certificates, status socket
    <state>/<dc>/metrics.yaml /metrics over mTLS on the backbone, RTT probes of
                              the other DCs (with the network PKI, control/pki.py)
    <state>/<dc>/logs.yaml    customer logs of every zone and the operations sample,
                              to the core's log store over mTLS (agent/logs)
    <state>/<dc>/api.yaml     the operators' API on the backbone address (agent/api.py),
                              its audit log and network generations beside the
                              configs; the core's control plane to pull from at start

The namespace lab (lab/cluster.py) and the VMs (`python -m lab generate`)
both call `dc_configs`; only interface names and paths differ.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from control.roles import CONTROL_PORT
from core.prometheus import METRICS_PORT
from lab.topology import Topology, Zone
from lab.twons import LAB_BOGONS

DENY4_EXACT = 131_072       # room for bench-control's 100k list (90% /32); small maps load fast
LAB_CACHE_MEMORY = 4 << 20
RTT_INTERVAL = 2.0          # seconds: a lab run is short
CORE_PORT = 8443            # the core's log store (core/server.py)
CORE_REGION = "eu"          # the lab's one core is in Europe: EU zones may log there
LOG_BATCH_SECONDS = 1.0     # a lab run is short: records reach the core within a second


@dataclass(frozen=True)
class DcPaths:
    """Where one DC's agent keeps its state, and its interface names."""

    ifnames: dict[str, str]          # segment -> interface name
    netns: str | None                # None: the agent runs in the host's own network
    bpffs: str
    run_dir: str
    certs: str
    status_socket: str
    cache_dir: str                   # encrypted cache spill (nothing else is written)
    netpki: str | None = None        # the network PKI (privedge-pki); None: no metrics


def lab_paths(dc: str, prefix: str, state_dir: Path, topology: Topology) -> DcPaths:
    """Paths of a DC in the namespace lab (interfaces named <segment>0)."""
    d = state_dir / dc
    return DcPaths(ifnames={s.name: s.ifname for s in topology.segments}, netns=f"{prefix}{dc}",
                   bpffs=f"/sys/fs/bpf/privedge-{prefix}{dc}", run_dir=str(d / "run"),
                   certs=str(state_dir / "pki"), status_socket=str(d / "l7.sock"),
                   cache_dir=str(d / "cache"), netpki=str(state_dir / "netpki"))


def steering(topology: Topology, dc: str, backbone_ifname: str) -> dict:
    """The steering section: who this DC is, every DC, every dedicated IP."""
    me = topology.dc(dc)
    bb = topology.backbone.name
    return {
        "dc": me.name,
        "region": me.region,
        "backbone_interface": backbone_ifname,
        "backbone_address": str(me.link(bb).v4),
        "dcs": [{"name": d.name, "region": d.region, "backbone": str(d.link(bb).v4)}
                for d in topology.dcs],
        "services": [{"address": str(s.address), "region": s.region, "zone": s.zone}
                     for s in topology.services()],
    }


def link_config(topology: Topology, dc: str, segment: str, paths: DcPaths) -> dict:
    """The node config (agent/config.py) of one DC link."""
    seg = topology.segment(segment)
    topology.dc(dc)
    cfg: dict = {
        "interface": paths.ifnames[seg.name],
        "role": seg.role,
    }
    if paths.netns is not None:
        cfg["netns"] = paths.netns
    cfg.update({
        "bpffs": paths.bpffs,
        "run_dir": paths.run_dir,
        "bogons": list(LAB_BOGONS),
        "deny": {"prefixes": list(topology.deny)},
        "capacity": {"maglev_slots": topology.maglev_slots, "deny4_exact": DENY4_EXACT},
        "steering": steering(topology, dc, paths.ifnames[topology.backbone.name]),
    })
    return cfg


def _zone(z: Zone, certs: str) -> dict:
    out: dict = {"name": z.name, "hostnames": list(z.hostnames)}
    if z.region is not None:
        out["region"] = z.region
    out["addresses"] = [str(a) for a in z.addresses]
    out.update(copy.deepcopy(dict(z.l7)))
    origin = out.get("origin")
    # The lab's origin has a certificate from the lab CA: trust that CA.
    if isinstance(origin, dict) and str(origin.get("url", "")).startswith("https:") \
            and "ca_file" not in origin and origin.get("verify", True):
        origin["ca_file"] = str(Path(certs) / "ca.crt")
    return out


def serve_config(topology: Topology, dc: str, paths: DcPaths, port: int = 443,
                 plain_port: int = 80) -> dict:
    """The L7 listeners of a DC (HTTPS, and plain HTTP that redirects to it):
    every zone; the agent's regional guard decides."""
    me = topology.dc(dc)
    return {
        "dc": me.name,
        "region": me.region,
        "listen": ["0.0.0.0", "::"],
        "port": port,
        "plain_port": plain_port,
        "certs": paths.certs,
        "status_socket": paths.status_socket,
        "unknown_sni": "refuse",
        # A small memory part, so the lab shows objects spilling to disk
        # (encrypted) without needing much traffic.
        "cache_store": {"memory_bytes": LAB_CACHE_MEMORY, "disk_dir": paths.cache_dir},
        "zones": [_zone(z, paths.certs) for z in topology.zones],
    }


def metrics_config(topology: Topology, dc: str, netpki: str) -> dict:
    """/metrics on the DC's backbone address (core's Prometheus scrapes it),
    and RTT probes of every other DC's."""
    bb = topology.backbone.name
    pki = Path(netpki)
    return {
        "listen": str(topology.dc(dc).link(bb).v4),
        "port": METRICS_PORT,
        "cert": str(pki / "agents" / f"{dc}.crt"),
        "key": str(pki / "agents" / f"{dc}.key"),
        "ca": str(pki / "ca.crt"),
        "rtt": {"interval": RTT_INTERVAL, "port": METRICS_PORT,
                "peers": {d.name: str(d.link(bb).v4) for d in topology.dcs if d.name != dc}},
    }


def core_address(topology: Topology) -> str:
    return str(topology.node("core").link(topology.backbone.name).v4)


def logs_config(topology: Topology, dc: str, netpki: str) -> dict:
    """Every zone's customer logs and the 1% sample to the core's log store;
    a regional zone names its region, which the lab's core serves."""
    pki = Path(netpki)
    return {
        "dc": dc,
        "cert": str(pki / "agents" / f"{dc}.crt"),
        "key": str(pki / "agents" / f"{dc}.key"),
        "ca": str(pki / "ca.crt"),
        "cores": {"core": {"url": f"https://{core_address(topology)}:{CORE_PORT}",
                           "tls_name": "core.privedge.internal", "regions": [CORE_REGION]}},
        "default_core": "core",
        "zones": {z.name: ({"log_region": z.region} if z.region else {})
                  for z in topology.zones},
        "batch_seconds": LOG_BATCH_SECONDS,
        "sample": {"rate": 0.01, "core": "core"},
    }


def api_config(topology: Topology, dc: str, netpki: str, audit: str) -> dict:
    """The operators' and control plane's API on the DC's backbone address;
    with a core, where to pull the current generation at start."""
    pki = Path(netpki)
    cfg: dict = {"listen": str(topology.dc(dc).link(topology.backbone.name).v4),
                 "cert": str(pki / "agents" / f"{dc}.crt"),
                 "key": str(pki / "agents" / f"{dc}.key"), "ca": str(pki / "ca.crt"),
                 "audit": audit}
    if any(h.name == "core" for h in topology.hosts):
        cfg["control"] = {"address": core_address(topology), "port": CONTROL_PORT}
    return cfg


def network_doc(topology: Topology, certs: str) -> dict:
    """The lab's network as a network config (control/network.py): what
    privedge-net reads to reach every DC, and what it applies. Its zones
    are the serve configs' (`certs`: the lab CA that the origin's
    certificate is from), its lists the link configs', so applying it as
    it is changes nothing."""
    bb, inet = topology.backbone.name, topology.public.name
    dcs = {}
    for d in topology.dcs:
        pub = d.link(inet)
        dcs[d.name] = {"region": d.region, "backbone": str(d.link(bb).v4),
                       "public": [str(a) for a in (pub.v4, pub.v6) if a is not None]}
    return {"regions": list(topology.regions), "dcs": dcs,
            "zones": [_zone(z, certs) for z in topology.zones],
            "deny": {"prefixes": list(topology.deny)}}


def dc_configs(topology: Topology, dc: str, paths: DcPaths) -> dict[str, dict]:
    """File name -> content: one node config per link, named after the
    namespace lab's interface (inet0.yaml, bb0.yaml), then serve.yaml, and
    metrics.yaml and logs.yaml when there is a network PKI."""
    out = {f"{seg.ifname}.yaml": link_config(topology, dc, seg.name, paths)
           for seg in (topology.public, topology.backbone)}
    out["serve.yaml"] = serve_config(topology, dc, paths)
    if paths.netpki is not None:
        out["metrics.yaml"] = metrics_config(topology, dc, paths.netpki)
        if any(h.name == "core" for h in topology.hosts):
            out["logs.yaml"] = logs_config(topology, dc, paths.netpki)
        out["api.yaml"] = api_config(topology, dc, paths.netpki,
                                     str(Path(paths.run_dir).parent / "audit.jsonl"))
    return out


def pki_zones(topology: Topology, dc: str | None = None) -> dict[str, list[str]]:
    """Zone name -> host names, what lab.certs.make_lab_pki issues certificates
    for: every zone for the shared PKI of the namespace lab, or only the zones
    `dc` may serve (global ones and its region's) for a DC of its own (a VM),
    so a regional zone's key never exists on a machine outside its region."""
    region = topology.dc(dc).region if dc else None
    return {z.name: list(z.hostnames) for z in topology.zones
            if dc is None or z.region is None or z.region == region}


def pki_missing(topology: Topology, certs: Path, dc: str | None = None) -> bool:
    """True if the CA or a zone's certificate is not in `certs` yet
    (make_lab_pki then issues them, reusing a CA that is there)."""
    names = ["ca.crt", *(f"{z}.crt" for z in pki_zones(topology, dc))]
    return not all((certs / n).exists() for n in names)


def render(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def write_configs(directory: Path, configs: dict[str, dict]) -> list[str]:
    """Write the files that differ; return the names written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cfg in configs.items():
        path = directory / name
        text = render(cfg)
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
            written.append(name)
    return written
