"""Bring an interface under protection, keep it there, and let it go.

start()   first time: build the pinned state in a staging directory
          (outer maps, root and edge programs, generation 1), rename it
          into place, then attach the root program in native mode.
          Later: adopt the pins, load the edge program afresh and swap it
          into the program array (one update, no gap), apply the config.
detach()  remove the program (only ours), the pins and the run directory.

Every step is reported by name through `phase`, so a failure says where.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from agent import abi, catalog, xdp_link
from agent import libbpf as lb
from agent.apply import apply_generation
from agent.backbone import check_mtu, prepare_backbone, release_backbone
from agent.bcc_build import load, pin_program
from agent.config import Capacity, NodeConfig
from agent.node import PROG_EDGE, PROG_ROOT, Node, NodeError, ensure_bpffs
from agent.rules import NetworkShare, ruleset_from_config

Phase = Callable[[str, str], None]


def _quiet(name: str, detail: str) -> None:
    pass


@dataclass
class Started:
    node: Node
    created: bool
    edge_tag: str
    generation: int


def enter_netns(name: str | None) -> None:
    """Move this process into a named network namespace (mounts stay ours,
    so /sys/fs/bpf is still the host's bpffs)."""
    if not name:
        return
    from pyroute2 import netns

    try:
        netns.setns(name, flags=0)
    except OSError as e:
        raise NodeError(f"cannot enter network namespace {name!r}: {e.strerror}") from None


def set_edge_program(node: Node, prog_fd: int) -> None:
    lb.map_update(node.fd("progs"), ctypes.c_uint32(abi.ProgSlot.EDGE),
                  ctypes.c_uint32(prog_fd), what="pe_progs slot EDGE")
    pin_program(prog_fd, node.prog_path(PROG_EDGE))


def ensure_state(node: Node, cap: Capacity, phase: Phase = _quiet) -> bool:
    """Create the pinned state if missing (staged, then renamed); open it.

    Returns True when it was created. The caller holds the node's lock.
    """
    created = not node.exists
    if created:
        phase("state", f"creating {node.pin_dir}")
        staging = node.staging_dir()
        try:
            node.create_outers(staging, cap)
            phase("compile", "root.c")
            root = load("root", staging, cap)
            pin_program(root.fd, str(staging / PROG_ROOT))
            root.release()
            node.commit(staging)
        except BaseException:
            if staging.exists():
                shutil.rmtree(staging)
            raise
    else:
        phase("state", f"adopting {node.pin_dir}")
        added = node.add_missing_maps(cap)
        if added:
            phase("state", f"added the maps of this version: {', '.join(added)}")
    node.open()
    return created


def upgrade_edge(node: Node, cap: Capacity, phase: Phase = _quiet,
                 extra_cflags: tuple[str, ...] = ()) -> str:
    """Load the edge program afresh and swap it into the program array.

    The swap is one map update: packets run the old program until it and
    the new one after, never nothing. Returns the new program's tag.
    """
    phase("compile", "edge.c")
    edge = load("edge", node.pin_dir, cap, extra_cflags)
    phase("upgrade", f"edge program {edge.tag} into pe_progs")
    set_edge_program(node, edge.fd)
    edge.release()
    return edge.tag


def start(cfg: NodeConfig, phase: Phase = _quiet,
          network: NetworkShare | None = None) -> Started:
    """Protect cfg.interface; idempotent. The caller may close the node.
    `network`: the network generation's share, applied over the config's."""
    phase("netns", cfg.netns or "(current)")
    enter_netns(cfg.netns)
    phase("interface", cfg.interface)
    xdp_link.ifindex(cfg.interface)  # fails early, by name, if it is missing
    backbone = None
    if cfg.steering:
        phase("steering", f"dc {cfg.steering.dc} (region {cfg.steering.region}), "
                          f"backbone {cfg.steering.backbone_interface}")
        backbone = prepare_backbone(cfg.steering.backbone_interface, phase)
        if cfg.public:
            check_mtu(cfg.interface, cfg.steering.backbone_interface, phase)
    phase("bpffs", "/sys/fs/bpf")
    ensure_bpffs()
    node = Node(cfg.interface, cfg.bpffs, cfg.run_dir)
    with node.lock():
        created = ensure_state(node, cfg.capacity, phase)
        tag = upgrade_edge(node, cfg.capacity, phase)
        phase("rules", "applying the config as a new generation"
                       + (" with the network's lists, rules and steering" if network else ""))
        keep = catalog.load(node.run_dir)
        report = apply_generation(node, ruleset_from_config(cfg, keep, backbone, network))
        phase("rules", f"generation {report['generation']} live in {report['total_s']}s")
        attach_root(node, phase)
    return Started(node, created, tag, int(report["generation"]))


def attach_root(node: Node, phase: Phase = _quiet) -> None:
    """Attach the pinned root program unless it already is."""
    root_fd = lb.obj_get(node.prog_path(PROG_ROOT))
    try:
        root_id = lb.prog_info(root_fd).id
        cur = xdp_link.attached(node.ifname)
        if cur is not None and cur.prog_id == root_id:
            phase("attach", f"root program {root_id} already attached ({cur.mode})")
            return
        if cur is not None:
            raise NodeError(f"{node.ifname}: another XDP program (id {cur.prog_id}) is "
                            "attached; privedge will not replace it")
        xdp_link.attach(node.ifname, root_fd)
        phase("attach", f"root program {root_id} attached natively to {node.ifname}")
    finally:
        os.close(root_fd)


def detach(ifname: str, bpffs_root: str, run_root: str, netns: str | None = None,
           phase: Phase = _quiet) -> bool:
    """Remove our XDP program, the pins and the run directory. True if anything was there."""
    enter_netns(netns)
    node = Node(ifname, bpffs_root, run_root)
    found = node.exists or node.run_dir.exists()
    with node.lock():
        root_path = node.prog_path(PROG_ROOT)
        if os.path.exists(root_path):
            root_fd = lb.obj_get(root_path)
            try:
                cur = xdp_link.attached(ifname) if _has_link(ifname) else None
                if cur is not None and cur.prog_id == lb.prog_info(root_fd).id:
                    xdp_link.detach(ifname, root_fd)
                    phase("detach", f"XDP program removed from {ifname}")
            finally:
                os.close(root_fd)
        node.remove()
        phase("detach", f"removed {node.pin_dir} and {node.run_dir}")
    if release_backbone(ifname):
        phase("detach", f"removed the forwarding guard of backbone link {ifname}")
    return found


def _has_link(ifname: str) -> bool:
    try:
        xdp_link.ifindex(ifname)
        return True
    except xdp_link.LinkError:
        return False
