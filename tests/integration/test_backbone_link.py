"""The agent prepares a DC's backbone link for steering, and says so."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agent.backbone import TABLE, check_mtu, prepare_backbone, release_backbone
from lab import netns
from lab.netns import inside_netns


def _sysctl(path: str) -> str:
    return Path(f"/proc/sys/{path}").read_text().strip()


def test_prepare_backbone_guards_forwarding_sets_loose_rp_and_ipv6() -> None:
    ns = f"pe{os.getpid()}bbp"
    try:
        netns.create(ns)
        netns.veth(ns, "bb0", ns, "bbpeer")
        netns.run(ns, ["sysctl", "-qw", "net.ipv4.conf.bb0.forwarding=0",
                       "net.ipv4.conf.all.rp_filter=1", "net.ipv6.conf.bb0.disable_ipv6=1"])
        said: list[str] = []
        with inside_netns(ns):
            index = prepare_backbone("bb0", lambda _name, detail: said.append(detail))
            assert _sysctl("net/ipv4/conf/bb0/forwarding") == "1"
            assert _sysctl("net/ipv4/conf/bb0/rp_filter") == "2"
            assert _sysctl("net/ipv4/conf/all/forwarding") == "0", "only the link forwards"
            assert _sysctl("net/ipv6/conf/bb0/disable_ipv6") == "0"
            guard = subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True,
                                   text=True, check=True).stdout
            assert 'iifname "bb0"' in guard and "drop" in guard and "hook forward" in guard
            again: list[str] = []
            prepare_backbone("bb0", lambda _name, detail: again.append(detail))
            assert release_backbone("bb0") and not release_backbone("bb0")
        assert index > 0 and len(said) == 4 and again == [], said
    finally:
        netns.delete(ns)


def test_a_backbone_too_small_for_the_tunnel_is_named() -> None:
    ns = f"pe{os.getpid()}mtu"
    try:
        netns.create(ns)
        netns.veth(ns, "inet0", ns, "inetp")
        netns.veth(ns, "bb0", ns, "bbpeer")
        said: list[str] = []
        with inside_netns(ns):
            check_mtu("inet0", "bb0", lambda _name, detail: said.append(detail))
            assert said and "bb0 MTU 1500 is under inet0 MTU 1500 + 20" in said[0]
            netns.run(ns, ["ip", "link", "set", "bb0", "mtu", "1520"])
            said.clear()
            check_mtu("inet0", "bb0", lambda _name, detail: said.append(detail))
            assert said == []
    finally:
        netns.delete(ns)
