"""BPF_PROG_TEST_RUN measurements: ns per packet, median of several rounds."""

from __future__ import annotations

import ctypes
import statistics
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from agent import libbpf as lb
from agent.bcc_build import Loaded, load_file

BENCH_BPF = Path(__file__).resolve().parent / "bpf"
SRC_FIXED, SRC_DENIED, SRC_CLEAN = 0, 1, 2
SRC_DENIED_32, SRC_DENIED_28, SRC_DENIED_NET = 3, 4, 5  # by entry class (srcgen.h)


def frame(src: str = "198.18.7.7") -> bytes:
    """A 64-byte TCP ACK, the smallest frame a real link carries."""
    f = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
            IP(src=src, dst="198.18.0.1") / TCP(sport=40000, dport=443, flags="A"))
    return f + b"\x00" * (64 - len(f))


def load(name: str, func: str, *defines: str) -> Loaded:
    return load_file(BENCH_BPF / name, func, [f"-I{BENCH_BPF}", *defines,
                                              "-Wno-unused-function"])


@dataclass
class Shim:
    """Puts a fresh source into every test run, then tail-calls a program."""

    prog: Loaded

    @classmethod
    def create(cls) -> Shim:
        return cls(load("shim.c", "bench_shim"))

    def set(self, target_fd: int, mode: int, entries: int) -> None:
        m = self.prog.module
        m["shim_jt"][ctypes.c_int(0)] = ctypes.c_int(target_fd)
        cfg = m["shim_cfg"]
        v = cfg.Leaf()
        v.mode, v.entries = mode, max(entries, 1)
        cfg[ctypes.c_int(0)] = v


def ns_per_packet(prog_fd: int, data: bytes, repeat: int = 1_000_000, rounds: int = 5,
                  expect: int | None = None) -> float:
    """Median over rounds of the kernel's mean run time per repetition."""
    times = []
    for _ in range(rounds):
        r = lb.prog_test_run(prog_fd, data, repeat=repeat)
        if expect is not None and r.retval != expect:
            raise AssertionError(f"program answered {r.retval}, expected {expect}")
        times.append(r.duration_ns)
    return float(statistics.median(times))
