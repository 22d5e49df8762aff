"""privedge: the operator's command line for a node's XDP filter.

Nouns read, verbs write:
  privedge status                      generation, counters by reason, rates
  privedge rules                       L4 rules, limits, list sizes
  privedge deny list                   the denylist (every source)
  privedge deny add PREFIX... [--expires 1h]
  privedge deny remove PREFIX...
  privedge deny load FILE              replace the loaded list (one generation)
  privedge allow list | add PREFIX... | remove PREFIX...
  privedge limits                      show; `privedge limits set --syn-pps 100 ...`

Every verb takes --dry-run: it parses, validates and compiles, and changes
nothing. Exit status: 0 done, 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from agent.compile import CapacityError
from agent.config import ConfigError
from agent.libbpf import BpfError
from agent.maps import LayoutError
from agent.node import NodeError
from agent.prefixes import PrefixError
from control import ops, status

EXAMPLES = """examples:
  privedge status --interval 2
  privedge deny add 192.0.2.0/24 2001:db8:bad::/48 --expires 2h
  privedge deny load /etc/privedge/drop.txt --dry-run
  privedge limits set --syn-pps 100 --syn-burst 200
"""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d' -> seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 2h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privedge", description=__doc__.split("\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iface", default=os.environ.get("PRIVEDGE_IFACE"),
                   help="protected interface (default: $PRIVEDGE_IFACE, or the only one)")
    p.add_argument("--bpffs", default="/sys/fs/bpf/privedge",
                   help="pin root (default: %(default)s)")
    p.add_argument("--run-dir", default="/run/privedge", help="state root (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    st = sub.add_parser("status", help="generation, counters by reason and rates")
    st.add_argument("--interval", type=float, default=1.0,
                    help="seconds between counter samples for rates (default: %(default)s; 0: "
                         "no rates)")
    st.add_argument("--all", action="store_true", help="show reasons with zero packets too")
    sub.add_parser("rules", help="L4 rules, limits and list sizes")

    deny = sub.add_parser("deny", help="the denylist").add_subparsers(dest="verb", required=True)
    dl = deny.add_parser("list", help="show entries")
    dl.add_argument("--source", choices=("config", "list", "adhoc"))
    dl.add_argument("--limit", type=int, default=50, help="entries shown (default: %(default)s)")
    da = deny.add_parser("add", help="deny prefixes now, in place")
    da.add_argument("prefixes", nargs="+", metavar="PREFIX")
    da.add_argument("--expires", type=duration, default=0.0, metavar="DURATION",
                    help="drop the entries after this long (90s, 15m, 2h, 7d)")
    dr = deny.add_parser("remove", help="remove added or loaded prefixes")
    dr.add_argument("prefixes", nargs="+", metavar="PREFIX")
    dload = deny.add_parser("load", help="replace the loaded list with a file, atomically")
    dload.add_argument("file")
    dload.add_argument("--expires", type=duration, default=0.0, metavar="DURATION")
    for sp in (da, dr, dload):
        sp.add_argument("--dry-run", action="store_true", help="check only, change nothing")

    allow = sub.add_parser("allow", help="the allowlist (wins over every filter drop)")
    av = allow.add_subparsers(dest="verb", required=True)
    av.add_parser("list", help="show entries")
    for verb in ("add", "remove"):
        sp = av.add_parser(verb, help=f"{verb} prefixes")
        sp.add_argument("prefixes", nargs="+", metavar="PREFIX")
        sp.add_argument("--dry-run", action="store_true", help="check only, change nothing")

    lim = sub.add_parser("limits", help="per-source token buckets")
    lv = lim.add_subparsers(dest="verb")
    ls = lv.add_parser("set", help="change limits (one generation; 0 pps switches off)")
    for name in ("syn-pps", "syn-burst", "udp-pps", "udp-burst"):
        ls.add_argument(f"--{name}", type=int, metavar="N")
    ls.add_argument("--dry-run", action="store_true", help="check only, change nothing")
    return p


def _print(args, data: object, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _change_text(r: dict) -> str:
    if r.get("kind") == "dry-run":
        return "dry run: valid, nothing changed: " + json.dumps(r.get("counts", r.get("limits")))
    if r.get("kind") == "generation":
        return (f"generation {r['generation']} live: {r.get('entries', '')} "
                f"{'entries, ' if 'entries' in r else ''}built in {r['build_s']}s, swapped in "
                f"{r['swap_s']}s, {r['total_s']}s in all")
    return (f"applied in place to generation {r['generation']} in {r['total_s']}s "
            f"({r['exact_writes']} exact-table writes, {r['summary_words']} summary words, "
            f"{r['trie_upserts']} trie updates, {r['trie_deletes']} trie deletes)")


def _run(args) -> int:
    node = ops.open_node(args.iface, args.bpffs, args.run_dir)
    try:
        if args.cmd == "status":
            s = status.gather(node, args.interval)
            _print(args, s, status.render(s, args.all))
        elif args.cmd == "rules":
            s = status.gather(node, 0)
            s.pop("counters")
            _print(args, s, status.render({**s, "counters": []}))
        elif args.cmd == "deny" and args.verb == "list":
            es = ops.entries(ops.current_rules(node), args.source)
            rows = [{"prefix": str(e.prefix), "source": e.source,
                     "expires": time.strftime("%Y-%m-%d %H:%M:%S",
                                              time.localtime(e.expires)) if e.expires else ""}
                    for e in es]
            text = "\n".join(f"{r['prefix']:<44} {r['source']:<7} {r['expires']}"
                             for r in rows[: args.limit])
            if len(rows) > args.limit:
                text += f"\n... and {len(rows) - args.limit:,} more ({len(rows):,} in all)"
            _print(args, rows, text or "(empty)")
        elif args.cmd == "deny":
            if args.verb == "add":
                r = ops.deny_add(node, args.prefixes, args.expires, args.dry_run)
            elif args.verb == "remove":
                r = ops.deny_remove(node, args.prefixes, args.dry_run)
            else:
                r = ops.deny_load(node, args.file, args.expires, args.dry_run)
            _print(args, r, _change_text(r))
        elif args.cmd == "allow" and args.verb == "list":
            rows = [str(p) for p, _ in ops.current_rules(node).allow.prefixes()]
            _print(args, rows, "\n".join(rows) or "(empty)")
        elif args.cmd == "allow":
            add = args.prefixes if args.verb == "add" else []
            remove = args.prefixes if args.verb == "remove" else []
            r = ops.allow_change(node, add, remove, args.dry_run)
            _print(args, r, _change_text(r))
        elif args.cmd == "limits" and args.verb == "set":
            r = ops.limits_set(node, (args.syn_pps, args.syn_burst),
                               (args.udp_pps, args.udp_burst), args.dry_run)
            _print(args, r, _change_text(r))
        else:
            lim = ops.current_rules(node).limits.model_dump()
            _print(args, lim, f"SYN {lim['syn']['pps']}/s burst {lim['syn']['burst']}; "
                              f"UDP {lim['udp']['pps']}/s burst {lim['udp']['burst']}")
    finally:
        node.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ops.OpError, PrefixError, CapacityError, ConfigError, NodeError,
            LayoutError) as e:
        print(f"privedge: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # pydantic validation of limits
        print(f"privedge: invalid value: {e}", file=sys.stderr)
        return 1
    except BpfError as e:
        print(f"privedge: {e}. Is this root, and the agent's state intact?", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
