"""privedge-net: the operator's command line for the whole network.

Nouns read, verbs write:
  privedge-net validate network.yaml          every problem, or ok
  privedge-net diff OLD NEW                   what each DC would change
  privedge-net schema [--out FILE]            JSON Schema for editors
  privedge-net status                         per DC: generation, health, counters
  privedge-net apply network.yaml             the whole network, as a new generation
  privedge-net reconcile                      bring DCs behind to the current generation
  privedge-net serve --listen ADDR --cert C --key K --ca CA
                                              serve the current generation to agents
                                              that start (control/genserver.py)
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

`apply` validates the file whole (nothing is sent if any of it is wrong),
prints what each DC would change, saves it as the next generation in the
control plane's store (--store; control/generations.py) and sends it to
every DC in parallel; each DC checks it all, then swaps its BPF generation
and its front end's zones (agent/daemon.py). A DC that is down or refuses
is named with the reason and stays behind until `reconcile` (or its own
pull at start) brings it to the store's current generation.
"""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
from pathlib import Path

from agent.config import ConfigError
from agent.metrics.tls import TlsFiles
from control import network
from control.audit import AuditError, AuditLog, fingerprint
from control.fleet import Fleet, Result, credentials
from control.generations import GenerationStore, dc_addresses, open_payload
from control.genpack import content_hash, pack
from control.render import diff
from control.roles import API_PORT, CONTROL_PORT

EXAMPLES = """examples:
  privedge-net validate examples/network.yaml
  privedge-net --network net.yaml --pki /etc/privedge/pki --operator alice status
  privedge-net --network net.yaml --pki pki --operator bob deny add 192.0.2.0/24 --expires 2h
  privedge-net --network net.yaml --pki pki --operator bob purge www --dry-run
  privedge-net --pki pki --operator carol --store gens apply net.yaml --dry-run
  privedge-net --pki pki --operator carol --store gens reconcile
"""


