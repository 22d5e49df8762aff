"""python -m lab: the multi-DC lab of lab/topology.yaml in network namespaces.

  python -m lab up                      build (or repair) the lab and start an agent per DC
  python -m lab up --no-agents          only the network
  python -m lab status [--json]         what is there; which DC each host's anycast route uses
  python -m lab move client fra         Katerina drives from Cologne to Frankfurt
  python -m lab exec client -- ping -c 1 198.51.100.10
  python -m lab down                    remove everything (also after a crash)

Run on a VM of the Vagrantfile (or any machine whose NICs are the lab's):
  python -m lab provision client --if inet=eth1
  python -m lab provision dus --if inet=eth1 --if bb=eth2
  python -m lab provision dus --if inet=mac:02:00:5e:00:00:01 --if bb=mac:02:00:5e:01:00:01
  python -m lab generate dus --out /etc/privedge --if inet=eth1 --if bb=eth2

Everything runs as root. Namespaces are named <prefix><name> (el-client,
el-inet, ...); nothing outside them is touched. Options go before HOST.
Exit status: 0 done, 1 failed, 2 usage; `status` exits 1 when the lab is
not (completely) up, `exec` with the command's status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from lab.cluster import Lab, LabError, provision, resolve_ifmap
from lab.topology import DEFAULT_PATH, TopologyError, load_topology


def _ifmap(specs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs or []:
        seg, eq, ifname = spec.partition("=")
        if not eq or not seg or not ifname:
            raise argparse.ArgumentTypeError(f"--if {spec!r}: expected SEGMENT=IFNAME "
                                             "(e.g. inet=eth1, or inet=mac:02:00:5e:00:00:01)")
        if seg in out:
            raise argparse.ArgumentTypeError(f"--if: segment {seg} given twice")
        out[seg] = ifname
    return out


def _print_status(st: dict) -> None:
    state = "up" if st["up"] else "not (completely) up"
    print(f"lab {st['prefix']} (state {st['state_dir']}): {state}")
    for name, info in st["namespaces"].items():
        if not info["exists"]:
            print(f"  {name:16} {info['kind']:6} missing")
            continue
        parts = []
        if info["kind"] == "switch":
            parts.append("ports " + " ".join(info.get("ports", [])))
        for ifname, addrs in info.get("addresses", {}).items():
            parts.append(f"{ifname} {' '.join(addrs)}")
        if "anycast_local" in info:
            local = [k for k, v in info["anycast_local"].items() if v]
            parts.append(f"anycast local: {' '.join(local) or 'NONE'}")
        if "agent" in info:
            a = info["agent"]
            parts.append(f"agent pid {a['pid']}" if a["alive"] else "agent not running")
        for key, r in info.get("anycast_routes", {}).items():
            parts.append(f"anycast {key} via {r['via']} ({r['dc'] or '?'})")
        print(f"  {name:16} {info['kind']:6} " + "; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=argparse.SUPPRESS,
                        help="namespace name prefix (default: el-)")
    common.add_argument("--topology", default=argparse.SUPPRESS,
                        help=f"topology file (default: {DEFAULT_PATH})")
    common.add_argument("--state-dir", default=argparse.SUPPRESS,
                        help="state directory (default: /run/privedge-lab/<prefix without ->)")
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1], parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    up = sub.add_parser("up", parents=[common], help="build or repair the lab; start agents")
    up.add_argument("--no-agents", action="store_true", help="only the network")
    sub.add_parser("down", parents=[common], help="remove namespaces, agents, pins and state")
    st = sub.add_parser("status", parents=[common], help="show the lab; changes nothing")
    st.add_argument("--json", action="store_true")
    mv = sub.add_parser("move", parents=[common], help="route a host's anycast via another DC")
    mv.add_argument("host")
    mv.add_argument("dc")
    ex = sub.add_parser("exec", parents=[common], help="run a command in a lab namespace",
                        usage="python -m lab exec HOST -- CMD [ARG...]")
    ex.add_argument("host")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    pr = sub.add_parser("provision", parents=[common],
                        help="provision HOST in the current network (a namespace or a VM)")
    pr.add_argument("host")
    pr.add_argument("--if", dest="ifs", action="append", metavar="SEGMENT=IFNAME",
                    help="interface of a segment: IFNAME or mac:MAC; once per segment")
    pr.add_argument("--via", metavar="DC", help="route anycast via DC instead of the topology's")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--vm", action="store_true",
                    help="this machine is a lab VM: provision its own network (never the "
                         "NIC with the default route)")
    ge = sub.add_parser("generate", parents=[common],
                        help="write a DC's agent configs for a machine of its own (a VM)")
    ge.add_argument("dc")
    ge.add_argument("--out", required=True, type=Path, help="directory for the YAML files")
    ge.add_argument("--if", dest="ifs", action="append", metavar="SEGMENT=IFNAME")
    ge.add_argument("--bpffs", default="/sys/fs/bpf/privedge", help="default: %(default)s")
    ge.add_argument("--run-dir", default="/run/privedge", help="default: %(default)s")
    ge.add_argument("--certs", type=Path, help="lab PKI directory (default: OUT/pki)")
    ge.add_argument("--make-pki", action="store_true",
                    help="issue the lab CA and zone certificates missing in --certs")
    args = p.parse_args(argv)
    prefix = getattr(args, "prefix", "el-")
    try:
        topology = load_topology(getattr(args, "topology", DEFAULT_PATH))
        if args.cmd == "provision":
            try:
                specs = _ifmap(args.ifs)
            except argparse.ArgumentTypeError as e:
                p.error(str(e))
            changes = provision(topology, args.host, resolve_ifmap(specs), anycast_via=args.via,
                                vm=args.vm)
            if args.json:
                print(json.dumps({"host": args.host, "changes": changes}))
            else:
                _print_changes(f"provision {args.host}:", changes)
            return 0
        if args.cmd == "generate":
            return _generate(p, topology, args)
        lab = Lab(topology, prefix=prefix, state_dir=getattr(args, "state_dir", None))
        if args.cmd == "up":
            _print_changes(f"lab {prefix}: up,", lab.up(agents=not args.no_agents)["changes"])
            return 0
        if args.cmd == "down":
            for r in lab.down()["removed"]:
                print(f"removed {r}")
            return 0
        if args.cmd == "status":
            st = lab.status()
            if args.json:
                print(json.dumps(st, indent=1))
            else:
                _print_status(st)
            return 0 if st["up"] else 1
        if args.cmd == "move":
            changes = lab.move(args.host, args.dc)
            print(f"{args.host} -> {args.dc}: " + ("; ".join(changes) or "already there"))
            return 0
        if args.cmd == "exec":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                p.error("exec: no command (python -m lab exec HOST -- CMD ...)")
            return lab.exec(args.host, command).returncode
    except (LabError, TopologyError) as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    except (OSError, NetlinkError, subprocess.SubprocessError) as e:
        print(f"lab: {args.cmd} failed: {e}", file=sys.stderr)
        return 1
    return 2


def _print_changes(title: str, changes: list[str]) -> None:
    print(f"{title} " + (f"{len(changes)} changes" if changes else "nothing to change"))
    for c in changes:
        print(f"  {c}")


def _generate(p: argparse.ArgumentParser, topology, args) -> int:
    from lab.agents import DcPaths, dc_configs, pki_missing, pki_zones, write_configs
    try:
        specs = _ifmap(args.ifs)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    topology.dc(args.dc)
    want = [topology.public.name, topology.backbone.name]
    if sorted(specs) != sorted(want):
        p.error(f"generate: give --if for exactly {' and '.join(want)}")
    certs = args.certs or args.out / "pki"
    paths = DcPaths(ifnames=resolve_ifmap(specs), netns=None, bpffs=args.bpffs,
                    run_dir=args.run_dir, certs=str(certs),
                    status_socket=str(Path(args.run_dir) / "l7.sock"),
                    cache_dir=str(Path(args.run_dir) / "cache"))
    for name in write_configs(args.out, dc_configs(topology, args.dc, paths)):
        print(f"wrote {args.out / name}")
    if args.make_pki and pki_missing(topology, certs, args.dc):
        from lab.certs import make_lab_pki
        make_lab_pki(certs, pki_zones(topology, args.dc))
        print(f"made the lab PKI in {certs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
