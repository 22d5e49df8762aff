"""Attach and detach XDP programs on an interface over netlink (pyroute2).

Native (driver) mode only: generic mode costs several times more on veth
and its drops do not show in the device counters. Attaching refuses to
replace a program it did not put there; detaching removes only the program
it is told about (the kernel checks the expected fd).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.libbpf import XDP_FLAGS_DRV_MODE, XDP_FLAGS_UPDATE_IF_NOEXIST

XDP_FLAGS_REPLACE = 1 << 4
_MODES = {1: "native", 2: "generic", 3: "offload", 4: "multi"}


class LinkError(RuntimeError):
    """An interface is missing or refused the XDP change; says why."""


@dataclass(frozen=True)
class Attached:
    mode: str
    prog_id: int


def ifindex(ifname: str) -> int:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise LinkError(f"no interface named {ifname!r} in this network namespace")
    return idx[0]


def attached(ifname: str) -> Attached | None:
    """The XDP program on the interface, if any."""
    idx = ifindex(ifname)
    with IPRoute() as ipr:
        link = ipr.get_links(idx)[0]
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return None
    mode = xdp.get_attr("IFLA_XDP_ATTACHED")
    prog = xdp.get_attr("IFLA_XDP_PROG_ID") or xdp.get_attr("IFLA_XDP_DRV_PROG_ID")
    if not mode or not prog:
        return None
    return Attached(_MODES.get(mode if isinstance(mode, int) else 1, str(mode)), prog)


def _set_xdp(ifname: str, attrs: list[tuple[str, int]], what: str) -> None:
    idx = ifindex(ifname)
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=idx, xdp={"attrs": attrs})
    except NetlinkError as e:
        hints = {16: "another XDP program is attached (EBUSY)",
                 95: "the driver has no native XDP support (EOPNOTSUPP)",
                 22: "the kernel refused the program or flags (EINVAL)"}
        raise LinkError(f"{what} on {ifname}: {hints.get(e.code, e)}") from None


def attach(ifname: str, prog_fd: int) -> None:
    """Attach in native mode; fails if any program is already there."""
    _set_xdp(ifname, [("IFLA_XDP_FD", prog_fd),
                      ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE | XDP_FLAGS_UPDATE_IF_NOEXIST)],
             "attach XDP")


def detach(ifname: str, expected_fd: int) -> None:
    """Remove our program, and only ours."""
    _set_xdp(ifname, [("IFLA_XDP_FD", -1), ("IFLA_XDP_EXPECTED_FD", expected_fd),
                      ("IFLA_XDP_FLAGS", XDP_FLAGS_DRV_MODE | XDP_FLAGS_REPLACE)],
             "detach XDP")
