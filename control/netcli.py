"""privedge-net: the operator's command line for the whole network.

Nouns read, verbs write:
  privedge-net validate network.yaml          every problem, or ok
  privedge-net diff OLD NEW                   what each DC would change
  privedge-net schema [--out FILE]            JSON Schema for editors
  privedge-net status                         per DC: generation, health, counters
  privedge-net deny add PREFIX... [--expires 2h]
  privedge-net deny remove PREFIX...
  privedge-net allow add PREFIX... | allow remove PREFIX...
  privedge-net purge ZONE [--url URL | --prefix URL]

The network file (--network, default ./network.yaml) says where each DC's
agent is (its backbone address; agent/api.py on port 9444); the operator's
certificate comes from a privedge-pki directory (--pki, --operator). Verbs
go to every DC in parallel and report each DC's result by name, the time it
took, and the reason when it failed; every verb takes --dry-run (each DC
checks the change and makes none). Each change is appended to the control
plane's audit log (--audit) with the per-DC results. Exit status: 0 every
DC did it, 1 some did not (the others stay done), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.api import API_PORT
from agent.config import ConfigError
from control import network
from control.audit import AuditError, AuditLog, fingerprint
from control.cli import duration
from control.fleet import Fleet, Result, credentials

EXAMPLES = """examples:
  privedge-net validate examples/network.yaml
  privedge-net --network net.yaml --pki /etc/privedge/pki --operator alice status
  privedge-net --network net.yaml --pki pki --operator bob deny add 192.0.2.0/24 --expires 2h
  privedge-net --network net.yaml --pki pki --operator bob purge www --dry-run
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privedge-net", description=__doc__.split("\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--network", type=Path, default=Path("network.yaml"),
                   help="the network config (default: %(default)s)")
    p.add_argument("--pki", type=Path, default=Path("/etc/privedge/pki"),
                   help="the privedge-pki directory (default: %(default)s)")
    p.add_argument("--operator", default="admin", help="whose certificate (default: %(default)s)")
    p.add_argument("--audit", type=Path, default=Path("audit.jsonl"),
                   help="the control plane's audit log (default: %(default)s)")
    p.add_argument("--port", type=int, default=API_PORT,
                   help="the agents' API port (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    v = sub.add_parser("validate", help="check a network config; change nothing")
    v.add_argument("file", type=Path)
    d = sub.add_parser("diff", help="what applying NEW over OLD changes at each DC")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    s = sub.add_parser("schema", help="the JSON Schema of the network config")
    s.add_argument("--out", type=Path)
    sub.add_parser("status", help="each DC's generation, health and counters")
    deny = sub.add_parser("deny", help="the denylist on every DC").add_subparsers(
        dest="verb", required=True)
    da = deny.add_parser("add", help="deny prefixes on every DC now")
    da.add_argument("prefixes", nargs="+")
    da.add_argument("--expires", type=duration, default=0.0, help="e.g. 90s, 15m, 2h, 7d")
    da.add_argument("--dry-run", action="store_true")
    dr = deny.add_parser("remove", help="remove prefixes on every DC")
    dr.add_argument("prefixes", nargs="+")
    dr.add_argument("--dry-run", action="store_true")
    allow = sub.add_parser("allow", help="the allowlist on every DC").add_subparsers(
        dest="verb", required=True)
    for verb in ("add", "remove"):
        av = allow.add_parser(verb, help=f"{verb} prefixes on every DC")
        av.add_argument("prefixes", nargs="+")
        av.add_argument("--dry-run", action="store_true")
    pu = sub.add_parser("purge", help="purge a zone's cache on every DC")
    pu.add_argument("zone")
    what = pu.add_mutually_exclusive_group()
    what.add_argument("--url")
    what.add_argument("--prefix")
    pu.add_argument("--dry-run", action="store_true")
    return p


def _report(results: dict[str, Result], as_json: bool) -> int:
    if as_json:
        print(json.dumps({dc: {"ok": r.ok, "status": r.status, "seconds": round(r.seconds, 3),
                               **r.answer} for dc, r in results.items()}, sort_keys=True))
    else:
        width = max(len(dc) for dc in results)
        for dc, r in results.items():
            print(f"{dc:<{width}}  {'ok' if r.ok else 'FAILED':<6} {r.seconds * 1000:6.0f} ms"
                  + (f"  {r.error}" if not r.ok else ""))
    return 0 if all(r.ok for r in results.values()) else 1


def _status(results: dict[str, Result], as_json: bool) -> int:
    if as_json:
        return _report(results, True)
    for dc, r in results.items():
        if not r.ok:
            print(f"{dc}: FAILED {r.error}")
            continue
        links = r.answer.get("links", {})
        gens = ", ".join(f"{i} gen {s.get('generation')}" for i, s in links.items()) or "no link"
        front = r.answer.get("front") or {}
        served = sum((front.get("requests") or {}).values())
        print(f"{dc}: region {r.answer.get('region')}; {gens}; front end "
              f"{'answered ' + str(served) + ' requests' if front else 'not running'}")
    return 0 if all(r.ok for r in results.values()) else 1


def _change(args: argparse.Namespace, fleet: Fleet, method: str, path: str, body: dict,
            action: str) -> int:
    dry = getattr(args, "dry_run", False)
    results = fleet.call(method, path + ("?dry_run=1" if dry else ""), body)
    code = _report(results, args.json)
    if not dry:
        tls = credentials(args.pki, args.operator)
        try:
            AuditLog(args.audit).append(
                args.operator, fingerprint(tls.cert.read_bytes()), action, body,
                {dc: {"ok": r.ok, "status": r.status, "seconds": round(r.seconds, 3),
                      **({"error": r.error} if not r.ok else {})}
                 for dc, r in results.items()})
        except (AuditError, OSError) as e:
            print(f"privedge-net: the change was sent but not audited: {e}", file=sys.stderr)
            return 1
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "validate":
        return network.main(["validate", str(args.file)])
    if args.cmd == "diff":
        return network.main(["diff", str(args.old), str(args.new)])
    if args.cmd == "schema":
        return network.main(["schema", *(["--out", str(args.out)] if args.out else [])])
    try:
        net = network.load_network(args.network)
        fleet = Fleet.from_network(net, credentials(args.pki, args.operator), args.port)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"privedge-net: the certificate of operator {args.operator} in {args.pki} does "
              f"not load: {e}", file=sys.stderr)
        return 1
    if args.cmd == "status":
        return _status(fleet.call("GET", "/v1/status"), args.json)
    if args.cmd == "deny":
        body: dict = {"prefixes": args.prefixes}
        if args.verb == "add":
            if args.expires:
                body["expires"] = args.expires
            return _change(args, fleet, "POST", "/v1/deny", body, "deny add")
        return _change(args, fleet, "DELETE", "/v1/deny", body, "deny remove")
    if args.cmd == "allow":
        return _change(args, fleet, "POST" if args.verb == "add" else "DELETE", "/v1/allow",
                       {"prefixes": args.prefixes}, f"allow {args.verb}")
    body = {"zone": args.zone, **({"url": args.url} if args.url else {}),
            **({"prefix": args.prefix} if args.prefix else {})}
    return _change(args, fleet, "POST", "/v1/purge", body, "purge")


if __name__ == "__main__":
    sys.exit(main())
