"""privedge-agent: bring an interface under protection and look after it.

  privedge-agent run --config node.yaml     start (or adopt), then stay:
                                            SIGHUP reloads the config as a new
                                            generation, SIGTERM/SIGINT exit and
                                            leave the program attached
  privedge-agent check --config node.yaml   validate config and lists; change nothing
  privedge-agent detach IFACE               remove program, pins and state

Startup phases are printed by name, so a failure says where it happened.
Exit status: 0 done, 1 failed, 2 usage.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from agent import catalog, loader
from agent.apply import apply_generation, expire_entries
from agent.bcc_build import BuildError
from agent.compile import CapacityError, compile_rules
from agent.config import ConfigError, NodeConfig, load_config
from agent.libbpf import BpfError
from agent.maps import LayoutError
from agent.node import NodeError
from agent.prefixes import PrefixError
from agent.rules import ruleset_from_config
from agent.xdp_link import LinkError

SWEEP_SECONDS = 1.0
FAILURES = (ConfigError, PrefixError, CapacityError, NodeError, LayoutError, LinkError,
            BuildError, BpfError)


def phase(name: str, detail: str) -> None:
    print(f"privedge-agent: [{name}] {detail}", flush=True)


class Agent:
    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.cfg: NodeConfig = load_config(config_path)
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._seen_mtime = 0
        self._next_expiry: float | None = None

    def start(self):
        started = loader.start(self.cfg, phase)
        self.node = started.node
        phase("ready", f"{self.cfg.interface} protected, generation {started.generation}, "
                       f"edge program {started.edge_tag}")

    def do_reload(self) -> None:
        """SIGHUP: re-read the config and apply it as one generation."""
        try:
            cfg = load_config(self.config_path)
            if (cfg.interface, cfg.netns, cfg.bpffs, cfg.run_dir) != \
                    (self.cfg.interface, self.cfg.netns, self.cfg.bpffs, self.cfg.run_dir):
                raise ConfigError("interface, netns, bpffs and run_dir cannot change on "
                                  "reload; restart the agent")
            with self.node.lock():
                rules = ruleset_from_config(cfg, catalog.load(self.node.run_dir))
                report = apply_generation(self.node, rules)
            self.cfg = cfg
            phase("reload", f"generation {report['generation']} live in {report['total_s']}s")
        except FAILURES as e:
            phase("reload", f"refused, nothing changed: {e}")

    def sweep(self) -> None:
        """Forget expired entries; the kernel stopped enforcing them already.

        Cheap when nothing is due: the rule set is re-read only when its file
        changed, and swept only once its earliest expiry has passed.
        """
        path = self.node.run_dir / catalog.FILE
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime != self._seen_mtime:
            self._seen_mtime = mtime
            self._next_expiry = catalog.next_expiry(self.node.run_dir)
        if self._next_expiry is None or time.time() < self._next_expiry:
            return
        try:
            self._next_expiry = None  # recomputed from the file the sweep writes
            r = expire_entries(self.node)
            if r:
                phase("expire", f"{r['expired']} entr{'y' if r['expired'] == 1 else 'ies'} "
                                "expired and removed")
        except FAILURES as e:
            self._seen_mtime = 0  # re-read the rule set, and so retry, next time
            phase("expire", f"failed, will retry: {e}")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())
        self.start()
        while not self.stop.wait(SWEEP_SECONDS):
            if self.reload.is_set():
                self.reload.clear()
                self.do_reload()
            self.sweep()
        phase("exit", f"leaving {self.cfg.interface} protected: the program stays attached "
                      "and the maps pinned")
        self.node.close()
        return 0


def check(config_path: str) -> int:
    """Validate the config and its lists, compile them; touch nothing."""
    cfg = load_config(config_path)
    t0 = time.perf_counter()
    rules = ruleset_from_config(cfg)
    c = compile_rules(rules, 1)
    print(f"{config_path}: valid; {len(rules.deny_all()):,} deny entries "
          f"({c.counts['deny4_exact']:,} exact IPv4, {c.counts['deny6']:,} IPv6) compiled in "
          f"{time.perf_counter() - t0:.2f}s; nothing was changed")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="privedge-agent", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="protect an interface and stay (SIGHUP reloads)")
    r.add_argument("--config", required=True)
    c = sub.add_parser("check", help="validate the config; change nothing")
    c.add_argument("--config", required=True)
    d = sub.add_parser("detach", help="remove the program, pins and state of an interface")
    d.add_argument("iface")
    d.add_argument("--netns", help="network namespace of the interface")
    d.add_argument("--bpffs", default="/sys/fs/bpf/privedge", help="default: %(default)s")
    d.add_argument("--run-dir", default="/run/privedge", help="default: %(default)s")
    args = p.parse_args(argv)
    try:
        if args.cmd == "run":
            return Agent(args.config).run()
        if args.cmd == "check":
            return check(args.config)
        found = loader.detach(args.iface, args.bpffs, args.run_dir, args.netns, phase)
        if not found:
            print(f"privedge-agent: nothing of privedge on {args.iface}", file=sys.stderr)
        return 0
    except FAILURES as e:
        print(f"privedge-agent: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