def duration(text: str) -> float:
    """--expires: control/cli.py's, imported only when given (it loads the
    node tools, and a CLI's start-up is part of every apply)."""
    from control.cli import duration as parse

    return parse(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privedge-net", description=__doc__.split("\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--network", type=Path,
                   help="where the DCs are (default: the store's current generation, "
                        "else ./network.yaml)")
    p.add_argument("--pki", type=Path, default=Path("/etc/privedge/pki"),
                   help="the privedge-pki directory (default: %(default)s)")
    p.add_argument("--operator", default="admin", help="whose certificate (default: %(default)s)")
    p.add_argument("--audit", type=Path, default=Path("audit.jsonl"),
                   help="the control plane's audit log (default: %(default)s)")
    p.add_argument("--port", type=int, default=API_PORT,
                   help="the agents' API port (default: %(default)s)")
    p.add_argument("--store", type=Path, default=Path("generations"),
                   help="the control plane's generations (default: %(default)s)")
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
    ap = sub.add_parser("apply", help="apply a network config to every DC as a generation")
    ap.add_argument("file", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    rc = sub.add_parser("reconcile", help="bring every DC to the current generation")
    rc.add_argument("--dry-run", action="store_true")
    sv = sub.add_parser("serve", help="serve the store's current generation to agents")
    sv.add_argument("--listen", required=True)
    sv.add_argument("--port", type=int, default=CONTROL_PORT, dest="serve_port")
    sv.add_argument("--cert", type=Path, required=True)
    sv.add_argument("--key", type=Path, required=True)
    sv.add_argument("--ca", type=Path, required=True)
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
            gen = r.answer.get("generation") if r.ok else None
            print(f"{dc:<{width}}  {'ok' if r.ok else 'FAILED':<6} {r.seconds * 1000:6.0f} ms"
                  + (f"  generation {gen}" if gen is not None else "")
                  + (f"  {r.error}" if not r.ok else ""))
    return 0 if all(r.ok for r in results.values()) else 1


APPLY_TIMEOUT = 120.0     # seconds: a DC applying a list of millions is still answering


def _audit(args: argparse.Namespace, action: str, body: dict,
           results: dict[str, Result]) -> int:
    """Append the change and each DC's result to the control plane's log."""
    tls = credentials(args.pki, args.operator)
    try:
        AuditLog(args.audit).append(
            args.operator, fingerprint(tls.cert.read_bytes()), action, body,
            {dc: {"ok": r.ok, "status": r.status, "seconds": round(r.seconds, 3),
                  **({"generation": r.answer.get("generation")} if r.ok else {}),
                  **({"error": r.error} if not r.ok else {})}
             for dc, r in results.items()})
    except (AuditError, OSError) as e:
        print(f"privedge-net: the change was sent but not audited: {e}", file=sys.stderr)
        return 1
    return 0


def _apply(args: argparse.Namespace) -> int:
    """Validate, diff, store, send; each DC's result by name."""
    store = GenerationStore(args.store)
    try:
        current = store.current()
        payload, net = pack(args.file, store.next_number())
        fleet = Fleet.from_network(net, credentials(args.pki, args.operator), args.port,
                                   APPLY_TIMEOUT)
    except ConfigError as e:
        print(e, file=sys.stderr)
        print("privedge-net: nothing was sent", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"privedge-net: {e}; nothing was sent", file=sys.stderr)
        return 1
    summaries: dict[str, str] = {}
    if current is not None and current["sha256"] == content_hash(payload["doc"],
                                                                 payload["files"]):
        payload = current      # the same network: its generation again, for who lacks it
        print(f"no change from generation {current['number']}; sending it to every DC",
              file=sys.stderr)
    else:
        before = open_payload(current) if current is not None else None
        try:
            changes = diff(before.generation.net if before else None, net,
                           before.base if before else Path("."), args.file.parent)
        finally:
            if before is not None:
                before.close()
        summaries = {dc: d.summary() for dc, d in changes.items()}
        width = max(len(dc) for dc in changes)
        for dc, text in summaries.items():
            print(f"{dc:<{width}}  {text}", file=sys.stderr)
    if args.dry_run:
        return _report(fleet.call("POST", "/v1/generation?dry_run=1", payload), args.json)
    if payload is not current:
        try:
            store.save(payload)   # what the network should be at, before any DC hears of it
        except (ConfigError, OSError) as e:
            print(f"privedge-net: {e}; nothing was sent", file=sys.stderr)
            return 1
    results = fleet.call("POST", "/v1/generation", payload)
    code = _report(results, args.json)
    if payload is not current and all(r.status != 0 and not r.ok for r in results.values()):
        # Every DC answered and none took it: it is not what the network
        # should be at. (DCs that did not answer will pull it, so with any
        # of those it stays.)
        store.set_current(current["number"] if current else None)
        print(f"privedge-net: generation {payload['number']} was refused by every DC; the "
              f"store's current stays {current['number'] if current else 'none'}",
              file=sys.stderr)
    body = {"generation": payload["number"], "sha256": payload["sha256"],
            "file": str(args.file), "diff": summaries}
    return _audit(args, "apply", body, results) or code


def _reconcile(args: argparse.Namespace) -> int:
    """Every DC not at the store's current generation gets it."""
    store = GenerationStore(args.store)
    try:
        payload = store.current()
        if payload is None:
            print(f"privedge-net: no generation in {args.store} yet: apply one first",
                  file=sys.stderr)
            return 1
        fleet = Fleet(dc_addresses(payload), credentials(args.pki, args.operator), args.port,
                      APPLY_TIMEOUT)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    number = payload["number"]
    at = fleet.call("GET", "/v1/generation")
    behind = {dc for dc, r in at.items()
              if not r.ok or r.answer.get("sha256") != payload["sha256"]}
    for dc in sorted(set(at) - behind):
        print(f"{dc}: at generation {number}", file=sys.stderr)
    if not behind:
        return 0
    for dc in sorted(behind):
        r = at[dc]
        where = (f"unreachable: {r.error}" if not r.ok
                 else f"at generation {r.answer.get('generation')}")
        print(f"{dc}: {where}; wants {number}", file=sys.stderr)
    path = "/v1/generation" + ("?dry_run=1" if args.dry_run else "")
    results = fleet.only(behind).call("POST", path, payload)
    code = _report(results, args.json)
    if args.dry_run:
        return code
    body = {"generation": number, "sha256": payload["sha256"], "behind": sorted(behind)}
    return _audit(args, "reconcile", body, results) or code


def _status(results: dict[str, Result], as_json: bool, wanted: int | None) -> int:
    """Each DC's network generation (against the store's current one), its
    links' BPF generations and its front end."""
    if as_json:
        return _report(results, True)
    for dc, r in results.items():
        if not r.ok:
            print(f"{dc}: FAILED {r.error}")
            continue
        network = (r.answer.get("network") or {}).get("generation", 0)
        behind = f" (behind: the network is at {wanted})" if wanted and network != wanted else ""
        links = r.answer.get("links", {})
        gens = ", ".join(f"{i} bpf gen {s.get('generation')}"
                         for i, s in links.items()) or "no link"
        front = r.answer.get("front") or {}
        served = sum((front.get("requests") or {}).values())
        print(f"{dc}: region {r.answer.get('region')}; network generation {network}{behind}; "
              f"{gens}; front end "
              f"{'answered ' + str(served) + ' requests' if front else 'not running'}")
    return 0 if all(r.ok for r in results.values()) else 1


def _change(args: argparse.Namespace, fleet: Fleet, method: str, path: str, body: dict,
            action: str) -> int:
    dry = getattr(args, "dry_run", False)
    results = fleet.call(method, path + ("?dry_run=1" if dry else ""), body)
    code = _report(results, args.json)
    if dry:
        return code
    return _audit(args, action, body, results) or code


def _where_dcs_are(args: argparse.Namespace) -> dict[str, str]:
    """DC -> its backbone address: from --network, else the network as last
    applied, else ./network.yaml."""
    if args.network is None:
        current = GenerationStore(args.store).current()
        if current is not None:
            return dc_addresses(current)
    net = network.load_network(args.network or Path("network.yaml"))
    return {name: dc.backbone for name, dc in net.dcs.items()}


def _serve(args: argparse.Namespace) -> int:
    """Until SIGTERM or SIGINT."""
    from control.genserver import GenerationServer  # the server's imports: only here
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = GenerationServer(GenerationStore(args.store), args.listen, args.serve_port,
                                  TlsFiles(args.cert, args.key, args.ca)).start()
    except (OSError, ssl.SSLError) as e:
        print(f"privedge-net: serve on [{args.listen}]:{args.serve_port}: {e}", file=sys.stderr)
        return 1
    address, port = server.address
    print(f"privedge-net: serving {args.store}'s current generation on [{address}]:{port}",
          flush=True)
    stop.wait()
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "validate":
        return network.main(["validate", str(args.file)])
    if args.cmd == "diff":
        return network.main(["diff", str(args.old), str(args.new)])
    if args.cmd == "schema":
        return network.main(["schema", *(["--out", str(args.out)] if args.out else [])])
    if args.cmd == "apply":
        return _apply(args)
    if args.cmd == "reconcile":
        return _reconcile(args)
    if args.cmd == "serve":
        return _serve(args)
    try:
        fleet = Fleet(_where_dcs_are(args), credentials(args.pki, args.operator), args.port)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"privedge-net: the certificate of operator {args.operator} in {args.pki} does "
              f"not load: {e}", file=sys.stderr)
        return 1
    if args.cmd == "status":
        try:
            wanted = GenerationStore(args.store).current_number()
        except ConfigError:
            wanted = None
        return _status(fleet.call("GET", "/v1/status"), args.json, wanted)
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
