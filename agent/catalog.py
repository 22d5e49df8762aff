"""The rule set as last applied to an interface, kept in its run directory.

The compiled maps cannot be turned back into the operator's prefixes (a
/16 became 256 summary entries), so every writer saves the RuleSet it
applied next to the lock: rules.npz, written to a temporary file and
renamed. `privedge deny list` and live updates start from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from agent.config import Capacity, L4Rule, Limits, Steering
from agent.prefixes import PrefixTables
from agent.rules import DENY_SOURCES, RuleSet

FILE = "rules.npz"
REPORT = "last_apply.json"


def save(run_dir: Path, rules: RuleSet) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for name, tables in [*((f"deny_{s}", rules.deny[s]) for s in DENY_SOURCES),
                         ("allow", rules.allow), ("bogons", rules.bogons)]:
        arrays[f"{name}_v4"], arrays[f"{name}_v6"] = tables.v4, tables.v6
    meta = {
        "l4_rules": [r.model_dump(mode="json") for r in rules.l4_rules],
        "limits": rules.limits.model_dump(mode="json"),
        "public": rules.public,
        "capacity": rules.capacity.model_dump(mode="json"),
        "steering": rules.steering.model_dump(mode="json") if rules.steering else None,
        "backbone_ifindex": rules.backbone_ifindex,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = run_dir / f"{FILE}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, run_dir / FILE)


def load(run_dir: Path) -> RuleSet | None:
    """The saved rule set, or None when there is none yet."""
    path = run_dir / FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))

        def tables(name: str) -> PrefixTables:
            return PrefixTables(z[f"{name}_v4"], z[f"{name}_v6"])

        return RuleSet(
            deny={s: tables(f"deny_{s}") for s in DENY_SOURCES},
            allow=tables("allow"),
            bogons=tables("bogons"),
            l4_rules=tuple(L4Rule.model_validate(r) for r in meta["l4_rules"]),
            limits=Limits.model_validate(meta["limits"]),
            public=meta["public"],
            capacity=Capacity.model_validate(meta["capacity"]),
            steering=Steering.model_validate(meta["steering"]) if meta.get("steering") else None,
            backbone_ifindex=meta.get("backbone_ifindex", 0),
        )


def stamp(run_dir: Path) -> tuple[int, int] | None:
    """Which saved rule set is there (inode, mtime): a save replaces the
    file, so an unchanged stamp means the rule set read before still is."""
    try:
        st = (run_dir / FILE).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def next_expiry(run_dir: Path) -> float | None:
    """The earliest expiry (wall clock) among the operator's entries, if any."""
    rules = load(run_dir)
    if rules is None:
        return None
    times = [x[x > 0] for x in (getattr(rules.deny[s], col)["expires"]
                                for s in ("list", "adhoc") for col in ("v4", "v6"))]
    finite = [float(x.min()) for x in times if len(x)]
    return min(finite) if finite else None


def save_report(run_dir: Path, report: dict) -> None:
    """What the last change did (generation, counts, timings), for status."""
    tmp = run_dir / f"{REPORT}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(report, default=str))
    os.replace(tmp, run_dir / REPORT)


def load_report(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / REPORT).read_text())
    except (OSError, ValueError):
        return {}
