"""End-to-end receive cost on a veth: a generator core, a receiver core.

    <p>-g  g0 ---- veth ---- <ifname>  <p>-r   (program under test, or nftables)

The generator (bench/gen.py, pinned to CPU 0) injects frames with
BPF_PROG_TEST_RUN live frames, redirected out of g0. The receiving veth
runs its NAPI poll in a thread of its own (threaded NAPI), pinned to CPU 1,
so its CPU time is the receive cost of the frames it processed: the XDP
program and everything the driver does around it. Rates are frames per
CPU-second of that thread, which holds steady on a shared machine where
wall-clock rates do not.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import NetNS

from agent.libbpf import XDP_FLAGS_DRV_MODE
from lab import netns

RX_CPU, GEN_CPU = 1, 0


@dataclass
class Sample:
    packets: int
    cpu_ns: int
    seconds: float

    @property
    def ns_per_packet(self) -> float:
        return self.cpu_ns / max(self.packets, 1)

    @property
    def mpps_per_core(self) -> float:
        return self.packets / max(self.cpu_ns, 1) * 1e3


def pin_napi_thread(ifname: str, cpu: int = RX_CPU) -> int:
    """PID of the threaded NAPI kthread of `ifname` (named napi/<ifname>-<id>),
    pinned to `cpu`. The name must be unique among all namespaces' threads."""
    prefix = f"napi/{ifname}-"
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(prefix):
                os.sched_setaffinity(int(pid), {cpu})
                return int(pid)
    raise RuntimeError(f"no NAPI thread for {ifname}; is threaded NAPI on?")


def start_generator(ns: str, ifindex: int, dst_mac: str) -> subprocess.Popen:
    """bench/gen.py in namespace `ns`, sending out of `ifindex` to `dst_mac`,
    pinned to GEN_CPU; returns once it is ready for requests."""
    gen = netns.popen(ns, netns.python("bench.gen", "--ifindex", str(ifindex), "--dst-mac",
                                       dst_mac, "--cpu", str(GEN_CPU)),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if json.loads(gen.stdout.readline()).get("ready") is not True:
        gen.kill()
        raise RuntimeError("the generator did not start")
    return gen


class VethRig:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.g, self.r = f"peb{tag}-g", f"peb{tag}-r"
        self.ifname = f"pbr{tag}"

    def up(self) -> None:
        netns.create(self.g)
        netns.create(self.r)
        # No IPv6 on the rig: router solicitations and MLD reports from the
        # link-local addresses would be frames we did not send.
        for ns in (self.g, self.r):
            netns.create(ns)
            netns.disable_ipv6(ns)
        netns.veth(self.g, "g0", self.r, self.ifname)
        # GRO gives the receiving veth a NAPI instance even without XDP (for
        # nftables), and the threaded flag moves that NAPI into a kthread.
        netns.run(self.r, ["ethtool", "-K", self.ifname, "gro", "on"], capture_output=True)
        subprocess.run(["ip", "netns", "exec", self.r, "sh", "-c",
                        f"echo 1 > /sys/class/net/{self.ifname}/threaded"], check=True,
                       timeout=30)
        self.mac = netns.mac(self.r, self.ifname)
        with NetNS(self.g) as g:
            self.g_ifindex = g.link_lookup(ifname="g0")[0]

        self.gen = start_generator(self.g, self.g_ifindex, self.mac)

    def down(self) -> None:
        gen = getattr(self, "gen", None)
        if gen is not None:
            gen.stdin.close()
            try:
                gen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                gen.kill()
        netns.delete(self.g)
        netns.delete(self.r)

    # -- the receiver ----------------------------------------------------------------

    def attach(self, prog_fd: int) -> None:
        with NetNS(self.r) as r:
            idx = r.link_lookup(ifname=self.ifname)[0]
            r.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", prog_fd),
                                                    ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})

    def detach(self) -> None:
        with NetNS(self.r) as r:
            idx = r.link_lookup(ifname=self.ifname)[0]
            r.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1),
                                                    ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE)]})

    def napi_thread(self) -> int:
        return pin_napi_thread(self.ifname)

    def _xdp_packets(self) -> int:
        """Frames the veth's NAPI took off its ring (with or without a program)."""
        out = subprocess.run(netns.nsenter(self.r, ["ethtool", "-S", self.ifname]),
                             capture_output=True, text=True, check=True, timeout=30).stdout
        return sum(int(line.split(":")[1]) for line in out.splitlines()
                   if line.strip().startswith("rx_queue_") and "_xdp_packets" in line)

    # -- one measurement -----------------------------------------------------------------

    def measure(self, mode: int, entries: int, count: int, src: str = "198.18.7.7") -> Sample:
        """Send `count` frames; the receiver's CPU time and frames processed."""
        pid = self.napi_thread()
        count_fn = self._xdp_packets
        cpu0 = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        pk0 = count_fn()
        t0 = time.monotonic()
        self.gen.stdin.write(json.dumps({"mode": mode, "entries": entries, "count": count,
                                         "src": src}) + "\n")
        self.gen.stdin.flush()
        json.loads(self.gen.stdout.readline())
        time.sleep(0.1)  # let the receiver drain its ring
        cpu1 = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        return Sample(count_fn() - pk0, cpu1 - cpu0, time.monotonic() - t0)

    # -- nftables, for comparison -----------------------------------------------------------

    def nft_load(self, prefix_file: Path) -> float:
        """A netdev ingress chain dropping sources in an interval set; load seconds."""
        prefixes = prefix_file.read_text().split()
        ruleset = Path(prefix_file.parent / "nft.rules")
        with open(ruleset, "w") as f:
            f.write("table netdev pe_bench {\n  set deny4 { type ipv4_addr; flags interval; "
                    "auto-merge; elements = {\n")
            for i in range(0, len(prefixes), 1000):
                f.write("    " + ", ".join(prefixes[i:i + 1000]) + ",\n")
            f.write("  } }\n")
            f.write(f'  chain ingress {{ type filter hook ingress device "{self.ifname}" '
                    "priority 0; policy accept; ip saddr @deny4 drop; }\n}\n")
        t0 = time.monotonic()
        netns.run(self.r, ["nft", "-f", str(ruleset)], timeout=600, capture_output=True)
        return time.monotonic() - t0

    def nft_flush(self) -> None:
        netns.run(self.r, ["nft", "delete", "table", "netdev", "pe_bench"], capture_output=True)
