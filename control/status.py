"""`privedge status`: what a node enforces and what it has seen. Reads only."""

from __future__ import annotations

import os
import time

from agent import abi, catalog, xdp_link
from agent import libbpf as lb
from agent.node import PROG_EDGE, PROG_ROOT, Node
from control.ops import current_rules


def _prog(node: Node, which: str) -> dict:
    try:
        fd = lb.obj_get(node.prog_path(which))
    except lb.BpfError:
        return {}
    try:
        info = lb.prog_info(fd)
        return {"id": info.id, "tag": info.tag}
    finally:
        os.close(fd)


def _attached(node: Node) -> str:
    try:
        cur = xdp_link.attached(node.ifname)
    except xdp_link.LinkError:
        return "unknown here (the interface is in another network namespace?)"
    root = _prog(node, PROG_ROOT)
    if cur is None:
        return "NOT ATTACHED"
    if cur.prog_id != root.get("id"):
        return f"another program (id {cur.prog_id}) is attached"
    return f"{cur.mode}, root program id {cur.prog_id}"


def gather(node: Node, interval: float = 1.0) -> dict:
    first = node.counters()
    t0 = time.monotonic()
    if interval > 0:
        time.sleep(interval)
    second = node.counters() if interval > 0 else first
    dt = max(time.monotonic() - t0, 1e-9)
    rules = current_rules(node)
    counters = []
    for r in abi.Reason:
        c = second[r]
        counters.append({
            "verdict": r.verdict, "reason": r.label, "packets": c.packets, "bytes": c.bytes,
            "pps": round((c.packets - first[r].packets) / dt, 1) if interval > 0 else None,
        })
    active = node.active()
    steering = None
    if rules.steering:
        st = rules.steering
        tunnelled = node.counters("steered")
        steering = {
            "dc": st.dc, "region": st.region, "backbone": st.backbone_address,
            "services": len(st.services),
            "dcs": [{"dc": d.name, "region": d.region, "enabled": d.enabled,
                     "tunnelled_packets": tunnelled[i].packets,
                     "tunnelled_bytes": tunnelled[i].bytes} for i, d in enumerate(st.dcs)],
        }
    return {
        "interface": node.ifname,
        "generation": active.generation,
        "slot": active.slot,
        "attached": _attached(node),
        "edge_program": _prog(node, PROG_EDGE),
        "last_change": catalog.load_report(node.run_dir),
        "deny": {s: len(rules.deny[s]) for s in rules.deny},
        "allow": len(rules.allow),
        "bogons": len(rules.bogons) if rules.public else 0,
        "role": "public" if rules.public else "backbone",
        "l4_rules": [f"{r.name}: {r.action} proto {r.proto}"
                     + (f" sport {','.join(map(str, r.sport))}" if r.sport else "")
                     + (f" dport {','.join(map(str, r.dport))}" if r.dport else "")
                     for r in rules.l4_rules],
        "limits": {k: {"pps": v.pps, "burst": v.burst}
                   for k, v in (("syn", rules.limits.syn), ("udp", rules.limits.udp))},
        "counters": counters,
        "steering": steering,
    }


def _num(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def render(s: dict, all_reasons: bool = False) -> str:
    lc = s["last_change"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lc["at"])) if lc.get("at") else "?"
    lines = [
        f"privedge on {s['interface']} ({s['role']}): generation {s['generation']} "
        f"in slot {s['slot']}; last change {lc.get('kind', '?')} at {when}",
        f"  attached: {s['attached']}; edge program tag {s['edge_program'].get('tag', '?')}",
        f"  denylist: {s['deny']['config']:,} from config, {s['deny']['list']:,} loaded, "
        f"{s['deny']['adhoc']:,} added; allowlist {s['allow']:,}; bogons {s['bogons']:,}",
        f"  limits: SYN {s['limits']['syn']['pps']}/s burst {s['limits']['syn']['burst']}, "
        f"UDP {s['limits']['udp']['pps']}/s burst {s['limits']['udp']['burst']} "
        "(per source; 0 = off)",
        "  L4 rules: " + ("; ".join(s["l4_rules"]) or "none"),
    ]
    st = s.get("steering")
    if st:
        to = ", ".join(f"{d['dc']} {_num(d['tunnelled_packets'])}" for d in st["dcs"]
                       if d["tunnelled_packets"])
        lines.append(f"  steering: dc {st['dc']} (region {st['region']}, backbone "
                     f"{st['backbone']}), {st['services']} regional IPs; tunnelled to: "
                     f"{to or 'none yet'}")
    lines += [
        "",
        f"  {'verdict':<8} {'reason':<17} {'packets':>10} {'bytes':>10} {'pps':>10}",
    ]
    for c in s["counters"]:
        if c["packets"] or all_reasons:
            pps = "" if c["pps"] is None else _num(c["pps"])
            lines.append(f"  {c['verdict']:<8} {c['reason']:<17} {_num(c['packets']):>10} "
                         f"{_num(c['bytes']):>10} {pps:>10}")
    return "\n".join(lines)
