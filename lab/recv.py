"""Count the frames that reach an interface's stack, by source address.

    python -m lab.recv --iface rx0 --duration 10

An AF_PACKET socket sees what XDP passed and nothing it dropped, so the
counts are what the filter let through. It stops at --duration, or early
when a frame carries the payload STOP_MARKER, and prints JSON:
{"total": n, "by_src": {"203.0.113.10": n, ...}}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time
from collections import Counter

STOP_MARKER = b"PRIVEDGE-RECV-STOP"
PACKET_OUTGOING = 4
READY_FILE_SUFFIX = ".ready"


def _src(frame: bytes) -> str | None:
    off, etype = 14, int.from_bytes(frame[12:14], "big")
    while etype in (0x8100, 0x88A8) and len(frame) >= off + 4:
        etype, off = int.from_bytes(frame[off + 2: off + 4], "big"), off + 4
    if etype == 0x0800 and len(frame) >= off + 20:
        return str(ipaddress.IPv4Address(frame[off + 12: off + 16]))
    if etype == 0x86DD and len(frame) >= off + 40:
        return str(ipaddress.IPv6Address(frame[off + 8: off + 24]))
    return None


def receive(iface: str, duration: float, ready: str | None = None) -> dict:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((iface, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    s.settimeout(0.2)
    if ready:
        open(ready, "w").close()
    counts: Counter[str] = Counter()
    total = 0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        try:
            frame, addr = s.recvfrom(65535)
        except TimeoutError:
            continue
        if addr[2] == PACKET_OUTGOING:
            continue
        if STOP_MARKER in frame:
            break
        total += 1
        src = _src(frame)
        if src:
            counts[src] += 1
    s.close()
    return {"total": total, "by_src": dict(counts)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iface", required=True)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--ready", help="create this file once listening")
    a = p.parse_args(argv)
    print(json.dumps(receive(a.iface, a.duration, a.ready)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
