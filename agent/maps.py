"""Every pinned map of an interface: names, specs, and opening with checks.

bpf/include/pe_maps.h declares them for the programs; this module is the
Python side: which maps bcc creates (PLAIN), which outer map-in-maps the
agent creates with an inner template (OUTERS), and the spec of the inner
maps each generation gets. Key and value types come from agent/abi.py, so
a layout is never written down twice.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from agent import abi
from agent import libbpf as lb
from agent.config import Capacity

V = f"_v{abi.LAYOUT_VERSION}"


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: lb.MapType
    key: type
    value: type
    flags: int = 0
    entries: int | None = None  # None: sized per generation or from config

    @property
    def key_size(self) -> int:
        return ctypes.sizeof(self.key)

    @property
    def value_size(self) -> int:
        return ctypes.sizeof(self.value)


u32, u64 = ctypes.c_uint32, ctypes.c_uint64
MMAP = 1 << 10  # BPF_F_MMAPABLE: page-aligned values, so a 64-byte bucket is one line
LPM = lb.BPF_F_NO_PREALLOC

# Maps bcc creates from pe_maps.h (entries from there or from -D flags).
PLAIN = {
    "stats": MapSpec(f"pe_stats{V}", lb.MapType.PERCPU_ARRAY, u32, abi.Counter, 0,
                     abi.REASON_MAX),
    "active": MapSpec(f"pe_active{V}", lb.MapType.ARRAY, u32, abi.Active, 0, 1),
    "rl": MapSpec(f"pe_rl{V}", lb.MapType.LRU_HASH, abi.RlKey, abi.RlVal),
    "progs": MapSpec(f"pe_progs{V}", lb.MapType.PROG_ARRAY, u32, u32, 0, abi.PROG_SLOTS),
    "steered": MapSpec(f"pe_steered{V}", lb.MapType.PERCPU_ARRAY, u32, abi.Counter, 0,
                       abi.DCS_MAX),
}

# Inner maps of a generation, by kind; each kind has one outer map.
INNER = {
    "params": MapSpec(f"pe_params{V}", lb.MapType.ARRAY, u32, abi.Params, 0, 1),
    "d4sum": MapSpec(f"pe_d4sum{V}", lb.MapType.ARRAY, u32, u64, MMAP, abi.SUM_WORDS),
    # Sized once per node from capacity.deny4_exact: a fixed size lets the
    # verifier inline its lookups (BPF_F_INNER_MAP would forbid that).
    "d4exact": MapSpec(f"pe_d4exact{V}", lb.MapType.ARRAY, u32, abi.ExactBucket, MMAP),
    "d4lpm": MapSpec(f"pe_d4lpm{V}", lb.MapType.LPM_TRIE, abi.Lpm4Key, abi.LpmVal, LPM),
    "d6lpm": MapSpec(f"pe_d6lpm{V}", lb.MapType.LPM_TRIE, abi.Lpm6Key, abi.LpmVal, LPM),
    "a4lpm": MapSpec(f"pe_a4lpm{V}", lb.MapType.LPM_TRIE, abi.Lpm4Key, abi.LpmVal, LPM),
    "a6lpm": MapSpec(f"pe_a6lpm{V}", lb.MapType.LPM_TRIE, abi.Lpm6Key, abi.LpmVal, LPM),
    "b4lpm": MapSpec(f"pe_b4lpm{V}", lb.MapType.LPM_TRIE, abi.Lpm4Key, abi.LpmVal, LPM),
    "b6lpm": MapSpec(f"pe_b6lpm{V}", lb.MapType.LPM_TRIE, abi.Lpm6Key, abi.LpmVal, LPM),
    "l4ports": MapSpec(f"pe_l4ports{V}", lb.MapType.ARRAY, u32, abi.L4Ports, MMAP,
                       len(abi.L4Class) * abi.L4_PORTS),
    "steer": MapSpec(f"pe_steer{V}", lb.MapType.ARRAY, u32, abi.Steer, 0, 1),
    "dcs": MapSpec(f"pe_dcs{V}", lb.MapType.ARRAY, u32, abi.Dc, 0, abi.DCS_MAX),
    "svc4": MapSpec(f"pe_svc4{V}", lb.MapType.HASH, u32, abi.Svc),
    "svc6": MapSpec(f"pe_svc6{V}", lb.MapType.HASH, abi.Addr6, abi.Svc),
    # Sized once per node from capacity.maglev_slots, like d4exact.
    "maglev": MapSpec(f"pe_maglev{V}", lb.MapType.ARRAY, u32, u64, MMAP),
}

# The outer ARRAY_OF_MAPS of each kind, named like its inner maps.
OUTERS = {kind: MapSpec(spec.name, lb.MapType.ARRAY_OF_MAPS, u32, u32, 0, abi.GEN_SLOTS)
          for kind, spec in INNER.items()}


def exact_buckets(capacity: int) -> int:
    """Buckets of the exact table for `capacity` addresses: at most half full
    (8 of 16 slots), a power of two, at least 64."""
    want = max(64, 1 << max(0, (max(1, -(-capacity // 8)) - 1).bit_length()))
    return min(want, 1 << (32 - abi.EXACT_MIN_SHIFT))


def inner_entries(kind: str, cap: Capacity) -> int:
    """max_entries of an inner map: fixed, or from the node's capacity."""
    spec = INNER[kind]
    if spec.entries is not None:
        return spec.entries
    return {
        "d4exact": exact_buckets(cap.deny4_exact),
        "d4lpm": cap.deny4_lpm,
        "d6lpm": cap.deny6,
        "a4lpm": cap.allow,
        "a6lpm": cap.allow,
        "b4lpm": cap.bogons,
        "b6lpm": cap.bogons,
        "svc4": cap.services,
        "svc6": cap.services,
        "maglev": -(-abi.REGIONS_MAX * cap.maglev_slots // abi.MAGLEV_PER_WORD),
    }[kind]


def create_inner(kind: str, entries: int) -> int:
    spec = INNER[kind]
    return lb.map_create(spec.map_type, spec.name, spec.key_size, spec.value_size, entries,
                         spec.flags)


class LayoutError(RuntimeError):
    """A pinned map does not have the layout this agent was built for."""


def check_layout(fd: int, spec: MapSpec, path: str) -> lb.MapInfo:
    """Refuse a pinned map whose type or sizes differ from the spec, by name."""
    info = lb.map_info(fd)
    want_value = spec.value_size
    problems = []
    if info.type != spec.map_type:
        problems.append(f"type {info.type} instead of {spec.map_type.name}")
    if info.key_size != spec.key_size:
        problems.append(f"key {info.key_size} bytes instead of {spec.key_size} "
                        f"({getattr(spec.key, '_c_name_', spec.key.__name__)})")
    if info.value_size != want_value:
        problems.append(f"value {info.value_size} bytes instead of {want_value} "
                        f"({getattr(spec.value, '_c_name_', spec.value.__name__)})")
    if problems:
        raise LayoutError(f"{path}: {'; '.join(problems)}. The pin is from another layout: "
                          "run `privedge-agent detach` and start again.")
    return info


class Fds:
    """Owned file descriptors, closed together."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def __getitem__(self, key: str) -> int:
        return self._fds[key]

    def __contains__(self, key: str) -> bool:
        return key in self._fds

    def add(self, key: str, fd: int) -> int:
        old = self._fds.get(key)
        if old is not None and old != fd:
            os.close(old)
        self._fds[key] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
