"""The agent on a veth in a namespace, real traffic through it.

A scapy-built attack mix crosses the veth; a receiver in the edge namespace
counts what reached the stack, by source. Then the agent is restarted while
traffic flows, and not one denylisted frame may get through.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from scapy.utils import wrpcap

from lab import attack_mix, netns


def _collect(p) -> dict:
    out, _ = p.communicate(timeout=120)
    return json.loads(out)


def _counters(lab) -> dict[str, int]:
    s = lab.cli("status", "--interval", "0")
    return {c["reason"]: c["packets"] for c in s["counters"]}


def test_attack_mix_only_legitimate_traffic_reaches_the_stack(lab) -> None:
    lab.config(**attack_mix.NODE_RULES)
    lab.start_agent()
    cats = attack_mix.build(lab.rx_mac, lab.tx_mac)
    pcap = lab.tmp / "mix.pcap"
    frames = [*attack_mix.interleave(cats), attack_mix.stop_frame(lab.rx_mac, lab.tx_mac)]
    wrpcap(str(pcap), frames, linktype=1)
    before = _counters(lab)
    recv, _ = lab.receiver(duration=60)
    t0 = time.monotonic()
    sent = lab.send(pcap, pps=4000)
    elapsed = time.monotonic() - t0
    got = attack_mix.tally(cats, _collect(recv)["by_src"])
    after = _counters(lab)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert sent == len(frames)

    for c in cats:
        if c.fate == "deliver":
            assert got[c.label] == c.count, f"{c.label}: {got[c.label]} of {c.count} arrived"
        elif c.fate == "drop":
            assert got[c.label] == 0, f"{c.label}: {got[c.label]} got through"
    flood = next(c for c in cats if c.fate == "limit")
    limit = attack_mix.SYN_LIMIT
    allowed = got[flood.label]
    assert limit["burst"] <= allowed <= limit["burst"] + limit["pps"] * (elapsed + 1), \
        f"SYN flood: {allowed} of {flood.count} passed in {elapsed:.1f}s"
    # The node's own counters agree with what the receiver saw.
    by_reason: dict[str, int] = {}
    for c in cats:
        if c.fate != "deliver":
            by_reason[c.reason] = by_reason.get(c.reason, 0) + c.count - got[c.label]
    for reason, n in by_reason.items():
        assert delta[reason] == n, f"counter {reason}: {delta[reason]}, expected {n}"
    assert delta["ok"] >= sum(c.count for c in cats if c.fate == "deliver") + allowed


def test_restart_under_traffic_lets_no_denylisted_frame_through(lab) -> None:
    lab.config(**attack_mix.NODE_RULES)
    lab.start_agent()
    cats = [c for c in attack_mix.build(lab.rx_mac, lab.tx_mac)
            if c.label in ("legit TCP", "denylisted host", "denylisted /24", "denylisted IPv6")]
    pcap = lab.tmp / "restart.pcap"
    wrpcap(str(pcap), attack_mix.interleave(cats), linktype=1)
    recv, _ = lab.receiver(duration=90)
    sender = netns.popen(lab.tx, netns.python(
        "lab.send", "--iface", "tx0", "--pcap", str(pcap), "--loops", "12", "--pps", "2500",
        "--timeout", "60"), stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    lab.stop_agent()            # the agent is gone: pins and program stay
    assert xdp_link_attached(lab)
    time.sleep(1.0)
    lab.start_agent()           # adopts, recompiles, swaps the edge program
    out, _ = sender.communicate(timeout=120)
    sent = json.loads(out)["sent"]
    stop = lab.tmp / "stop.pcap"
    wrpcap(str(stop), [attack_mix.stop_frame(lab.rx_mac, lab.tx_mac)], linktype=1)
    lab.send(stop)
    got = attack_mix.tally(cats, _collect(recv)["by_src"])
    per_loop = sum(c.count for c in cats)
    assert sent == 12 * per_loop, f"sender stopped early: {sent}"
    assert got["legit TCP"] == 12 * cats[0].count, "legitimate frames were lost"
    for label in ("denylisted host", "denylisted /24", "denylisted IPv6"):
        assert got[label] == 0, f"{label}: {got[label]} got through during the restart"
    assert "adopting" in lab.log.read_text()


def xdp_link_attached(lab) -> bool:
    """Ask netlink inside the edge namespace whether our program is still there."""
    from pyroute2 import NetNS

    with NetNS(lab.rx) as ns:
        link = ns.get_links(ns.link_lookup(ifname="rx0")[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    return bool(xdp and xdp.get_attr("IFLA_XDP_PROG_ID"))


def test_detach_removes_everything(lab) -> None:
    lab.config()
    lab.start_agent()
    assert xdp_link_attached(lab)
    lab.stop_agent()
    netns.run(lab.rx, netns.python("agent.daemon", "detach", "rx0", "--bpffs", lab.bpffs,
                                   "--run-dir", lab.run_dir), capture_output=True)
    assert not xdp_link_attached(lab)
    assert not os.path.exists(f"{lab.bpffs}/rx0")
    assert not os.path.exists(f"{lab.run_dir}/rx0")
