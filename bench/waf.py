"""`make bench-waf`: how well the managed WAF rules detect attacks, how often
they block the benign, and what they cost, at the default settings
(paranoia 1, threshold 5).

  own       tests/waf_corpus/{attacks,benign}.yaml: the corpus the rules
            were tuned on
  heldout   bench/waf_heldout/{attacks,benign}.yaml, written by someone
            else and never read while tuning; used for figures only, when
            present (no per-request detail is printed for it)

For each corpus: the share of attacks blocked (detection), of benign
requests blocked, detection per attack category, and the mean CPU time
per request (time.process_time over `--rounds` passes of every request).
The baseline measured in the same run is the cost of only splitting the
requests into their inputs (agent/l7/waf/inputs.py), which any WAF pays.

Prints a table, then the JSON line that bench/results/waf.json holds.
`--misses` lists the own corpus's missed attacks and blocked benign
requests by id, with the rules that matched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from agent.l7.waf import CorpusEntry, Waf, WafSettings, load_corpora
from agent.l7.waf.inputs import parse

ROOT = Path(__file__).resolve().parent.parent
OWN = ROOT / "tests" / "waf_corpus"
HELDOUT = Path(__file__).resolve().parent / "waf_heldout"
RESULTS = Path(__file__).resolve().parent / "results" / "waf.json"


def log(msg: str) -> None:
    print(f"bench-waf: {msg}", file=sys.stderr, flush=True)


def _requests(entries: list[CorpusEntry]) -> list[tuple[str, str, tuple, bytes]]:
    return [(e.method, e.target, e.lower_headers, e.body) for e in entries]


def cpu_us(fn, requests: list, rounds: int, fresh: Callable[[], None] = lambda: None) -> float:
    """Mean CPU microseconds per request of fn over `rounds` passes; `fresh`
    runs (untimed) before each pass, so no pass profits from the one before."""
    spent = 0.0
    for _ in range(rounds):
        fresh()
        t0 = time.process_time()
        for r in requests:
            fn(*r)
        spent += time.process_time() - t0
    return spent / (rounds * len(requests)) * 1e6


def forget(waf: Waf) -> Callable[[], None]:
    """Empty the WAF's memos of clean values and requests: every corpus
    request is unseen, as an attacker's are (real traffic repeats its Host,
    its User-Agent and whole requests more)."""
    return waf.forget


def measure(waf: Waf, entries: list[CorpusEntry], rounds: int) -> dict:
    verdicts = [waf.inspect(*r) for r in _requests(entries)]
    attacks = [(e, v) for e, v in zip(entries, verdicts, strict=True) if e.is_attack]
    benign = [(e, v) for e, v in zip(entries, verdicts, strict=True) if not e.is_attack]
    per_cat: dict[str, list[int]] = {}
    for e, v in attacks:
        hit = per_cat.setdefault(e.category, [0, 0])
        hit[0] += v.blocked
        hit[1] += 1
    requests = _requests(entries)
    return {
        "attacks": len(attacks), "benign": len(benign),
        "detect_rate": sum(v.blocked for _, v in attacks) / max(len(attacks), 1),
        "benign_block_rate": sum(v.blocked for _, v in benign) / max(len(benign), 1),
        "per_category": {c: {"detected": h, "of": n, "rate": h / n}
                         for c, (h, n) in sorted(per_cat.items())},
        "cpu_us_per_request": cpu_us(waf.inspect, requests, rounds, forget(waf)),
        "parse_cpu_us_per_request": cpu_us(parse, requests, rounds),
        "rules_matched": dict(Counter(m.rule_id for _, v in attacks + benign
                                      for m in v.matches).most_common()),
        "_verdicts": list(zip(entries, verdicts, strict=True)),
    }


def report(name: str, m: dict) -> None:
    print(f"  {name:8} {m['attacks']} attacks, {m['benign']} benign: detected "
          f"{m['detect_rate']:.1%} (bar >= 80%), benign blocked {m['benign_block_rate']:.2%} "
          f"(bar < 1%)")
    print("           " + ", ".join(f"{c} {r['detected']}/{r['of']}"
                                    for c, r in m["per_category"].items()))
    print(f"           {m['cpu_us_per_request']:.1f} us CPU per request (bar <= 300), "
          f"x{m['cpu_us_per_request'] / m['parse_cpu_us_per_request']:.1f} the "
          f"{m['parse_cpu_us_per_request']:.1f} us of only splitting it into inputs")


def misses(m: dict) -> None:
    for e, v in m["_verdicts"]:
        if e.is_attack != v.blocked:
            what = "missed" if e.is_attack else "BLOCKED"
            rules = ", ".join(f"{x.rule_id}@{x.target}" for x in v.matches) or "-"
            print(f"    {what} {e.id} score {v.score}: {rules}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="passes over each corpus (default 5)")
    p.add_argument("--quick", action="store_true", help="one pass")
    p.add_argument("--misses", action="store_true",
                   help="list the own corpus's misses and false positives")
    p.add_argument("--own-only", action="store_true",
                   help="leave the held-out corpus alone (while tuning the rules)")
    a = p.parse_args(argv)
    rounds = 1 if a.quick else a.rounds
    waf = Waf(WafSettings())
    corpora = {"own": load_corpora(OWN)}
    if a.own_only:
        log("--own-only: held-out corpus not loaded")
    elif (HELDOUT / "attacks.yaml").exists() or (HELDOUT / "benign.yaml").exists():
        corpora["heldout"] = load_corpora(HELDOUT)
    else:
        log(f"no held-out corpus at {HELDOUT.relative_to(ROOT)}: own corpus only")
    results = {}
    for name, entries in corpora.items():
        log(f"{name}: {len(entries)} requests, {rounds} rounds")
        results[name] = measure(waf, entries, rounds)
    every = [r for entries in corpora.values() for r in _requests(entries)]
    total_us = cpu_us(waf.inspect, every, rounds, forget(waf))
    for name, m in results.items():
        report(name, m)
        if name == "own" and a.misses:
            misses(m)
    held = results.get("heldout")
    summary = {
        "waf_cpu_us_per_request": round(total_us, 1),
        "heldout_detect_rate": round(held["detect_rate"], 4) if held else None,
        "heldout_benign_block_rate": round(held["benign_block_rate"], 4) if held else None,
        "own_detect_rate": round(results["own"]["detect_rate"], 4),
        "own_benign_block_rate": round(results["own"]["benign_block_rate"], 4),
    }
    out = dict(summary, settings={"paranoia": 1, "threshold": 5}, rounds=rounds,
               rules=len(waf.rule_ids),
               detail={n: {k: v for k, v in m.items() if not k.startswith("_")}
                       for n, m in results.items()})
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
