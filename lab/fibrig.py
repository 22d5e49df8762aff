"""A namespace with a backbone link, for steering under BPF_PROG_TEST_RUN.

The kernel judges a test-run XDP frame as received in the caller's
namespace, so bpf_fib_lookup() consults that namespace's routes and
neighbours. Tests and benchmarks enter this one (tests/harness.py
inside_netns) to steer frames without any real peer DC:

    bb0 198.18.0.3/24, MTU 1600, forwarding on     bbpeer (GRO on, so frames
    permanent neighbours for the NEIGHBOURS below  redirected to bb0 are taken)
    198.18.0.8 routed with MTU 1000 (locked)
"""

from __future__ import annotations

from pyroute2 import NetNS

from lab import netns

ADDRESS = "198.18.0.3"
NEIGHBOURS = {"198.18.0.1": "02:00:00:00:bb:01", "198.18.0.2": "02:00:00:00:bb:02",
              "198.18.0.8": "02:00:00:00:bb:08"}
SMALL_MTU_PEER, SMALL_MTU = "198.18.0.8", 1000
RTAX_FEATURE_LOCK_MTU = 1 << 2


def create(name: str) -> tuple[str, int]:
    """Build the namespace; returns bb0's MAC address and ifindex."""
    netns.create(name)
    netns.disable_ipv6(name)
    netns.veth(name, "bb0", name, "bbpeer")
    netns.address(name, "bb0", f"{ADDRESS}/24")
    with NetNS(name) as ns:
        idx = ns.link_lookup(ifname="bb0")[0]
        ns.link("set", index=idx, mtu=1600)
        for ip, mac in NEIGHBOURS.items():
            ns.neigh("replace", dst=ip, lladdr=mac, ifindex=idx, state="permanent")
        ns.route("replace", dst=f"{SMALL_MTU_PEER}/32", oif=idx, scope="link",
                 metrics={"mtu": SMALL_MTU, "lock": RTAX_FEATURE_LOCK_MTU})
    netns.run(name, ["sysctl", "-qw", "net.ipv4.conf.bb0.forwarding=1"])
    netns.run(name, ["ethtool", "-K", "bbpeer", "gro", "on"], capture_output=True)
    return netns.mac(name, "bb0"), idx
