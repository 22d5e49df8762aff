"""A node's pinned state and programs, built as the agent builds them
(agent/loader.py) but attached to no interface.

The BPF test tier runs packets through its root program with
BPF_PROG_TEST_RUN (the tail call included); the benchmarks measure it and
attach it to veths themselves. Each instance pins into its own directory.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from dataclasses import dataclass

from agent import abi
from agent import libbpf as lb
from agent.apply import apply_changes, apply_generation
from agent.config import Capacity, NodeConfig
from agent.loader import ensure_state, upgrade_edge
from agent.node import PROG_ROOT, Node, ensure_bpffs
from agent.rules import RuleSet, ruleset_from_config


@dataclass(frozen=True)
class Run:
    verdict: int
    data: bytes


class StandaloneNode:
    """Pinned state and programs like the agent's, attached to no interface."""

    def __init__(self, label: str, cap: Capacity | None = None, ifname: str = "tr0") -> None:
        ensure_bpffs()
        self.bpffs = f"/sys/fs/bpf/pe-{label}-{os.getpid()}"
        self.run_root = tempfile.mkdtemp(prefix=f"pe-{label}-")
        self.cap = cap or Capacity()
        self.ifname = ifname
        self.node = Node(ifname, self.bpffs, self.run_root)
        with self.node.lock():
            ensure_state(self.node, self.cap)
            self.edge_tag = upgrade_edge(self.node, self.cap)
        self.root_fd = lb.obj_get(self.node.prog_path(PROG_ROOT))

    # rules ---------------------------------------------------------------------

    def base_rules(self, **cfg) -> RuleSet:
        """The config's defaults, but no bogon check (callers use TEST-NET sources)."""
        return ruleset_from_config(NodeConfig(
            interface=self.ifname, **{"role": "backbone", "capacity": self.cap, **cfg}))

    def apply(self, rules: RuleSet) -> dict:
        with self.node.lock():
            return apply_generation(self.node, rules)

    def change(self, rules: RuleSet) -> dict:
        with self.node.lock():
            return apply_changes(self.node, rules)

    # packets ----------------------------------------------------------------------

    def run(self, frame: bytes, repeat: int = 1) -> Run:
        r = lb.prog_test_run(self.root_fd, frame, repeat=repeat)
        return Run(r.retval, r.data)

    def counters(self) -> list[tuple[int, int]]:
        return [(c.packets, c.bytes) for c in self.node.counters()]

    def clear_rate_state(self) -> None:
        fd = self.node.fd("rl")
        for key in lb.map_keys(fd, ctypes.sizeof(abi.RlKey)):
            lb.map_delete(fd, key)

    def close(self) -> None:
        os.close(self.root_fd)
        self.node.remove()
        shutil.rmtree(self.bpffs, ignore_errors=True)
        shutil.rmtree(self.run_root, ignore_errors=True)
