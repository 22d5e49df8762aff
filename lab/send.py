"""Send frames from a pcap on one interface: bounded in count and time.

    python -m lab.send --iface tx0 --pcap mix.pcap [--loops 3] [--pps 20000]

Runs inside a namespace (lab/netns.py starts it with nsenter). Stops after
--loops passes over the file or --timeout seconds, whichever comes first,
and prints how many frames it sent as JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from scapy.utils import RawPcapReader


def send(iface: str, frames: list[bytes], loops: int, pps: float, timeout: float) -> int:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    sent, start = 0, time.monotonic()
    deadline = start + timeout
    try:
        for _ in range(loops):
            for f in frames:
                if time.monotonic() > deadline:
                    return sent
                if pps:
                    ahead = start + sent / pps - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                try:
                    s.send(f)
                except OSError:  # ENOBUFS under load: try once more, then count it lost
                    time.sleep(0.001)
                    s.send(f)
                sent += 1
    finally:
        s.close()
    return sent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iface", required=True)
    p.add_argument("--pcap", required=True)
    p.add_argument("--loops", type=int, default=1)
    p.add_argument("--pps", type=float, default=0, help="pace to this rate (0: no pacing)")
    p.add_argument("--timeout", type=float, default=60)
    a = p.parse_args(argv)
    frames = [bytes(pkt) for pkt, _ in RawPcapReader(a.pcap)]
    n = send(a.iface, frames, a.loops, a.pps, a.timeout)
    print(json.dumps({"sent": n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
