"""Prepare a DC's backbone link for XDP steering, and undo what must be undone.

bpf_fib_lookup() routes only through a link whose IPv4 forwarding is on,
and a link with forwarding on would route whatever arrives on it. So:

- IPv4 forwarding on for the backbone link alone (not ip_forward);
- an nftables table in the DC's namespace drops every packet the kernel
  would forward from that link: the backbone never uses a DC as a router;
- reverse-path filtering loose rather than strict on it: decapsulated
  packets come from clients routed through the internet link;
- IPv6 on it, so decapsulated IPv6 packets are taken.

Settings already right are left alone; each change is reported by name.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from pyroute2 import IPRoute

from agent import xdp_link
from agent.node import NodeError

Phase = Callable[[str, str], None]
TABLE = "privedge_backbone"


def _sysctl(path: str) -> str:
    with open(f"/proc/sys/{path}") as f:
        return f.read().strip()


def _set_sysctl(path: str, value: str) -> None:
    with open(f"/proc/sys/{path}", "w") as f:
        f.write(value)


def _nft(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                          timeout=30)


def _guard_script(ifname: str) -> str:
    # Declaring, deleting and declaring again replaces the table in one
    # transaction, so a second run changes nothing and never opens a gap.
    return (f"table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority filter; policy accept;\n"
            f'    iifname "{ifname}" counter drop comment "forwarding is on only for '
            'bpf_fib_lookup"\n'
            "  }\n}\n")


def _guarded(ifname: str) -> bool:
    out = subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True,
                         text=True, timeout=30)
    return out.returncode == 0 and f'iifname "{ifname}"' in out.stdout


def prepare_backbone(ifname: str, phase: Phase) -> int:
    """Set the link up for steering (see the module's doc); returns its ifindex."""
    index = xdp_link.ifindex(ifname)
    changes = []
    try:
        if not _guarded(ifname):
            r = _nft(_guard_script(ifname))
            if r.returncode != 0:
                raise NodeError(f"cannot install the forwarding guard of {ifname} with nft: "
                                f"{r.stderr.strip()}")
            changes.append(f"nftables table {TABLE} drops what would be forwarded from it")
        if _sysctl(f"net/ipv4/conf/{ifname}/forwarding") != "1":
            _set_sysctl(f"net/ipv4/conf/{ifname}/forwarding", "1")
            changes.append("IPv4 forwarding on (for FIB lookups only)")
        rp = max(int(_sysctl("net/ipv4/conf/all/rp_filter")),
                 int(_sysctl(f"net/ipv4/conf/{ifname}/rp_filter")))
        if rp == 1:
            _set_sysctl(f"net/ipv4/conf/{ifname}/rp_filter", "2")
            changes.append("reverse-path filter loose instead of strict")
        if _sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6") != "0":
            _set_sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "0")
            changes.append("IPv6 on (decapsulated IPv6)")
    except OSError as e:
        raise NodeError(f"cannot prepare backbone link {ifname} for steering: "
                        f"{e.strerror} ({e.filename})") from None
    for change in changes:
        phase("steering", f"{ifname}: {change}")
    return index


def mtu(ifname: str) -> int:
    """The link's MTU, asked over netlink: /sys may show another namespace."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise NodeError(f"no interface {ifname}")
        return int(ipr.get_links(found[0])[0].get_attr("IFLA_MTU"))


def check_mtu(public: str, backbone: str, phase: Phase) -> None:
    """Warn when a full-size packet from the internet link cannot cross the
    backbone in its 20-byte tunnel: the program drops those as too_big."""
    inner, outer = mtu(public), mtu(backbone)
    if outer < inner + 20:
        phase("steering", f"WARNING: {backbone} MTU {outer} is under {public} MTU {inner} + 20: "
                          "full-size packets for other regions will be dropped (too_big); "
                          f"raise {backbone}'s MTU to {inner + 20} or more")


def release_backbone(ifname: str) -> bool:
    """Remove the forwarding guard of `ifname` if this namespace has it."""
    if not _guarded(ifname):
        return False
    _nft(f"delete table inet {TABLE}\n")
    return True
