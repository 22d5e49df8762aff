"""Network namespaces and veth pairs for the lab, the demo and the tests.

Everything is created inside namespaces this module makes (names carry the
caller's prefix) and removed with them; the host's own interfaces and
routes are never touched. Programs run in a namespace through
`nsenter --net`, which keeps the host's mounts, so /sys/fs/bpf stays the
bpffs the agent pins into (`ip netns exec` would remount /sys).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from pyroute2 import NetNS, netns

ROOT = Path(__file__).resolve().parents[1]
CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02
PYTHON = sys.executable


def exists(name: str) -> bool:
    return name in netns.listnetns()


def create(name: str) -> None:
    if not exists(name):
        netns.create(name)
    with NetNS(name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=lo, state="up")


def disable_ipv6(name: str) -> None:
    """No IPv6 on interfaces made from now on in `name`: no router
    solicitations or MLD reports from link-local addresses."""
    run(name, ["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1",
               "net.ipv6.conf.all.disable_ipv6=1"])


def delete(name: str) -> None:
    if exists(name):
        netns.remove(name)


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair from ns_a:if_a to ns_b:if_b, both up (made inside ns_a)."""
    with NetNS(ns_a) as a:
        if not a.link_lookup(ifname=if_a):
            a.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b})
        a.link("set", index=a.link_lookup(ifname=if_a)[0], state="up")
    with NetNS(ns_b) as b:
        b.link("set", index=b.link_lookup(ifname=if_b)[0], state="up")


def address(ns: str, ifname: str, cidr: str) -> None:
    addr, plen = cidr.split("/")
    with NetNS(ns) as n:
        idx = n.link_lookup(ifname=ifname)[0]
        have = [a.get_attr("IFA_ADDRESS") for a in n.get_addr(index=idx)]
        if addr not in have:
            # IPv6 without duplicate address detection: usable at once.
            extra = {"flags": IFA_F_NODAD} if ":" in addr else {}
            n.addr("add", index=idx, address=addr, prefixlen=int(plen), **extra)


def route(ns: str, dst: str, gateway: str) -> None:
    with NetNS(ns) as n:
        n.route("replace", dst=dst, gateway=gateway)


def neighbour(ns: str, ifname: str, ip: str, mac: str) -> None:
    """A permanent neighbour entry, so tests need no ARP/ND round trip."""
    with NetNS(ns) as n:
        idx = n.link_lookup(ifname=ifname)[0]
        n.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, state="permanent")


def mac(ns: str, ifname: str) -> str:
    with NetNS(ns) as n:
        return n.get_links(n.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_ADDRESS")


def nsenter(ns: str, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run(ns: str, argv: Sequence[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(nsenter(ns, argv), timeout=timeout, check=True, env=_env(), **kw)


def popen(ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(nsenter(ns, argv), env=_env(), **kw)


def python(module: str, *args: str) -> list[str]:
    return [PYTHON, "-m", module, *args]


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[None]:
    """Create namespaces, and remove them (and their veths) however we leave."""
    try:
        for n in names:
            create(n)
        yield
    finally:
        for n in names:
            delete(n)


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run this thread in network namespace `name`, then come back.

    BPF_PROG_TEST_RUN judges an XDP frame as received by the loopback of
    the caller's namespace, so bpf_fib_lookup() sees that namespace's routes
    and neighbours: steering tests build a backbone there, never on the host.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's namespace failed")
    finally:
        os.close(target)
        os.close(home)


