"""`make bench-xdp`: the edge program beside its baselines, in one run.

  1 BPF_PROG_TEST_RUN, ns per 64-byte packet, for 1k / 100k / 1M mixed
    prefixes: the edge program, a plain LPM-trie program and trivial
    XDP_DROP / XDP_PASS; drop and pass paths; one fixed source, and a new
    random source every packet (through bench/bpf/shim.c, whose own cost
    is measured behind the trivial program and taken out).
  2 Loading 1M prefixes as one generation, from the text file to enforced.
  3 End to end on a veth (bench/e2e.py): receive CPU per packet of the edge
    program, trivial XDP drop and pass, and an nftables netdev-ingress drop
    of the same 1M prefixes.

Prints a table, writes bench/results/xdp.json, and prints that JSON last.
Options: --quick (smaller counts, for a smoke run), --skip-nft.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent import abi
from agent import libbpf as lb
from agent.preflight import missing
from agent.standalone import StandaloneNode
from bench import denylist
from bench.e2e import VethRig
from bench.testrun import (
    SRC_CLEAN,
    SRC_DENIED,
    SRC_DENIED_28,
    SRC_DENIED_32,
    SRC_DENIED_NET,
    SRC_FIXED,
    Shim,
    frame,
    load,
    ns_per_packet,
)
from control.ops import deny_load

RESULTS = Path(__file__).resolve().parent / "results" / "xdp.json"
SIZES = (1_000, 100_000, 1_000_000)
DROP, PASS = lb.XdpAction.DROP, lb.XdpAction.PASS


def log(msg: str) -> None:
    print(msg, flush=True)


def _src_text(addr: int) -> str:
    return ".".join(str((addr >> s) & 255) for s in (24, 16, 8, 0))


def _denied_src() -> str:
    """Entry 1 of the synthetic list, a /32 (entry 0 is 0.0.0.0)."""
    addr, plen = denylist.entries(2)
    assert plen[1] == 32
    return _src_text(int(addr[1]))


def testruns(node: StandaloneNode, repeat: int) -> dict:
    """Part 1: test_run ns/packet, every program in the same run."""
    out: dict = {}
    trivial_drop = load("trivial.c", "bench_drop")
    trivial_pass = load("trivial.c", "bench_pass")
    shim = Shim.create()
    fixed_drop, fixed_pass = frame(_denied_src()), frame("199.18.7.7")
    base = node.base_rules()

    def shimmed(target: int, mode: int, n: int, expect: int) -> float:
        shim.set(target, mode, n)
        return ns_per_packet(shim.prog.fd, fixed_pass, repeat, expect=expect)

    out["trivial_drop_ns"] = ns_per_packet(trivial_drop.fd, fixed_drop, repeat)
    out["trivial_pass_ns"] = ns_per_packet(trivial_pass.fd, fixed_pass, repeat)
    out["shim_trivial_drop_ns"] = shimmed(trivial_drop.fd, SRC_DENIED, SIZES[-1], DROP)
    out["shim_trivial_pass_ns"] = shimmed(trivial_pass.fd, SRC_CLEAN, SIZES[-1], PASS)
    for n in SIZES:
        key = f"{n // 1000}k" if n < 1_000_000 else "1m"
        log(f"  {n:,} prefixes: loading the edge program's generation and the LPM trie")
        node.apply(base.with_deny("list", denylist.tables(n)))
        lpm = load("lpm.c", "bench_lpm", f"-DLPM_ENTRIES={n}")
        addr, plen = denylist.entries(n)
        keys = np.zeros(n, [("plen", "<u4"), ("addr", ">u4")])
        keys["plen"], keys["addr"] = plen, addr
        t0 = time.perf_counter()
        lb.map_update_batch(lpm.module["lpm_deny"].map_fd, keys, np.zeros(n, np.uint8), n,
                            what="lpm_deny")
        out[f"lpm_batch_load_{key}_s"] = round(time.perf_counter() - t0, 3)
        before = node.counters()
        for prog, name in ((node.root_fd, "edge"), (lpm.fd, "lpm")):
            out[f"{name}_drop_fixed_{key}_ns"] = ns_per_packet(prog, fixed_drop, repeat,
                                                                expect=DROP)
            out[f"{name}_pass_fixed_{key}_ns"] = ns_per_packet(prog, fixed_pass, repeat,
                                                                expect=PASS)
            out[f"{name}_drop_random_{key}_ns"] = shimmed(prog, SRC_DENIED, n, DROP)
            out[f"{name}_pass_random_{key}_ns"] = shimmed(prog, SRC_CLEAN, n, PASS)
        if n == SIZES[-1]:  # the cost of each path the summary can send a packet down
            for mode, cls in ((SRC_DENIED_32, "32"), (SRC_DENIED_28, "28"),
                              (SRC_DENIED_NET, "net")):
                out[f"edge_drop_random_{cls}_{key}_ns"] = shimmed(node.root_fd, mode, n, DROP)
        after = node.counters()
        runs = repeat * 5  # rounds in ns_per_packet
        got = {r.name: after[r][0] - before[r][0] for r in abi.Reason
               if after[r][0] != before[r][0]}
        classes = 3 if n == SIZES[-1] else 0
        want = {"DROP_DENYLIST": (2 + classes) * runs, "PASS": 2 * runs}
        if got != want:
            raise AssertionError(f"{n:,} prefixes: the edge program counted {got}, "
                                 f"expected {want}: the sources are not what they should be")
        lpm.release()
        # The shim's own cost, taken out: conservative edge cost per packet.
        shim_cost = out["shim_trivial_drop_ns"] - out["trivial_drop_ns"]
        out[f"edge_drop_random_{key}_net_ns"] = round(
            out[f"edge_drop_random_{key}_ns"] - shim_cost, 1)
    for t in (trivial_drop, trivial_pass, shim.prog):
        t.release()
    return out


def load_time(node: StandaloneNode, tmp: Path) -> dict:
    """Part 2: a 1M-prefix file to enforced, as `privedge deny load` does it."""
    path = denylist.write_text(SIZES[-1], tmp / "deny-1m.txt")
    node.apply(node.base_rules())
    best: dict = {}
    for _ in range(3):
        r = deny_load(node.node, str(path))
        if not best or r["total_s"] < best["total_s"]:
            best = r
    return {"load_1m_seconds": best["total_s"], "load_1m_parse_s": best["parse_s"],
            "load_1m_compile_s": best["compile_s"], "load_1m_build_s": best["build_s"],
            "load_1m_swap_s": best["swap_s"]}


def e2e(node: StandaloneNode, tmp: Path, count: int, rounds: int, nft: bool) -> dict:
    """Part 3: receive CPU per packet on a veth, each figure paired with its
    baseline measured right before it, so a noisy neighbour hits both."""
    out: dict = {}
    rig = VethRig()
    trivial_drop = load("trivial.c", "bench_drop")
    trivial_pass = load("trivial.c", "bench_pass")
    n = SIZES[-1]
    denied = _denied_src()
    try:
        rig.up()
        node.apply(node.base_rules().with_deny("list", denylist.tables(n)))

        def sample(prog_fd: int | None, mode: int, src: str):
            if prog_fd is not None:
                rig.attach(prog_fd)
            try:
                return rig.measure(mode, n, count, src)
            finally:
                if prog_fd is not None:
                    rig.detach()

        def paired(name: str, base_fd: int, fd: int | None, mode: int,
                   src: str = "198.18.7.7", expect: abi.Reason | None = None) -> None:
            before = node.counters()
            pairs = [(sample(base_fd, mode, src), sample(fd, mode, src)) for _ in range(rounds)]
            after = node.counters()
            seen = {r.name: after[r][0] - before[r][0] for r in abi.Reason
                    if after[r][0] != before[r][0]}
            stray = sum(v for k, v in seen.items() if expect is None or k != expect.name)
            if expect is not None and stray > 10:
                raise AssertionError(f"{name}: the edge program counted {seen}, expected only "
                                     f"{expect.name}: the sources are not what they should be")
            out[name] = {
                "ratio": round(statistics.median(b.ns_per_packet / x.ns_per_packet
                                                 for b, x in pairs), 3),
                "ns_per_packet": round(statistics.median(x.ns_per_packet for _, x in pairs), 1),
                "baseline_ns_per_packet": round(
                    statistics.median(b.ns_per_packet for b, _ in pairs), 1),
                "mpps_per_core": round(statistics.median(x.mpps_per_core for _, x in pairs), 2),
                "packets": sum(x.packets for _, x in pairs),
                "pairs_ns": [[round(b.ns_per_packet, 1), round(x.ns_per_packet, 1)]
                             for b, x in pairs],
            }
            log(f"  {name:<24} {out[name]['ns_per_packet']:>8.1f} ns/packet, "
                f"{out[name]['ratio']:.3f}x the baseline's rate")

        deny, ok = abi.Reason.DROP_DENYLIST, abi.Reason.PASS
        paired("edge_drop_random_1m", trivial_drop.fd, node.root_fd, SRC_DENIED, expect=deny)
        paired("edge_drop_fixed_1m", trivial_drop.fd, node.root_fd, SRC_FIXED, denied, deny)
        paired("edge_pass_random_1m", trivial_pass.fd, node.root_fd, SRC_CLEAN, expect=ok)
        if nft:
            log("  loading 1M prefixes into an nftables set (slow)")
            prefixes = denylist.write_text(n, tmp / "nft-1m.txt")
            out["nft_load_1m_s"] = round(rig.nft_load(prefixes), 2)
            paired("nft_drop_random_1m", trivial_drop.fd, None, SRC_DENIED)
            rig.nft_flush()
    finally:
        rig.down()
        trivial_drop.release()
        trivial_pass.release()
    return out


def summarise(tr: dict, lt: dict, ee: dict) -> dict:
    trivial = tr["trivial_drop_ns"]
    summary = {
        "testrun_ratio_drop_random_1m": round(tr["edge_drop_random_1m_net_ns"] / trivial, 2),
        "testrun_ratio_drop_random_1m_with_shim": round(
            tr["edge_drop_random_1m_ns"] / tr["shim_trivial_drop_ns"], 2),
        "testrun_ratio_drop_fixed_1m": round(tr["edge_drop_fixed_1m_ns"] / trivial, 2),
        "testrun_ratio_lpm_drop_random_1m": round(
            (tr["lpm_drop_random_1m_ns"] - tr["shim_trivial_drop_ns"] + trivial) / trivial, 2),
        "e2e_ratio_random_1m": ee["edge_drop_random_1m"]["ratio"],
        "e2e_ratio_fixed_1m": ee["edge_drop_fixed_1m"]["ratio"],
        "e2e_ratio_pass": ee["edge_pass_random_1m"]["ratio"],
        "load_1m_seconds": lt["load_1m_seconds"],
    }
    if "nft_drop_random_1m" in ee:
        summary["e2e_ratio_nft_random_1m"] = ee["nft_drop_random_1m"]["ratio"]
    return summary


def table(tr: dict, ee: dict) -> str:
    rows = ["test_run ns/packet     trivial    edge 1k  edge 100k    edge 1M     LPM 1M"]
    for path, mode, trivial in (("drop", "fixed", "trivial_drop_ns"),
                                ("drop", "random", "shim_trivial_drop_ns"),
                                ("pass", "fixed", "trivial_pass_ns"),
                                ("pass", "random", "shim_trivial_pass_ns")):
        vals = [tr[trivial]] + [tr[f"edge_{path}_{mode}_{k}_ns"] for k in ("1k", "100k", "1m")]
        vals.append(tr[f"lpm_{path}_{mode}_1m_ns"])
        rows.append(f"  {path} {mode:<6}        " + "".join(f"{v:>11.0f}" for v in vals))
    rows.append("")
    rows.append("veth, receive CPU per packet   this   baseline   rate ratio (median of pairs)")
    for k, v in ee.items():
        if isinstance(v, dict):
            rows.append(f"  {k:<26}{v['ns_per_packet']:>8.1f}{v['baseline_ns_per_packet']:>11.1f}"
                        f"{v['ratio']:>13.3f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--skip-nft", action="store_true", help="skip the slow nftables comparison")
    args = p.parse_args(argv)
    problems = missing()
    if problems:
        print("bench: " + "; ".join(problems), file=sys.stderr)
        return 1
    repeat, count, rounds = (100_000, 300_000, 2) if args.quick else (1_000_000, 3_000_000, 9)
    tmp = Path(tempfile.mkdtemp(prefix="pe-bench-"))
    node = StandaloneNode("bench")
    try:
        # End to end first: the other parts free large maps, and the kernel's
        # deferred freeing of a million trie nodes would run beside it.
        log("== 3 end to end on a veth")
        ee = e2e(node, tmp, count, rounds, nft=not args.skip_nft)
        log("== 1 BPF_PROG_TEST_RUN")
        tr = testruns(node, repeat)
        log("== 2 loading 1M prefixes as one generation")
        lt = load_time(node, tmp)
    finally:
        node.close()
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarise(tr, lt, ee)
    result = {**summary, "testrun": tr, "load": lt, "e2e": ee,
              "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
              "command": "sudo make bench-xdp", "quick": args.quick}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + table(tr, ee) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
