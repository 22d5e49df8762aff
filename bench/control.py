"""`make bench-control`: from `privedge-net apply` to every lab DC enforcing (issue 6 §7).

In the lab (lab/cluster.py, a prefix of this run's own), from the core's
namespace, the operator's command as an operator runs it (a new process:
its Python start-up is counted):

  noop        the lab's network applied again, unchanged: the CLI's start,
              validation and one mTLS round trip to each DC (the baseline)
  one prefix  the lab's network with Katerina's /32 denied, then without it,
              alternately: each apply a change of one prefix
  100k list   a new deny list file of 100,000 prefixes (bench/denylist.py's
              mix: 90% /32, the rest /28 to /20; Katerina's /32 among them),
              then the network without it

The time is the wall time of the command: it returns once every DC has
answered, and an agent answers after its links' BPF generations are
swapped, so every DC enforces by then. After the timed runs, pings from
Katerina through each DC show it: dropped while she is denied, answered
when she is not. Medians; ratios against the noop apply in the same run.

    python -m bench.control [--quick]

Prints a table, writes bench/results/control.json, prints its summary JSON last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from bench import denylist

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "control.json"
BARS = {"apply_one_prefix_s": 1.0, "apply_100k_s": 3.0}
CLIENT = "203.0.113.10"
ANYCAST = "198.51.100.10"
LIST_SIZE = 100_000
DCS = ("dus", "fra", "iad")


def log(msg: str) -> None:
    print(f"bench-control: {msg}", file=sys.stderr, flush=True)


class Operator:
    """privedge-net in the core's namespace, as the lab's admin."""

    def __init__(self, lab) -> None:
        self.lab = lab

    def run(self, *args: str) -> tuple[float, dict]:
        argv = [self.lab.python, "-m", "control.netcli", "--network",
                str(self.lab.network_file), "--pki", str(self.lab.state_dir / "netpki"),
                "--operator", "lab-admin", "--audit",
                str(self.lab.state_dir / "control-audit.jsonl"), "--store",
                str(self.lab.control_store), "--json", *args]
        t0 = time.perf_counter()
        r = self.lab.exec("core", argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"privedge-net {' '.join(args)} failed: {r.stdout}{r.stderr}")
        return wall, json.loads(r.stdout)

    def apply(self, path: Path) -> dict:
        wall, per_dc = self.run("apply", str(path))
        if set(per_dc) != set(DCS) or not all(d["ok"] for d in per_dc.values()):
            raise RuntimeError(f"not every DC applied {path}: {per_dc}")
        slowest = max(per_dc, key=lambda dc: per_dc[dc]["seconds"])
        return {"wall_s": wall, "generation": per_dc["dus"]["generation"],
                "dc_max_s": per_dc[slowest]["seconds"],
                "agent_max_s": max(d.get("apply_s", 0.0) for d in per_dc.values()),
                "slowest_dc": slowest, "slowest_steps": per_dc[slowest].get("steps", {})}


def pings_through(lab, dc: str) -> int:
    lab.move("client", dc)
    r = lab.exec("client", ["ping", "-c", "2", "-i", "0.2", "-W", "1", ANYCAST],
                 capture_output=True, text=True, timeout=30)
    return int(r.stdout.split(" received")[0].rsplit(" ", 1)[-1])


def enforced(lab, denied: bool) -> bool:
    try:
        got = [pings_through(lab, dc) for dc in DCS]
    finally:
        lab.move("client", "dus")
    return got == ([0] * len(DCS) if denied else [2] * len(DCS))


def networks(lab, work: Path) -> dict[str, Path]:
    base = yaml.safe_load(lab.network_file.read_text())
    one = copy.deepcopy(base)
    one["deny"]["prefixes"].append(f"{CLIENT}/32")
    big = copy.deepcopy(base)
    big_list = work / "list-100k.txt"
    denylist.write_text(LIST_SIZE - 1, big_list)
    with open(big_list, "a") as f:
        f.write(f"{CLIENT}/32\n")
    big["deny"]["files"] = [str(big_list)]
    out = {}
    for name, doc in (("base", base), ("one", one), ("big", big)):
        out[name] = work / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def median(runs: list[dict], key: str = "wall_s") -> float:
    return round(statistics.median(r[key] for r in runs), 4)


def measure(lab, rounds: int) -> dict:
    work = lab.state_dir / "bench-control"
    work.mkdir(exist_ok=True)
    files = networks(lab, work)
    op = Operator(lab)
    op.apply(files["base"])                     # generation 1: the lab as it is
    noop, one_add, one_remove, big_add, big_remove = [], [], [], [], []
    for i in range(rounds):
        log(f"round {i + 1}/{rounds}")
        noop.append(op.apply(files["base"]))
        one_add.append(op.apply(files["one"]))
        if i == 0 and not enforced(lab, denied=True):
            raise RuntimeError("after the one-prefix apply, Katerina is not dropped at every DC")
        one_remove.append(op.apply(files["base"]))
        if i == 0 and not enforced(lab, denied=False):
            raise RuntimeError("after its removal, Katerina is not answered at every DC")
        big_add.append(op.apply(files["big"]))
        if i == 0 and not enforced(lab, denied=True):
            raise RuntimeError("after the 100k list, Katerina is not dropped at every DC")
        big_remove.append(op.apply(files["base"]))
    if not enforced(lab, denied=False):
        raise RuntimeError("after the last apply, Katerina is not answered at every DC")
    noop_s = median(noop)
    one = one_add + one_remove
    return {
        "rounds": rounds,
        "noop_s": noop_s,
        "apply_one_prefix_s": median(one),
        "apply_one_prefix_max_s": round(max(r["wall_s"] for r in one), 4),
        "apply_one_prefix_dc_s": median(one, "dc_max_s"),
        "apply_100k_s": median(big_add),
        "apply_100k_max_s": round(max(r["wall_s"] for r in big_add), 4),
        "apply_100k_dc_s": median(big_add, "dc_max_s"),
        "remove_100k_s": median(big_remove),
        "one_prefix_ratio_vs_noop": round(median(one) / noop_s, 3),
        "list_100k_ratio_vs_noop": round(median(big_add) / noop_s, 3),
        "enforced_checked_by_pings": True,
        "runs": {"noop": noop, "one_add": one_add, "one_remove": one_remove,
                 "big_add": big_add, "big_remove": big_remove},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    a = p.parse_args(argv)
    from agent.preflight import missing
    from lab.cluster import Lab
    from lab.topology import load_topology

    problems = missing()
    if problems:
        print("bench-control: " + "; ".join(problems), file=sys.stderr)
        return 1
    t_start = time.monotonic()
    lab = Lab(load_topology(), prefix=f"bc{os.getpid() % 100000}-")
    try:
        log(f"lab up (prefix {lab.prefix})")
        lab.up(agents=True)
        m = measure(lab, 2 if a.quick else 5)
    finally:
        log("lab down")
        lab.down()
    summary = {k: m[k] for k in ("apply_one_prefix_s", "apply_100k_s", "noop_s",
                                 "one_prefix_ratio_vs_noop", "list_100k_ratio_vs_noop",
                                 "apply_one_prefix_dc_s", "apply_100k_dc_s")}
    summary["bars_met"] = {k: m[k] < bar for k, bar in BARS.items()}
    summary["quick"] = a.quick
    result = {**summary, "detail": m,
              "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
              "command": "sudo make bench-control" + (" (--quick)" if a.quick else ""),
              "runtime_s": round(time.monotonic() - t_start, 1)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(RESULTS)
    print(f"  noop apply (CLI start, validation, one mTLS round trip per DC): {m['noop_s']} s")
    print(f"  one prefix: {m['apply_one_prefix_s']} s median, {m['apply_one_prefix_max_s']} s "
          f"max (slowest DC's round trip {m['apply_one_prefix_dc_s']} s); "
          f"{m['one_prefix_ratio_vs_noop']}x noop")
    print(f"  100k list: {m['apply_100k_s']} s median, {m['apply_100k_max_s']} s max "
          f"(slowest DC's round trip {m['apply_100k_dc_s']} s); "
          f"{m['list_100k_ratio_vs_noop']}x noop; removing it {m['remove_100k_s']} s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
