"""Every byte of a capture's TCP streams on given ports, checked to be TLS.

Each direction of each flow is put back in sequence order (retransmissions
and overlaps dropped); a flow whose SYN the capture holds is checked from
its first byte, record by record: a TLS record header is a
content type (20 change_cipher_spec, 21 alert, 22 handshake, 23 application
data), a version 0x0301-0x0304 and a length. A stream is plaintext if any
record header does not parse; a capture passes only if every stream does
(invariant 3: nothing but TLS between DCs and core).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.utils import PcapReader

TLS_TYPES = {20, 21, 22, 23}
Flow = tuple[str, int, str, int]


@dataclass(frozen=True)
class Stream:
    data: bytes
    from_start: bool     # the SYN was captured and no byte after it is missing


def streams(pcap: Path, ports: set[int]) -> dict[Flow, Stream]:
    """(src, sport, dst, dport) -> the bytes sent that way, in order."""
    segments: dict[Flow, dict[int, bytes]] = defaultdict(dict)
    isn: dict[Flow, int] = {}
    with PcapReader(str(pcap)) as reader:
        for pkt in reader:
            if IP not in pkt or TCP not in pkt:
                continue
            ip, tcp = pkt[IP], pkt[TCP]
            if tcp.sport not in ports and tcp.dport not in ports:
                continue
            flow = (ip.src, tcp.sport, ip.dst, tcp.dport)
            if tcp.flags.S:
                isn[flow] = tcp.seq
            payload = bytes(tcp.payload)
            if payload:
                segments[flow].setdefault(tcp.seq, payload)
    out = {}
    for flow, by_seq in segments.items():
        data = bytearray()
        expect = isn[flow] + 1 if flow in isn else None
        complete = flow in isn
        for seq in sorted(by_seq):   # wraparound is not a concern for a short capture
            chunk = by_seq[seq]
            if expect is not None and seq > expect:
                complete = False     # a segment the capture missed
            elif expect is not None and seq < expect:
                chunk = chunk[expect - seq:]     # a retransmission's overlap
            data += chunk
            end = seq + len(by_seq[seq])
            expect = end if expect is None else max(expect, end)
        out[flow] = Stream(bytes(data), complete)
    return out


def not_tls(data: bytes) -> str | None:
    """Why `data` is not a sequence of TLS records (the last may be cut by
    the capture's end), or None."""
    at = 0
    while at + 5 <= len(data):
        kind, major, minor = data[at], data[at + 1], data[at + 2]
        if kind not in TLS_TYPES or major != 3 or not 1 <= minor <= 4:
            return f"byte {at}: {data[at:at + 8].hex()} is not a TLS record header"
        at += 5 + int.from_bytes(data[at + 3:at + 5], "big")
    return None
