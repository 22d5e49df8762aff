"""One protected interface's state: its bpffs pins and its run directory.

    /sys/fs/bpf/privedge/<ifname>/   maps and programs, pinned (kernel memory)
    /run/privedge/<ifname>/          the rule set as last applied, the lock

Both outlive the agent, which is how protection holds while it restarts.
Writers (the agent, `privedge` commands) take the lock; readers do not.
A new state directory is built under a temporary name and renamed into
place, so a crash never leaves a half-made directory under the real name.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from agent import abi
from agent import libbpf as lb
from agent.config import Capacity
from agent.maps import INNER, OUTERS, PLAIN, Fds, check_layout, create_inner, inner_entries

PROG_ROOT = "prog_root"
PROG_EDGE = "prog_edge"
BPFFS = "/sys/fs/bpf"


class NodeError(RuntimeError):
    """The interface's state is missing, busy or inconsistent; says what to do."""


def ensure_bpffs(path: str = BPFFS) -> None:
    """Mount bpffs at /sys/fs/bpf when nothing is mounted there."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == path and line.split()[2] == "bpf" for line in f):
            return
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "bpf", "bpf", path], capture_output=True, text=True)
    if r.returncode:
        raise NodeError(f"{path} is not a bpffs mount and mounting one failed: "
                        f"{r.stderr.strip()}")


class Node:
    """Open handles on one interface's pinned maps (see agent/maps.py)."""

    def __init__(self, ifname: str, bpffs_root: str = "/sys/fs/bpf/privedge",
                 run_root: str = "/run/privedge") -> None:
        self.ifname = ifname
        # bpffs reserves dots in names: eth0.100 is pinned as eth0:100.
        self.pin_dir = Path(bpffs_root) / ifname.replace(".", ":")
        self.run_dir = Path(run_root) / ifname
        self.fds = Fds()

    # -- life cycle ------------------------------------------------------------

    @property
    def exists(self) -> bool:
        return self.pin_dir.is_dir()

    def open(self) -> Node:
        """Open every pinned map, refusing any whose layout is not ours."""
        if not self.exists:
            raise NodeError(f"{self.ifname}: no privedge state at {self.pin_dir}; "
                            "start the agent on it first")
        for spec in [*PLAIN.values(), *OUTERS.values()]:
            path = str(self.pin_dir / spec.name)
            try:
                fd = self.fds.add(spec.name, lb.obj_get(path))
            except lb.BpfError as e:
                raise NodeError(f"{self.ifname}: {e}; the state is incomplete: run "
                                f"`privedge-agent detach {self.ifname}` and start again") from e
            check_layout(fd, spec, path)
        return self

    def close(self) -> None:
        self.fds.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def staging_dir(self) -> Path:
        """A fresh temporary pin directory next to the real one; staging left
        by a writer that crashed is removed (writers hold the lock)."""
        self.pin_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.pin_dir.parent.glob(f"{self.pin_dir.name}:new*"):
            shutil.rmtree(stale)
        tmp = self.pin_dir.parent / f"{self.pin_dir.name}:new{os.getpid()}"
        tmp.mkdir()
        return tmp

    def create_outers(self, directory: Path, cap: Capacity,
                      kinds: tuple[str, ...] = tuple(INNER)) -> None:
        """The outer map-in-maps, each with its inner template, pinned in `directory`."""
        for kind in kinds:
            tmpl = create_inner(kind, inner_entries(kind, cap))
            try:
                spec = OUTERS[kind]
                fd = lb.map_create(lb.MapType.ARRAY_OF_MAPS, spec.name, 4, 4, abi.GEN_SLOTS,
                                   0, tmpl)
                try:
                    lb.obj_pin(fd, str(directory / spec.name))
                finally:
                    os.close(fd)
            finally:
                os.close(tmpl)

    def add_missing_maps(self, cap: Capacity) -> list[str]:
        """Pin the maps a newer version added that these pins lack (an
        upgrade in place): outers with their templates, and plain maps of
        fixed size. Their slots stay empty until the next generation, which
        the running program does not miss: it never reads them."""
        added = []
        missing = [k for k, spec in OUTERS.items() if not (self.pin_dir / spec.name).exists()]
        if missing:
            self.create_outers(self.pin_dir, cap, tuple(missing))
            added += [OUTERS[k].name for k in missing]
        for spec in PLAIN.values():
            path = self.pin_dir / spec.name
            if path.exists() or spec.entries is None or spec.map_type == lb.MapType.PROG_ARRAY:
                continue
            fd = lb.map_create(spec.map_type, spec.name, spec.key_size, spec.value_size,
                               spec.entries, spec.flags)
            try:
                lb.obj_pin(fd, str(path))
            finally:
                os.close(fd)
            added.append(spec.name)
        return added

    def commit(self, staging: Path) -> None:
        """Rename a finished staging directory into place."""
        if self.exists:
            raise NodeError(f"{self.pin_dir} appeared while staging; another agent?")
        os.rename(staging, self.pin_dir)

    def remove(self) -> None:
        """Unpin everything and drop the run directory."""
        self.close()
        for d in (self.pin_dir, self.run_dir):
            if d.exists():
                shutil.rmtree(d)

    # -- locking -------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The writers' lock of this interface (flock on run_dir/lock)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # -- plain maps --------------------------------------------------------------------

    def fd(self, key: str) -> int:
        """fd of a plain map ("stats", "active", ...) or an outer (kind)."""
        name = PLAIN[key].name if key in PLAIN else OUTERS[key].name
        return self.fds[name]

    def active(self) -> abi.Active:
        raw = lb.map_lookup(self.fd("active"), ctypes.c_uint32(0), ctypes.sizeof(abi.Active))
        return abi.Active.from_buffer_copy(raw)

    def set_active(self, slot: int, generation: int) -> None:
        lb.map_update(self.fd("active"), ctypes.c_uint32(0),
                      abi.Active(slot=slot, generation=generation), what="pe_active")

    def counters(self, which: str = "stats") -> list[abi.Counter]:
        """Per-CPU counters summed over CPUs: per reason ("stats") or per
        DC tunnelled to ("steered")."""
        ncpu = lb.possible_cpus()
        size = ctypes.sizeof(abi.Counter)
        spec = PLAIN[which]
        keys, vals, n = lb.map_lookup_all(self.fd(which), 4, size * ncpu, spec.entries,
                                          what=spec.name)
        out = [abi.Counter() for _ in range(spec.entries)]
        for i in range(n):
            reason = int.from_bytes(keys[4 * i: 4 * i + 4], "little")
            for cpu in range(ncpu):
                c = abi.Counter.from_buffer_copy(vals, (i * ncpu + cpu) * size)
                out[reason].packets += c.packets
                out[reason].bytes += c.bytes
        return out

    def prog_path(self, which: str) -> str:
        return str(self.pin_dir / which)

