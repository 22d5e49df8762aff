"""`sudo make demo`: the Regional Services story on the multi-DC lab.

    python -m lab.demo                  lab up, the story step by step, lab down
    python -m lab.demo --keep           ... and leave the lab up to look around
    python -m lab.demo --clean          only remove what a kept run left
    python -m lab.demo --filter-only    the single-link attack-mix demo instead

The lab of lab/topology.yaml comes up in network namespaces (el-*) with an
agent per DC. Katerina in Cologne is served by Düsseldorf, then, having
driven to Frankfurt, by Frankfurt; a user in the US asking for the EU-only
shop lands in Ashburn, whose XDP program tunnels the packets to an EU DC
without terminating TLS; a denylisted attacker's burst dies in Ashburn's
XDP. Every step prints its evidence (XDP and front-end counters, a capture
of the backbone) and PASS or FAIL (lab/story.py). Exit 0 when all passed.

--filter-only replays a scapy attack mix at one edge (two namespaces,
el-client and el-dus, joined by a veth) and reports per kind of traffic
what reached the stack. Its namespace names clash with the lab's, so it
runs only while the lab is down.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from agent.preflight import missing
from lab import attack_mix, netns
from lab.cluster import Lab, LabError
from lab.story import filter_demo_leftovers, tell
from lab.topology import TopologyError, load_topology
from lab.twons import TwoNamespaces

TOOLS = ("curl", "tcpdump", "nsenter", "ethtool", "ip")


def report(cats, got: dict[str, int], counters: dict[str, int], sent: int,
           seconds: float, sender: str = "el-client") -> tuple[str, bool]:
    lines = [f"sent {sent:,} frames from {sender} in {seconds:.2f} s", "",
             f"  {'category':<22} {'sent':>7} {'reached stack':>14} {'dropped':>8}  counted as"]
    ok = True
    for c in cats:
        arrived = got[c.label]
        lines.append(f"  {c.label:<22} {c.count:>7,} {arrived:>14,} {c.count - arrived:>8,}  "
                     f"{c.reason}")
        if (c.fate == "deliver" and arrived != c.count) or (c.fate == "drop" and arrived):
            ok = False
        if c.fate == "limit" and not 0 < arrived < c.count:
            ok = False
    legit = [c for c in cats if c.fate == "deliver"]
    delivered = sum(got[c.label] for c in legit)
    want = sum(c.count for c in legit)
    drops = {k: v for k, v in counters.items() if v and k not in ("ok", "not_ip")}
    lines += ["", "  node counters, dropped by reason: " +
              ", ".join(f"{k} {v:,}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])),
              f"  passed to the stack: {counters.get('ok', 0):,}",
              f"  legitimate traffic delivered: {delivered:,} of {want:,} "
              f"({100 * delivered / max(want, 1):.0f}%)",
              "", "  RESULT: " + ("every legitimate frame arrived, no attack frame did, the "
                                 "SYN flood was cut to its limit" if ok else "UNEXPECTED, see "
                                 "the table")]
    return "\n".join(lines), ok


def filter_only(prefix: str, keep: bool, scale: int) -> int:
    """The single-link demo: an attack mix against one protected edge."""
    try:
        cluster = Lab(load_topology(), prefix=prefix)
    except (LabError, TopologyError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    ours = set(filter_demo_leftovers(prefix))
    if cluster.state_dir.exists() or any(netns.exists(n) for n in cluster.namespaces
                                         if n not in ours):
        print(f"demo: the multi-DC lab {prefix} is up and uses {prefix}client and {prefix}dus "
              "too; remove it first: sudo .venv/bin/python -m lab.demo --clean",
              file=sys.stderr)
        return 1
    lab = TwoNamespaces(prefix.rstrip("-"), tx="client", rx="dus")
    lab.down()  # a crashed or kept earlier run may have left these
    try:
        print(f"== building {lab.tx} and {lab.rx}, joined by a veth")
        lab.up()
        lab.config(**attack_mix.NODE_RULES)
        print(f"== starting privedge-agent in {lab.rx} on rx0")
        lab.start_agent()
        for line in lab.log.read_text().splitlines():
            print("   " + line)
        cats = attack_mix.build(lab.rx_mac, lab.tx_mac, scale=scale)
        frames = [*attack_mix.interleave(cats), attack_mix.stop_frame(lab.rx_mac, lab.tx_mac)]
        pcap = lab.tmp / "mix.pcap"
        from scapy.utils import wrpcap

        wrpcap(str(pcap), frames, linktype=1)
        before = {c["reason"]: c["packets"] for c in lab.cli("status", "--interval", "0")
                  ["counters"]}
        print(f"== replaying {len(frames):,} frames ({len(cats)} kinds) at 5,000 per second")
        recv, _ = lab.receiver(duration=120)
        t0 = time.monotonic()
        sent = lab.send(pcap, pps=5000)
        seconds = time.monotonic() - t0
        out, _ = recv.communicate(timeout=150)
        got = attack_mix.tally(cats, json.loads(out)["by_src"])
        status = lab.cli("status", "--interval", "0")
        counters = {c["reason"]: c["packets"] - before.get(c["reason"], 0)
                    for c in status["counters"]}
        text, ok = report(cats, got, counters, sent, seconds, lab.tx)
        print("\n== what happened\n" + text)
        return 0 if ok else 1
    finally:
        if keep:
            print(f"\n(kept: namespaces {lab.tx}, {lab.rx}; pins under {lab.bpffs}; state in "
                  f"{lab.run_dir}; remove with `sudo .venv/bin/python -m lab.demo --clean`)")
        else:
            lab.down()
            print(f"\n== removed {lab.tx}, {lab.rx}, the pins and the state")


def clean(prefix: str) -> int:
    """Remove what a kept run (of either demo) left."""
    left = filter_demo_leftovers(prefix)
    if left:
        TwoNamespaces(prefix.rstrip("-"), tx="client", rx="dus").down()
        print(f"removed the single-link demo: {', '.join(left)}")
    try:
        lab = Lab(load_topology(), prefix=prefix)
        removed = lab.down()["removed"]
    except (LabError, TopologyError) as e:
        print(f"demo --clean: {e}", file=sys.stderr)
        return 1
    spaces = sum(1 for r in removed if r.startswith("namespace "))
    print(f"removed lab {prefix}: {spaces} namespaces" if spaces
          else f"lab {prefix}: nothing left to remove")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    p.add_argument("--clean", action="store_true", help="only remove what --keep left")
    p.add_argument("--filter-only", action="store_true",
                   help="the single-link attack-mix demo (only while the lab is down)")
    p.add_argument("--scale", type=int, default=2,
                   help="--filter-only: multiply the attack mix (default: 2)")
    p.add_argument("--prefix", default="el-", help=argparse.SUPPRESS)  # tests: a lab of their own
    args = p.parse_args(argv)
    problems = missing() + [f"{t} not found: `sudo make setup` installs it"
                            for t in TOOLS if shutil.which(t) is None]
    if problems:
        print("demo: " + "; ".join(problems), file=sys.stderr)
        return 1
    if args.clean:
        return clean(args.prefix)
    if args.filter_only:
        return filter_only(args.prefix, args.keep, args.scale)
    return tell(args.prefix, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
