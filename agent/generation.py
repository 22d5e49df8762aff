"""Build a rule generation in new inner maps and swap it in atomically.

    1 create and fill new inner maps (arrays by mmap, tries by batch update)
    2 point the idle slot of every outer map at them
    3 flip pe_active to the idle slot: one 16-byte array write
    4 wait one RCU grace period (membarrier), so no packet still runs
      with the old slot's maps
    5 empty the old slot; maps no slot references are freed

A packet reads the slot once (filter.h), so it sees all of the old rules or
all of the new, never a mix. Nothing live is cleared and refilled: a
failure before step 3 drops the new maps and leaves the live generation as
it was. Kinds that did not change can be carried over by reference.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from agent import abi
from agent import libbpf as lb
from agent.compile import Compiled, Lpm4, Lpm6
from agent.config import Capacity
from agent.maps import INNER, create_inner, inner_entries
from agent.node import Node

KINDS = tuple(INNER)
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_MEMBARRIER = 324  # x86_64
_MEMBARRIER_CMD_GLOBAL = 1


def synchronize_rcu() -> None:
    """Wait for an RCU grace period: every XDP run that started before has ended.

    membarrier(MEMBARRIER_CMD_GLOBAL) is synchronize_rcu() in the kernel.
    Kernels with nohz_full refuse it; there a pause far longer than any
    program run stands in.
    """
    if _libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
        time.sleep(0.05)


# The kernel waits for an RCU grace period after every update or delete of
# a map-in-map element made by a syscall (maybe_wait_bpf_programs), ~10 ms
# here. A swap writes one slot of each outer map, then clears the old one:
# done one by one that is 2 x 15 waits. Issued together, from threads (the
# syscall releases the GIL), the waits overlap and share grace periods.
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def each_kind(op: Callable[[str], None]) -> None:
    """op(kind) for every kind at once; raises the first failure after all ended."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=len(KINDS), thread_name_prefix="pe-swap")
    futures = [_pool.submit(op, kind) for kind in KINDS]
    failures = [e for f in futures if (e := f.exception()) is not None]
    if failures:
        raise failures[0]


# -- filling maps ------------------------------------------------------------------


def mapped(fd: int, entries: int, value_size: int, write: bool) -> mmap.mmap:
    """The values of an mmapable array map, shared with the kernel."""
    length = entries * value_size
    length += -length % mmap.PAGESIZE
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
    return mmap.mmap(fd, length, mmap.MAP_SHARED, prot)


def write_array(fd: int, data: np.ndarray, value_size: int, entries: int) -> None:
    """Copy raw values into a (new, not yet live) mmapable array map."""
    buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    with mapped(fd, entries, value_size, write=True) as mm:
        mm[: len(buf)] = buf.tobytes()


def lpm4_arrays(t: Lpm4) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(t), abi.LPM4_KEY_DTYPE)
    keys["prefixlen"], keys["addr"] = t.plen, t.addr
    vals = np.zeros(len(t), abi.LPM_VAL_DTYPE)
    vals["expires_ns"] = t.expires_ns
    return keys, vals


def lpm6_arrays(t: Lpm6) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(t), abi.LPM6_KEY_DTYPE)
    keys["prefixlen"], keys["hi"], keys["lo"] = t.plen, t.hi, t.lo
    vals = np.zeros(len(t), abi.LPM_VAL_DTYPE)
    vals["expires_ns"] = t.expires_ns
    return keys, vals


