"""`make bench-steer`: what Regional Services steering costs, against peers
measured in the same run.

  testrun   ns per packet of the edge program steering a packet (parse,
            filter, Maglev, IPIP encap, bpf_fib_lookup, redirect) beside a
            trivial XDP_TX, both as BPF_PROG_TEST_RUN live frames arriving
            on a backbone veth and transmitted out of it, both behind the
            same shim (bench/bpf/ethshim.c) that restores the Ethernet
            header an encapsulation overwrote.
  forward   the lab: a generator in uscustomer sends 64-byte TCP frames to
            iad; iad either passes them to its own stack (the shared IP) or
            steers them over the backbone to dus/fra (the EU zone's IP).
            Cost per frame is the busy time of the CPU that iad's receive
            thread is pinned to (everything it sets off runs there: for
            forwarding, the backbone switch and the EU DC's decapsulation
            and stack too); rate = 1 / cost.
  maglev    seconds to build a 65,537-slot table for 100 DCs.
  moved     flows that change DC when one of N leaves, against the ideal 1/N.

Prints a table, then the JSON line that bench/results/steer.json holds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from agent import libbpf as lb
from agent import maglev
from agent.config import Capacity, NodeConfig, Steering
from agent.flowhash import flow_hash
from agent.node import Node
from agent.rules import ruleset_from_config
from agent.standalone import StandaloneNode
from agent.steering import drain
from bench.e2e import GEN_CPU, RX_CPU, pin_napi_thread, start_generator
from bench.testrun import load
from lab import fibrig, netns

RESULTS = Path(__file__).resolve().parent / "results" / "steer.json"
EU4, WWW4, CLIENT4 = "198.51.100.65", "198.51.100.10", "203.0.113.20"
BENCH_CPU = GEN_CPU  # the bench's own process keeps off the receiving CPU


def log(msg: str) -> None:
    print(f"bench-steer: {msg}", file=sys.stderr, flush=True)


def frame(dst: str, src: str = CLIENT4, dst_mac: str = "02:00:00:00:01:02") -> bytes:
    f = raw(Ether(src="02:00:00:00:01:01", dst=dst_mac) / IP(src=src, dst=dst) /
            TCP(sport=40000, dport=443, flags="A"))
    return f + b"\x00" * (64 - len(f))


# -- BPF_PROG_TEST_RUN ---------------------------------------------------------------------


def _steering() -> Steering:
    return Steering(dc="iad", region="us", backbone_interface="bb0",
                    backbone_address=fibrig.ADDRESS,
                    dcs=[{"name": "dus", "region": "eu", "backbone": "198.18.0.1"},
                         {"name": "fra", "region": "eu", "backbone": "198.18.0.2"},
                         {"name": "iad", "region": "us", "backbone": fibrig.ADDRESS}],
                    services=[{"address": EU4, "region": "eu"}])


def testrun(repeat: int, rounds: int) -> dict:
    ns = f"pebst{os.getpid()}"
    node = None
    try:
        _, ifindex = fibrig.create(ns)
        cap = Capacity()
        node = StandaloneNode("bsteer", cap)
        cfg = NodeConfig(interface="tr0", role="public", capacity=cap, bogons=(),
                         steering=_steering())
        node.apply(ruleset_from_config(cfg, backbone_ifindex=ifindex))
        tx = load("trivial.c", "bench_tx")
        shim = load("ethshim.c", "bench_ethshim")
        data = frame(EU4)
        hdr = shim.module["shim_eth"].Leaf()
        ctypes.memmove(ctypes.addressof(hdr), data[:14], 14)
        shim.module["shim_eth"][ctypes.c_int(0)] = hdr

        def ns_per_packet(fd: int) -> float:
            shim.module["shim_jt"][ctypes.c_int(0)] = ctypes.c_int(fd)
            r = lb.prog_test_run(shim.fd, data, repeat=repeat, batch_size=64,
                                 flags=lb.BPF_F_TEST_XDP_LIVE_FRAMES, ingress_ifindex=ifindex)
            return float(r.duration_ns)

        pairs = []
        with netns.inside_netns(ns):
            before = node.counters()[22][0]
            for _ in range(rounds):
                t, s = ns_per_packet(tx.fd), ns_per_packet(node.root_fd)
                pairs.append({"tx_ns": t, "steer_ns": s, "ratio": s / t})
            steered = node.counters()[22][0] - before
        if steered != rounds * repeat:
            raise AssertionError(f"only {steered:,} of {rounds * repeat:,} frames were steered")
        return {"pairs": pairs,
                "tx_ns": statistics.median(p["tx_ns"] for p in pairs),
                "steer_ns": statistics.median(p["steer_ns"] for p in pairs),
                "ratio": statistics.median(p["ratio"] for p in pairs)}
    finally:
        if node is not None:
            node.close()
        netns.delete(ns)


# -- Maglev -------------------------------------------------------------------------------------


def maglev_rebuild(rounds: int, dcs: int = 100, slots: int = 65_537) -> dict:
    names = [f"dc{i:03d}" for i in range(dcs)]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        maglev.build(names, slots)
        times.append(time.perf_counter() - t0)
    return {"dcs": dcs, "slots": slots, "seconds": statistics.median(times),
            "all": [round(t, 4) for t in times]}


def flows_moved(sizes: tuple[int, ...], flows: int, slots: int = 65_537) -> dict:
    """Random flows, hashed as the kernel does; one DC of N leaves.

    "drain" is how a DC leaves in operation (enabled: false, agent/steering.py
    drain()); "rebuild" is a DC deleted from the config, where the table is
    built afresh by plain Maglev, for comparison.
    """
    rng = random.Random(23)
    hashes = np.array([flow_hash(f"203.0.{rng.randrange(256)}.{rng.randrange(1, 255)}", EU4, 6,
                                 rng.randrange(1024, 65536), 443) for _ in range(flows)],
                      np.uint64)
    slot = (hashes % slots).astype(np.int64)
    out = {}
    for n in sizes:
        names = [f"dc{i:03d}" for i in range(n)]
        gone = names[n // 2]
        full = maglev.build(names, slots)
        before = np.array(names)[full[slot]]
        enabled = [x != gone for x in names]
        after = np.array(names)[drain(full, names, enabled, slots)[slot]]
        rest = [x for x in names if x != gone]
        rebuilt = np.array(rest)[maglev.build(rest, slots)[slot]]
        back = np.array(names)[drain(full, names, [True] * n, slots)[slot]]
        moved = float((before != after).mean())
        out[n] = {"moved": moved, "ideal": 1 / n, "ratio": moved / (1 / n),
                  "on_leaver": float((before == gone).mean()),
                  "only_leavers_flows": bool(((before != after) <= (before == gone)).all()),
                  "rebuild_ratio": float((before != rebuilt).mean()) * n,
                  "restored": bool((back == before).all())}
    return out


# -- the lab -------------------------------------------------------------------------------------


def _cpu_busy_ns(cpu: int) -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
                return busy * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def _thread_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


class LabForward:
    """The lab with a generator in uscustomer aimed at iad's internet link."""

    def __init__(self) -> None:
        from lab.cluster import Lab
        from lab.topology import load_topology

        self.lab = Lab(load_topology(), prefix=f"bs{os.getpid() % 10000}-")
        self.gen: subprocess.Popen | None = None

    def up(self) -> None:
        lab = self.lab
        lab.up(agents=True)
        ns_inet, ns_iad, ns_cust = lab.ns("inet"), lab.ns("iad"), lab.ns("uscustomer")
        # The switch port takes the generator's redirected frames only with NAPI (GRO).
        netns.run(ns_inet, ["ethtool", "-K", "uscustomer", "gro", "on"], capture_output=True)
        subprocess.run(["ip", "netns", "exec", ns_iad, "sh", "-c",
                        "echo 1 > /sys/class/net/inet0/threaded"], check=True, timeout=30)
        self.iad = Node("inet0", lab.bpffs("iad"), str(lab.dc_dir("iad") / "run")).open()
        self.bb = {dc: Node("bb0", lab.bpffs(dc), str(lab.dc_dir(dc) / "run")).open()
                   for dc in ("dus", "fra")}
        from pyroute2 import NetNS
        with NetNS(ns_cust) as c:
            gen_ifindex = c.link_lookup(ifname="inet0")[0]
        self.gen = start_generator(ns_cust, gen_ifindex, netns.mac(ns_iad, "inet0"))

    def sample(self, dst: str, count: int) -> dict:
        reason = 22 if dst == EU4 else 0  # REDIRECT_STEER or PASS
        pid = pin_napi_thread("inet0", RX_CPU)  # only iad's inet0 runs threaded
        c0, d0 = self.iad.counters()[reason].packets, self._decapped()
        t0, cpu0 = _thread_ns(pid), _cpu_busy_ns(RX_CPU)
        self.gen.stdin.write(json.dumps({"mode": 0, "entries": 1, "count": count,
                                         "src": CLIENT4, "dst": dst}) + "\n")
        self.gen.stdin.flush()
        json.loads(self.gen.stdout.readline())
        time.sleep(0.2)  # the receivers drain their rings
        cpu_ns, thread_ns = _cpu_busy_ns(RX_CPU) - cpu0, _thread_ns(pid) - t0
        handled = self.iad.counters()[reason].packets - c0
        return {"dst": dst, "sent": count, "handled": handled, "decapped": self._decapped() - d0,
                "cpu_ns_per_frame": cpu_ns / max(handled, 1),
                "thread_ns_per_frame": thread_ns / max(handled, 1)}

    def _decapped(self) -> int:
        return sum(n.counters()[20].packets for n in self.bb.values())

    def down(self) -> None:
        if self.gen is not None:
            self.gen.stdin.close()
            try:
                self.gen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.gen.kill()
        for n in [getattr(self, "iad", None), *getattr(self, "bb", {}).values()]:
            if n is not None:
                n.close()
        self.lab.down()


