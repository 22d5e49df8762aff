"""Keep the backbone next hops resolved for the XDP steering stage.

bpf_fib_lookup() only reads the neighbour table: without an entry for an
in-region DC it answers NO_NEIGH and the packet is dropped (counted as
DROP_STEER_FAIL). The kernel resolves a neighbour when this host itself
sends to it, so the agent sends one empty UDP datagram to the discard port
of every peer DC whose entry is missing or failed, and checks again every
few seconds. Entries, once resolved, stay usable (STALE counts) while the
peer answers.
"""

from __future__ import annotations

import contextlib
import socket

from pyroute2 import IPRoute

from agent.config import Steering

# NUD states bpf_fib_lookup accepts (NUD_VALID in the kernel).
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT
DISCARD_PORT = 9


def peers(steering: Steering) -> list[str]:
    """Backbone addresses of the other enabled DCs."""
    return [d.backbone for d in steering.dcs if d.name != steering.dc and d.enabled]


def resolved(ipr: IPRoute, ifindex: int) -> set[str]:
    out = set()
    for n in ipr.get_neighbours(ifindex=ifindex):
        if n["state"] & NUD_VALID:
            out.add(n.get_attr("NDA_DST"))
    return out


def warm(steering: Steering) -> list[str]:
    """Probe the peers without a usable entry; returns those probed."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=steering.backbone_interface)
        if not found:
            return []
        have = resolved(ipr, found[0])
    missing = [p for p in peers(steering) if p not in have]
    if missing:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((steering.backbone_address, 0))
            for peer in missing:
                # Unreachable now? The next round tries again.
                with contextlib.suppress(OSError):
                    s.sendto(b"", (peer, DISCARD_PORT))
    return missing
