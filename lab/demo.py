"""`sudo make demo`: an attack mix against one protected edge, and a report.

    el-client  tx0 ---- veth ---- rx0  el-dus (agent, XDP on rx0)

Builds the two namespaces, starts the agent in el-dus, replays a scapy
attack mix (denylisted hosts and networks, bogons, NTP and memcached
reflection, a SYN flood, truncated headers, and legitimate TCP, UDP and
IPv6 among them), counts what reached el-dus's stack, and prints what
happened. Removes everything afterwards unless --keep.
Exit 0 when every legitimate frame arrived and no attack frame did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from scapy.utils import wrpcap

from agent.preflight import missing
from lab import attack_mix
from lab.twons import TwoNamespaces


def report(cats, got: dict[str, int], counters: dict[str, int], sent: int,
           seconds: float) -> tuple[str, bool]:
    lines = [f"sent {sent:,} frames from el-client in {seconds:.2f} s", "",
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", action="store_true", help="leave the namespaces and agent up")
    p.add_argument("--clean", action="store_true", help="only remove what --keep left")
    p.add_argument("--scale", type=int, default=2, help="multiply the mix (default: 2)")
    args = p.parse_args(argv)
    problems = missing()
    if problems:
        print("demo: " + "; ".join(problems), file=sys.stderr)
        return 1
    lab = TwoNamespaces("el", tx="client", rx="dus")
    lab.down()  # a crashed or kept earlier run may have left these
    if args.clean:
        return 0
    try:
        print("== building el-client and el-dus, joined by a veth")
        lab.up()
        lab.config(**attack_mix.NODE_RULES)
        print("== starting privedge-agent in el-dus on rx0")
        lab.start_agent()
        for line in lab.log.read_text().splitlines():
            print("   " + line)
        cats = attack_mix.build(lab.rx_mac, lab.tx_mac, scale=args.scale)
        frames = [*attack_mix.interleave(cats), attack_mix.stop_frame(lab.rx_mac, lab.tx_mac)]
        pcap = lab.tmp / "mix.pcap"
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
        text, ok = report(cats, got, counters, sent, seconds)
        print("\n== what happened\n" + text)
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"\n(kept: namespaces el-client, el-dus; pins under {lab.bpffs}; state in "
                  f"{lab.run_dir}; remove with `sudo .venv/bin/python -m lab.demo --clean`)")
        else:
            lab.down()
            print("\n== removed el-client, el-dus, the pins and the state")


if __name__ == "__main__":
    sys.exit(main())
