"""Generator process for bench/e2e.py; runs inside the generator namespace.

    python -m bench.gen --ifindex 2 --dst-mac 02:.. --cpu 0

Pins itself to one CPU and loads bench/bpf/gen.c once, then serves
requests, one JSON object per line on stdin: {"mode": 1, "entries":
1000000, "count": 2000000, "src": "198.18.7.7"}. For each it runs the
program with BPF_PROG_TEST_RUN live frames (every repetition writes a
source into the frame and redirects it out of the veth) and answers one
JSON line. Bounded by each request's count; exits at end of input.
A request may name the frame's destination ("dst", default 198.18.0.1).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from agent import libbpf as lb
from bench.testrun import load

CHUNK = 1_000_000
MAX_COUNT = 50_000_000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ifindex", type=int, required=True)
    p.add_argument("--dst-mac", required=True)
    p.add_argument("--cpu", type=int, default=0)
    a = p.parse_args(argv)
    os.sched_setaffinity(0, {a.cpu})
    prog = load("gen.c", "bench_gen")
    cfg = prog.module["gen_cfg"]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        v = cfg.Leaf()
        v.mode, v.entries, v.ifindex = req["mode"], max(req["entries"], 1), a.ifindex
        cfg[ctypes.c_int(0)] = v
        f = raw(Ether(src="02:00:00:00:00:01", dst=a.dst_mac) /
                IP(src=req.get("src", "198.18.7.7"), dst=req.get("dst", "198.18.0.1")) /
                TCP(sport=40000, dport=443, flags="A"))
        f += b"\x00" * (64 - len(f))  # the 64-byte frames of every pps figure
        count = min(int(req["count"]), MAX_COUNT)
        sent, t0 = 0, time.monotonic()
        while sent < count:
            n = min(CHUNK, count - sent)
            lb.prog_test_run(prog.fd, f, repeat=n, flags=lb.BPF_F_TEST_XDP_LIVE_FRAMES,
                             batch_size=64)
            sent += n
        print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - t0, 3)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