def fill_inner(kind: str, fd: int, c: Compiled) -> None:
    spec = INNER[kind]
    if kind == "params":
        lb.map_update(fd, ctypes.c_uint32(0), c.params, what="pe_params")
    elif kind == "d4sum":
        write_array(fd, c.summary, spec.value_size, abi.SUM_WORDS)
    elif kind == "d4exact":
        write_array(fd, c.exact, spec.value_size, len(c.exact))
    elif kind == "l4ports":
        write_array(fd, c.l4ports, spec.value_size, len(c.l4ports))
    elif kind == "steer":
        lb.map_update(fd, ctypes.c_uint32(0), c.steer.params, what="pe_steer")
    elif kind == "dcs":
        keys = np.arange(abi.DCS_MAX, dtype=np.uint32)
        lb.map_update_batch(fd, keys, c.steer.dcs, len(keys), what=spec.name)
    elif kind == "svc4":
        t = c.steer
        lb.map_update_batch(fd, t.svc4_keys, t.svc4_vals, len(t.svc4_keys), what=spec.name)
    elif kind == "svc6":
        t = c.steer
        lb.map_update_batch(fd, t.svc6_keys, t.svc6_vals, len(t.svc6_keys), what=spec.name)
    elif kind == "maglev":
        write_array(fd, c.steer.maglev, spec.value_size, len(c.steer.maglev) // 8)
    else:
        t = getattr(c, kind)
        keys, vals = lpm4_arrays(t) if isinstance(t, Lpm4) else lpm6_arrays(t)
        lb.map_update_batch(fd, keys, vals, len(keys), what=spec.name)


def build_inner(c: Compiled, cap: Capacity, kinds: tuple[str, ...] = KINDS) -> dict[str, int]:
    """Create and fill new inner maps for `kinds`; the caller owns the fds."""
    fds: dict[str, int] = {}
    try:
        for kind in kinds:
            fds[kind] = create_inner(kind, inner_entries(kind, cap))
            fill_inner(kind, fds[kind], c)
    except BaseException:
        close_all(fds)
        raise
    return fds


def close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


# -- the live generation ------------------------------------------------------------------


def live_inner_fds(node: Node, kinds: tuple[str, ...] = KINDS) -> dict[str, int]:
    """fds of the live slot's inner maps (the outer answers with map ids)."""
    slot = node.active().slot
    fds: dict[str, int] = {}
    try:
        for kind in kinds:
            raw = lb.map_lookup(node.fd(kind), ctypes.c_uint32(slot), 4, what=kind)
            if raw is None:
                raise lb.BpfError(f"find live {kind} map", 2, "no generation installed")
            fds[kind] = lb.map_fd_by_id(int.from_bytes(raw, "little"))
    except BaseException:
        close_all(fds)
        raise
    return fds


def install(node: Node, inner: dict[str, int], generation: int) -> float:
    """Swap a complete set of inner maps in; returns seconds the swap took.

    `inner` must hold every kind. On failure before the flip, the idle slot
    is emptied again and the live generation is untouched.
    """
    missing = set(KINDS) - set(inner)
    if missing:
        raise ValueError(f"generation incomplete, missing {sorted(missing)}")
    t0 = time.perf_counter()
    live = node.active().slot
    idle = 1 - live
    try:
        each_kind(lambda kind: lb.map_update(node.fd(kind), ctypes.c_uint32(idle),
                                             ctypes.c_uint32(inner[kind]),
                                             what=f"{kind} slot {idle}"))
    except BaseException:
        clear_slot(node, idle)
        raise
    node.set_active(idle, generation)
    synchronize_rcu()
    try:
        clear_slot(node, live)
    except lb.BpfError as e:
        # The new generation is live: only memory is held longer. The next
        # swap writes these slots anyway.
        print(f"privedge: {node.ifname}: the old generation's maps stay referenced "
              f"until the next swap: {e}", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def clear_slot(node: Node, slot: int) -> None:
    each_kind(lambda kind: lb.map_delete(node.fd(kind), ctypes.c_uint32(slot),
                                         what=f"{kind} slot {slot}"))


def apply_compiled(node: Node, c: Compiled, cap: Capacity,
                   kinds: tuple[str, ...] = KINDS) -> dict[str, float]:
    """Build `kinds` anew, carry the others over from the live slot, swap.

    Returns timings in seconds: build (create and fill) and swap.
    """
    t0 = time.perf_counter()
    fresh = build_inner(c, cap, kinds)
    carried: dict[str, int] = {}
    try:
        rest = tuple(k for k in KINDS if k not in kinds)
        if rest:
            carried = live_inner_fds(node, rest)
        t1 = time.perf_counter()
        swap = install(node, {**carried, **fresh}, int(c.params.generation))
    finally:
        close_all(fresh)
        close_all(carried)
    return {"build_s": t1 - t0, "swap_s": swap}