def forward(count: int, rounds: int) -> dict:
    rig = LabForward()
    try:
        rig.up()
        rig.sample(WWW4, count // 10)  # warm up both paths
        rig.sample(EU4, count // 10)
        pairs = []
        for _ in range(rounds):
            local, fwd = rig.sample(WWW4, count), rig.sample(EU4, count)
            pairs.append({"local": local, "forward": fwd,
                          "ratio": local["cpu_ns_per_frame"] / fwd["cpu_ns_per_frame"]})
            log(f"local {local['cpu_ns_per_frame']:.0f} ns/frame, forward "
                f"{fwd['cpu_ns_per_frame']:.0f} ns/frame, ratio {pairs[-1]['ratio']:.2f}")
        return {"pairs": pairs, "ratio": statistics.median(p["ratio"] for p in pairs),
                "local_ns": statistics.median(p["local"]["cpu_ns_per_frame"] for p in pairs),
                "forward_ns": statistics.median(p["forward"]["cpu_ns_per_frame"] for p in pairs),
                "delivered": statistics.median(p["forward"]["decapped"] /
                                               max(p["forward"]["handled"], 1) for p in pairs)}
    finally:
        rig.down()


# -- the report --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and frames")
    p.add_argument("--skip-lab", action="store_true", help="no end-to-end run in the lab")
    a = p.parse_args(argv)
    os.sched_setaffinity(0, {BENCH_CPU})
    rounds = 3 if a.quick else 7
    log("BPF_PROG_TEST_RUN: steer path beside XDP_TX")
    tr = testrun(repeat=200_000 if a.quick else 1_000_000, rounds=rounds)
    log("Maglev rebuild and flow movement")
    mg = maglev_rebuild(rounds)
    mv = flows_moved((2, 3, 5, 10, 100), flows=20_000 if a.quick else 100_000)
    fw = None
    if not a.skip_lab:
        log("the lab: iad forwarding vs passing to its stack")
        fw = forward(count=200_000 if a.quick else 1_000_000, rounds=rounds)
    worst = max(mv.values(), key=lambda m: m["ratio"])
    out = {
        "testrun_ratio_steer_vs_tx": round(tr["ratio"], 3),
        "forward_ratio_vs_local_pass": round(fw["ratio"], 3) if fw else None,
        "maglev_rebuild_s": round(mg["seconds"], 4),
        "flows_moved_ratio_vs_ideal": round(worst["ratio"], 3),
        "testrun_steer_ns": tr["steer_ns"], "testrun_tx_ns": tr["tx_ns"],
        "forward_ns_per_frame": round(fw["forward_ns"], 1) if fw else None,
        "local_pass_ns_per_frame": round(fw["local_ns"], 1) if fw else None,
        "forward_delivered_fraction": round(fw["delivered"], 4) if fw else None,
        "flows_moved": {str(n): {k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in m.items()} for n, m in mv.items()},
        "detail": {"testrun": tr, "maglev": mg, "forward": fw},
    }
    print(f"  steer path   {tr['steer_ns']:.0f} ns/packet vs XDP_TX {tr['tx_ns']:.0f}: "
          f"x{tr['ratio']:.2f} (bar <= 3)")
    if fw:
        print(f"  lab forward  {fw['forward_ns']:.0f} ns/frame vs local pass "
              f"{fw['local_ns']:.0f}: rate x{fw['ratio']:.2f} (bar >= 0.5); "
              f"{fw['delivered']:.1%} decapsulated in the EU")
    print(f"  maglev       {mg['seconds'] * 1000:.0f} ms for 100 DCs, 65,537 slots (bar < 500)")
    print("  drain moves  " + ", ".join(f"N={n}: {m['moved']:.3f} (x{m['ratio']:.2f})"
                                        for n, m in mv.items()) + " of 1/N (bar <= 1.2)")
    print("  (a DC deleted from the config instead: "
          + ", ".join(f"N={n} x{m['rebuild_ratio']:.2f}" for n, m in mv.items()) + ")")
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(RESULTS)
    summary = {k: v for k, v in out.items() if k not in ("detail", "flows_moved")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
