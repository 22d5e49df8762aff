"""Compile and load the XDP programs with bcc. The only module importing bcc.

bcc comes from Debian (python3-bpfcc); it is imported here, lazily, so the
rest of the agent and the unit tests import without root or bcc.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent import libbpf as lb
from agent.config import Capacity

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"

PROGRAMS = {
    "root": ("root.c", "pe_root"),
    "edge": ("edge.c", "pe_edge"),
}


class BuildError(RuntimeError):
    """bcc could not compile or the verifier refused a program."""


@dataclass
class Loaded:
    """A loaded program; keep it referenced while its fd is in use."""

    name: str
    fd: int
    tag: str
    module: object  # the bcc.BPF that owns the fd

    def release(self) -> None:
        """Drop bcc's fds (pins and the program array keep the program alive)."""
        cleanup = getattr(self.module, "cleanup", None)
        if cleanup:
            cleanup()


def cflags(pin_dir: Path, cap: Capacity, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        f"-I{BPF_DIR / 'include'}",
        f'-DPE_PIN_DIR="{pin_dir}"',
        f"-DPE_RL_ENTRIES={cap.rate_sources}",
        "-Wno-unused-function",
        *extra,
    ]


_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


def amalgamate(path: Path, seen: set[Path] | None = None) -> str:
    """The program as one text, our own headers inlined.

    bcc rewrites map accesses (`map.lookup()`) only in its main file, so the
    headers under bpf/include are spliced in; #line directives keep compiler
    messages pointing at the original files.
    """
    seen = set() if seen is None else seen
    out: list[str] = []
    pos = 0
    text = path.read_text()
    for m in _LOCAL_INCLUDE.finditer(text):
        out.append(text[pos: m.start()])
        inc = (path.parent / m.group(1)) if (path.parent / m.group(1)).exists() else \
            BPF_DIR / "include" / m.group(1)
        if inc.resolve() not in seen:
            seen.add(inc.resolve())
            out.append(f'#line 1 "{inc}"\n{amalgamate(inc, seen)}\n')
        line = text.count("\n", 0, m.end()) + 1
        out.append(f'#line {line + 1} "{path}"\n')
        pos = m.end() + 1
    out.append(text[pos:])
    return "".join(out)


def load_file(path: Path, func: str, flags: list[str]) -> Loaded:
    """Compile one C file (local headers inlined) and load `func` as XDP."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise BuildError("bcc is missing: install python3-bpfcc (sudo make setup)") from e
    try:
        module = BPF(text=amalgamate(path).encode(), cflags=flags)
        fn = module.load_func(func.encode(), BPF.XDP)
    except Exception as e:  # bcc raises plain Exception with the verifier log printed
        raise BuildError(f"{path.name}: {e}") from e
    return Loaded(func, fn.fd, lb.prog_info(fn.fd).tag, module)


def load(which: str, pin_dir: Path, cap: Capacity, extra: tuple[str, ...] = ()) -> Loaded:
    """Compile bpf/<which>.c against the pins in `pin_dir` and load it as XDP.

    bcc reopens the maps pinned there and creates (and pins) missing plain
    maps; the outer map-in-maps must exist already (Node.create_outers).
    """
    src, func = PROGRAMS[which]
    loaded = load_file(BPF_DIR / src, func, cflags(pin_dir, cap, extra))
    loaded.name = which
    return loaded


def pin_program(fd: int, path: str) -> None:
    """Pin (or re-pin) a program: pin under a temporary name, rename over."""
    tmp = f"{path}:new{os.getpid()}"  # bpffs reserves dots
    if os.path.exists(tmp):
        os.unlink(tmp)
    lb.obj_pin(fd, tmp)
    os.replace(tmp, path)
