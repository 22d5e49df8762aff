"""privedge-agent: bring a DC's links under protection and look after them.

  privedge-agent run --config inet0.yaml [--config bb0.yaml] [--serve serve.yaml]
                     [--metrics metrics.yaml] [--logs logs.yaml] [--api api.yaml]
        start (or adopt) every link, then stay: SIGHUP reloads each config as a
        new generation (and restarts the front end), SIGTERM/SIGINT exit and
        leave the programs attached. --serve runs the TLS front end with the
        Regional Services guard (agent/l7). --metrics serves /metrics over
        mTLS (agent/metrics). --logs ships customer logs and the operations
        sample to the core over mTLS (agent/logs). --api serves operators and
        the control plane over mTLS, by role, audited (agent/api.py). SIGHUP
        also reloads their certificates; those three files are read at start.
  privedge-agent check --config node.yaml   validate config and lists; change nothing
  privedge-agent detach IFACE               remove program, pins and state

Startup phases are printed by name, so a failure says where it happened.
Exit status: 0 done, 1 failed, 2 usage.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass

from pyroute2 import NetlinkError

from agent import catalog, loader, neighbours
from agent.api import AgentApi, ApiConfig, ApiError, ApiServer, load_api_config
from agent.apply import apply_generation, check_fixed_sizes, expire_entries
from agent.bcc_build import BuildError
from agent.compile import CapacityError, Compiled, compile_rules
from agent.config import ConfigError, NodeConfig, Steering, load_config
from agent.l7.cache import Cache, CacheDirError
from agent.l7.config import ServeConfig, load_serve_config
from agent.l7.server import L7Server, ServeError, ServerThread, run_in_thread
from agent.libbpf import BpfError
from agent.logs.config import LogsConfig, load_logs_config
from agent.logs.metrics import LogsCollector
from agent.logs.router import region_problems
from agent.logs.service import LogService
from agent.maps import LayoutError
from agent.metrics.config import MetricsConfig, load_metrics_config
from agent.metrics.l7 import L7Collector
from agent.metrics.service import MetricsService
from agent.metrics.xdp import XdpCollector
from agent.netgen import Identity, NetworkState, Rendered, Staged, render
from agent.node import Node, NodeError
from agent.prefixes import PrefixError
from agent.rules import NetworkShare, RuleSet, ruleset_from_config
from agent.xdp_link import LinkError
from control.audit import AuditError, AuditLog, fingerprint
from control.genserver import fetch_current

SWEEP_SECONDS = 1.0
NEIGHBOUR_SECONDS = 5.0
LOGS_STOP_SECONDS = 5.0
FAILURES = (ConfigError, PrefixError, CapacityError, NodeError, LayoutError, LinkError,
            BuildError, BpfError, ServeError, CacheDirError)


def phase(name: str, detail: str) -> None:
    print(f"privedge-agent: [{name}] {detail}", flush=True)


def same_steering(cfgs: list[NodeConfig], paths: list[str]) -> Steering | None:
    """The steering section every link carries; the links of a DC must agree."""
    sections = {cfg.steering for cfg in cfgs}
    if len(sections) > 1:
        raise ConfigError("the links of one agent must carry the same steering section "
                          f"(they differ in {', '.join(paths)})")
    return sections.pop() if sections else None


class Steps:
    """How long each step of an apply took, for its report."""

    def __init__(self, t0: float) -> None:
        self.t0 = self.last = t0
        self.done: dict[str, float] = {}

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.done[step] = round(now - self.last, 4)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 4)


@dataclass
class LinkPlan:
    """A link's part of an apply, checked: what it had, what it gets."""

    link: Link
    stamp: tuple[int, int] | None      # of the rule set read (agent/catalog.py)
    rules: RuleSet
    compiled: Compiled

    def swap(self, share: NetworkShare) -> dict:
        """Swap the link to its new generation; returns the report. An
        operator's change since the check (a deny added) is kept: the rules
        are made again from the rule set now there."""
        node = self.link.node
        with node.lock():
            if catalog.stamp(node.run_dir) == self.stamp:
                return apply_generation(node, self.rules, compiled=self.compiled)
        return self.link.regenerate(self.link.cfg, None, share)


class Link:
    """One protected interface: its config, its node, its expiry sweep."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.cfg: NodeConfig = load_config(config_path)
        self._seen_mtime = 0
        self._next_expiry: float | None = None

    def start(self, network: NetworkShare | None) -> None:
        started = loader.start(self.cfg, phase, network)
        self.node = started.node
        phase("link", f"{self.cfg.interface} protected, generation {started.generation}, "
                      f"edge program {started.edge_tag}")

    def check_reload(self, cfg: NodeConfig) -> None:
        if (cfg.interface, cfg.netns, cfg.bpffs, cfg.run_dir) != \
                (self.cfg.interface, self.cfg.netns, self.cfg.bpffs, self.cfg.run_dir):
            raise ConfigError(f"{self.config_path}: interface, netns, bpffs and run_dir cannot "
                              "change on reload; restart the agent")

    def regenerate(self, cfg: NodeConfig, backbone: int | None,
                   network: NetworkShare | None) -> dict:
        """A new generation of `cfg` with `network` over it, on the rule set
        there now (so the operator's entries stay); raises on failure."""
        with self.node.lock():
            rules = ruleset_from_config(cfg, catalog.load(self.node.run_dir), backbone, network)
            return apply_generation(self.node, rules)

    def apply(self, cfg: NodeConfig, backbone: int | None, network: NetworkShare | None) -> None:
        """Apply a checked config as one generation (backbone: fresh ifindex)."""
        try:
            report = self.regenerate(cfg, backbone, network)
            self.cfg = cfg
            phase("reload", f"{cfg.interface}: generation {report['generation']} live in "
                            f"{report['total_s']}s")
        except FAILURES as e:
            phase("reload", f"{cfg.interface}: refused, nothing changed: {e}")

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



class Agent:
    """Every link of a DC, the TLS front end, and the backbone neighbours."""

    def __init__(self, config_paths: list[str], serve_path: str | None = None,
                 metrics_path: str | None = None, logs_path: str | None = None,
                 api_path: str | None = None) -> None:
        self.links = [Link(p) for p in config_paths]
        names = [link.cfg.interface for link in self.links]
        if len(set(names)) != len(names):
            raise ConfigError(f"an interface is configured twice: {', '.join(names)}")
        if len({link.cfg.netns for link in self.links}) > 1:
            raise ConfigError("all --config files of one agent must name the same netns")
        self.serve_path = serve_path
        # serve.yaml as written, and what the front end serves: its zones
        # come from the network generation once there is one.
        self.serve_local = load_serve_config(serve_path) if serve_path else None
        self.serve_cfg = self.serve_local
        self.front: ServerThread | None = None
        self.cache: Cache | None = None   # the front end's, kept across reloads
        self.steering = same_steering([link.cfg for link in self.links], config_paths)
        self.metrics_cfg: MetricsConfig | None = (load_metrics_config(metrics_path)
                                                  if metrics_path else None)
        self.metrics: MetricsService | None = None
        self.logs_cfg: LogsConfig | None = load_logs_config(logs_path) if logs_path else None
        self.logs: LogService | None = None
        self.api_cfg: ApiConfig | None = load_api_config(api_path) if api_path else None
        self.api: ApiServer | None = None
        self.network = NetworkState(self.api_cfg.generations_dir) if self.api_cfg else None
        self.staged: Staged | None = None         # the network generation enforced,
        self.rendered: Rendered | None = None     # and this DC's share of it
        self.pulled = False                       # staged is pulled, not yet kept
        self.pulled_from = b""                    # the control plane's certificate (DER)
        self.changing = threading.Lock()          # one apply or reload at a time
        self.stop = threading.Event()
        self.reload = threading.Event()

    def start_front(self) -> None:
        if self.serve_cfg is None:
            return
        # One cache across reloads: a new store would start empty (and empty
        # its disk), so it is replaced only when its own settings change.
        if self.cache is not None and self.cache.settings != self.serve_cfg.cache_store:
            self.cache.close()
            self.cache = None
        if self.cache is None:
            self.cache = Cache(self.serve_cfg.cache_store)
        logs = self.logs
        self.front = run_in_thread(
            self.serve_cfg, cache=self.cache,
            logs=logs.submitters(self.serve_cfg) if logs else None,
            sample=logs.sampling() if logs else None)
        where = ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}"
                          for a, p in self.front.addresses)
        phase("serve", f"TLS front end of {self.serve_cfg.dc} (region {self.serve_cfg.region}) "
                       f"on {where}")

    def start_logs(self) -> None:
        """The shippers of customer logs and the sample, before the front end
        that feeds them; they connect to the core when there is a batch."""
        if self.logs_cfg is None:
            return
        self.logs = LogService(self.logs_cfg, self.serve_cfg).start()
        zones = ", ".join(self.logs_cfg.zones) or "no zone"
        phase("logs", f"customer logs of {zones}; sample rate {self.logs_cfg.sample.rate:g}"
                      f" to {self.logs_cfg.sample_core or 'nowhere'}")

    def start_api(self) -> None:
        """The operators' and the control plane's API over mTLS (agent/api.py)."""
        if self.api_cfg is None:
            return
        c = self.api_cfg
        serve, steering = self.serve_cfg, self.steering
        dc = serve.dc if serve else steering.dc if steering else ""
        region = serve.region if serve else steering.region if steering else ""
        log = AuditLog(c.audit)
        try:
            log.last()   # readable and whole now, not at the first change
        except AuditError as e:
            raise ConfigError(f"api: audit log {e}") from None
        api = AgentApi(dc, region, {link.cfg.interface: link.node for link in self.links},
                       serve.status_socket if serve else None, log, self)
        try:
            self.api = ApiServer(api, c.listen, c.port, c.tls).start()
        except OSError as e:
            raise ConfigError(f"api on [{c.listen}]:{c.port}: {e}") from None
        address, port = self.api.address
        phase("api", f"operators' API over mTLS on [{address}]:{port}; audit {c.audit}")

    def start_metrics(self) -> None:
        """/metrics over mTLS: the started links' XDP counters and the front
        end's, read at scrape time."""
        if self.metrics_cfg is None:
            return
        collectors = [
            XdpCollector({link.cfg.interface: link.node for link in self.links}),
            L7Collector(lambda: self.front.server.counters if self.front else None),
            LogsCollector(lambda: self.logs.router if self.logs else None)]
        self.metrics = MetricsService(self.metrics_cfg, collectors).start()
        address, port = self.metrics.address
        rtt = self.metrics_cfg.rtt
        phase("metrics", f"/metrics over mTLS on [{address}]:{port}"
                         + (f"; RTT probes of {', '.join(rtt.peers)}" if rtt else ""))

    def reload_certificates(self) -> None:
        """SIGHUP: each mTLS service loads its certificates again (the PKI
        reissued them in place); one that cannot keeps its old ones."""
        for name, service in (("metrics", self.metrics), ("log", self.logs),
                              ("API", self.api)):
            if service is None:
                continue
            try:
                service.reload()
            except (OSError, ssl.SSLError) as e:
                phase("reload", f"{name} certificates refused, the old ones stay: {e}")

    def reload_links(self) -> None:
        """SIGHUP for the links: every config is read and checked first (the
        links must still steer alike, the backbone link is prepared again and
        its ifindex looked up afresh), then each applies a generation with
        the network generation's share over it."""
        with self.changing:
            try:
                cfgs = [load_config(link.config_path) for link in self.links]
                for link, cfg in zip(self.links, cfgs, strict=True):
                    link.check_reload(cfg)
                steering = same_steering(cfgs, [link.config_path for link in self.links])
                backbone = (loader.prepare_backbone(steering.backbone_interface, phase)
                            if steering else None)
            except FAILURES as e:
                phase("reload", f"refused, nothing changed: {e}")
                return
            share = self.rendered.share if self.rendered else None
            for link, cfg in zip(self.links, cfgs, strict=True):
                link.apply(cfg, backbone, share)
            self.steering = steering

    def check_front(self, cfg: ServeConfig) -> None:
        """Raise unless `cfg` could be served: every certificate loads, and
        each zone's logs may go where logs.yaml sends them."""
        L7Server(cfg)
        if self.logs_cfg is not None:   # also before the shippers start (a pulled generation)
            problems = region_problems(self.logs_cfg, {z.name: z.region for z in cfg.zones})
            if problems:   # a zone now regional must log in its region
                raise ConfigError("logs config: " + "\n".join(problems))

    def swap_front(self, cfg: ServeConfig) -> None:
        """Serve a checked `cfg` instead of the current one. When only the
        zones differ (a network generation), the running front end adopts
        them: no listener closes, no connection is cut, the counters go on.
        Otherwise the listeners close and reopen (the port is ours again);
        if the new config cannot start, the old one is served again and the
        error raised."""
        if self.front is not None and self.front.server.can_adopt(cfg):
            logs = self.logs
            new = L7Server(cfg, self.front.counters, self.cache,
                           logs.submitters(cfg) if logs else None,
                           logs.sampling() if logs else None)
            try:
                self.front.adopt(new)
            except (TimeoutError, RuntimeError) as e:   # the loop is gone or stuck
                raise ServeError(f"the front end did not take the new zones: {e}") from None
            self.serve_cfg = cfg
            return
        old_cfg = self.serve_cfg
        if self.front:
            self.front.stop()
            self.front = None
        try:
            self.serve_cfg = cfg
            self.start_front()
        except FAILURES:
            self.serve_cfg = old_cfg
            self.start_front()
            raise

    def reload_front(self) -> None:
        """SIGHUP for the front end: serve.yaml is read again (with the
        network generation's zones over it, once there is one) and checked
        before the old listeners close; if the new one cannot bind, the old
        config is served again."""
        if self.serve_path is None:
            return
        with self.changing:
            try:
                local = load_serve_config(self.serve_path)
                cfg = (render(self.staged, self.identity(local), local).serve
                       if self.staged else local)
                assert cfg is not None
                self.check_front(cfg)
            except FAILURES as e:
                phase("reload", f"front end config refused, still serving the old one: {e}")
                return
            self.serve_local = local
            try:
                self.swap_front(cfg)
            except FAILURES as e:
                phase("reload", f"front end could not start ({e}); serving the old config again")

    # -- the network generation (control plane) ----------------------------------------

    def identity(self, serve: ServeConfig | None = None) -> Identity:
        """Which DC this agent is, from its serve config and steering (they
        must agree): a generation must describe the same DC."""
        serve = serve or self.serve_local
        st = self.steering
        if serve is not None:
            if st is not None and (serve.dc, serve.region) != (st.dc, st.region):
                raise ConfigError(f"the serve config says {serve.dc} in {serve.region}, the "
                                  f"links' steering {st.dc} in {st.region}")
            dc, region = serve.dc, serve.region
        elif st is not None:
            dc, region = st.dc, st.region
        else:
            raise ConfigError("a network generation needs --serve or a steering section "
                              "to say which DC this agent is")
        return Identity(dc, region, st.backbone_address if st else None)

    def load_stored_network(self) -> None:
        """Before anything starts: the generation last applied here, which the
        links and the front end then start with. One that no longer fits
        this agent stops the start (never an empty rule set instead)."""
        if self.network is None:
            return
        self.network.clean()
        staged = self.network.current()
        if staged is None:
            phase("network", f"no network generation in {self.network.directory} yet: "
                             "the configs' own lists and zones")
            return
        self.rendered = render(staged, self.identity(), self.serve_local)
        self.staged = staged
        if self.rendered.serve is not None:
            self.serve_cfg = self.rendered.serve
        phase("network", f"generation {staged.number} ({staged.generation.sha256[:12]}) "
                         f"from {staged.directory}")

    def pull_network(self) -> None:
        """At start, after the stored generation: the control plane's current
        one, if newer. It is checked whole (rendered, every link's rules
        compiled) before it is kept; one that does not fit, or a control
        plane that does not answer, leaves the stored generation in force."""
        control = self.api_cfg.control if self.api_cfg else None
        if control is None or self.network is None:
            return
        have = self.rendered.number if self.rendered else 0
        try:
            payload, self.pulled_from = fetch_current(
                control.address, control.port, control.name,
                self.api_cfg.tls)  # type: ignore[union-attr]
        except (OSError, ssl.SSLError, ValueError) as e:
            phase("network", f"control plane {control.address}:{control.port} did not answer "
                             f"({e}); starting with generation {have or 'none'}")
            return
        number = payload.get("number") if isinstance(payload, dict) else None
        if not isinstance(number, int) or number <= have:
            phase("network", f"the control plane is at generation {number or 'none'}; "
                             f"this DC at {have or 'none'}")
            return
        try:
            staged = self.network.stage(payload)
        except FAILURES as e:
            phase("network", f"pulled generation {number} refused: {e}")
            return
        try:
            rendered = render(staged, self.identity(), self.serve_local)
            for link in self.links:   # with the operator's entries the link keeps
                keep = catalog.load(Node(link.cfg.interface, link.cfg.bpffs,
                                         link.cfg.run_dir).run_dir)
                compile_rules(ruleset_from_config(link.cfg, keep, None, rendered.share), 0)
            if rendered.serve is not None:
                self.check_front(rendered.serve)
        except Exception as e:   # whatever it is, the stored generation stays in force
            self.network.discard(staged)
            phase("network", f"pulled generation {number} refused, keeping "
                             f"{have or 'the configs'}: {e}")
            return
        # Kept (what the next start applies) once the links and the front
        # end have started with it: keep_pulled().
        self.staged, self.rendered, self.pulled = staged, rendered, True
        if rendered.serve is not None:
            self.serve_cfg = rendered.serve
        phase("network", f"generation {number} pulled from the control plane")

    def keep_pulled(self) -> None:
        if not self.pulled or self.network is None or self.staged is None:
            return
        self.pulled = False
        try:
            self.staged = self.network.commit(self.staged)
        except OSError as e:
            phase("network", f"generation {self.staged.number} is enforced but could not be "
                             f"kept ({e}); the next start pulls it again")
            return
        control = self.api_cfg.control   # type: ignore[union-attr]
        try:   # a change like an apply: in the agent's audit chain too
            AuditLog(self.api_cfg.audit).append(   # type: ignore[union-attr]
                f"control plane {control.name}", fingerprint(self.pulled_from),
                "pull generation", {"number": self.staged.number,
                                    "sha256": self.staged.generation.sha256},
                {self.identity().dc: {"ok": True, "status": 200}})
        except AuditError as e:
            phase("network", f"generation {self.staged.number} pulled but not audited: {e}")

    def network_info(self) -> dict:
        r = self.rendered
        if r is None:
            return {"generation": 0}
        return {"generation": r.number, "sha256": r.sha256, "left_out": list(r.left_out),
                "zones": [z.name for z in r.serve.zones] if r.serve else []}

    def apply_network(self, payload: object, dry: bool = False) -> dict:
        """Apply a generation from the control plane, atomically on this DC.

        All is checked before anything changes: the payload unpacked and
        validated, this DC's share rendered, every link's rules compiled
        against its capacity, every certificate of the new zones loaded.
        Then each link swaps to a new BPF generation, then the front end to
        the new zones; if a later step fails, the links already swapped go
        back to their rules before. Raises ApiError (422: refused, nothing
        changed; 409: stale; 500: failed and rolled back)."""
        if self.network is None:
            raise ApiError(409, "this agent keeps no network generations (api.yaml)")
        t0 = time.perf_counter()
        with self.changing:
            current = self.rendered
            number = payload.get("number") if isinstance(payload, dict) else None
            if current is not None and isinstance(number, int) \
                    and not isinstance(number, bool):
                if number < current.number:
                    raise ApiError(409, f"stale: generation {number} is older than this "
                                        f"DC's {current.number}")
                if number == current.number:
                    if payload.get("sha256") != current.sha256:  # type: ignore[union-attr]
                        raise ApiError(409, f"generation {number} is applied here with other "
                                            f"content (sha256 {current.sha256[:12]})")
                    return {"generation": number, "changed": False,
                            "apply_s": round(time.perf_counter() - t0, 4)}
            try:
                staged = self.network.stage(payload)
            except FAILURES as e:
                raise ApiError(422, f"refused, nothing changed: {e}") from None
            try:
                return self._apply_staged(staged, dry, Steps(t0))
            finally:
                if self.staged is None or self.staged.generation is not staged.generation:
                    self.network.discard(staged)

    def _apply_staged(self, staged: Staged, dry: bool, steps: Steps) -> dict:
        steps.mark("unpacked")
        try:
            rendered = render(staged, self.identity(), self.serve_local)
            plans = [self._plan_link(link, rendered.share) for link in self.links]
            front = rendered.serve if rendered.serve != self.serve_cfg else None
            if front is not None:
                self.check_front(front)
        except FAILURES as e:
            raise ApiError(422, f"refused, nothing changed: {e}") from None
        steps.mark("checked")
        report: dict = {"generation": staged.number, "dry_run": dry,
                        "front": "unchanged" if front is None else "new zones",
                        "left_out": list(rendered.left_out), "steps": steps.done, "links": {}}
        if dry:
            return {**report, "apply_s": steps.total()}
        swapped: list[Link] = []
        old_front, old_share = self.serve_cfg, self.rendered.share if self.rendered else None
        try:
            for plan in plans:
                swapped.append(plan.link)   # before: a swap that fails half-way is put back too
                applied = plan.swap(rendered.share)
                report["links"][plan.link.cfg.interface] = {
                    "bpf_generation": applied["generation"], "seconds": applied["total_s"]}
            steps.mark("links swapped")
            if front is not None:
                self.swap_front(front)
                steps.mark("front end swapped")
            try:    # what a restart applies: kept before the apply is reported done
                self.staged = self.network.commit(staged)   # type: ignore[union-attr]
            except OSError as e:
                if front is not None and old_front is not None:
                    self.swap_front(old_front)
                raise ServeError(f"could not keep the generation ({e})") from None
        except Exception as e:   # whatever it was, the DC goes back whole
            self._restore(swapped, old_share)
            why = str(e) if isinstance(e, FAILURES) else f"{type(e).__name__}: {e}"
            raise ApiError(500, f"failed, rolled back to generation "
                                f"{self.rendered.number if self.rendered else 0}: {why}") from None
        self.rendered = rendered
        steps.mark("kept")
        phase("network", f"generation {staged.number} applied in {steps.total()}s: "
                         + ", ".join(f"{k} {v}s" for k, v in steps.done.items()))
        return {**report, "apply_s": steps.total()}

    @staticmethod
    def _plan_link(link: Link, share: NetworkShare) -> LinkPlan:
        """A link's new rules, compiled against its capacity (CapacityError
        before any link changes)."""
        node = link.node
        with node.lock():
            stamp = catalog.stamp(node.run_dir)
            old = catalog.load(node.run_dir)
            rules = ruleset_from_config(link.cfg, old, None, share)
            check_fixed_sizes(node, rules)
            compiled = compile_rules(rules, node.active().generation + 1)
        return LinkPlan(link, stamp, rules, compiled)

    def _restore(self, links: list[Link], share: NetworkShare | None) -> None:
        """Put links back on the network generation they had (`share`; None:
        their configs' own lists), over the rule set there now, so an
        operator's deny made meanwhile stays. A link that cannot be put back
        is named: the DC is then half-applied, and says so."""
        stuck = []
        for link in reversed(links):
            try:
                link.regenerate(link.cfg, None, share)
            except Exception as e:
                stuck.append(f"{link.cfg.interface}: {type(e).__name__}: {e}")
        if stuck:
            raise ApiError(500, "HALF-APPLIED: could not roll back " + "; ".join(stuck))

    def warm_neighbours(self) -> None:
        if self.steering is None:
            return
        try:
            probed = neighbours.warm(self.steering)
        except (OSError, NetlinkError) as e:
            phase("neighbours", f"could not probe backbone peers: {e}")
            return
        if probed:
            phase("neighbours", f"resolving backbone next hops {', '.join(probed)}")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())
        self.load_stored_network()
        self.pull_network()
        share = self.rendered.share if self.rendered else None
        for link in self.links:
            link.start(share)
        self.warm_neighbours()
        self.start_logs()
        self.start_front()
        self.keep_pulled()
        self.start_metrics()
        self.start_api()
        phase("ready", f"{len(self.links)} link(s) protected"
                       f"{'' if self.front is None else ', front end serving'}")
        last_warm = time.monotonic()
        while not self.stop.wait(SWEEP_SECONDS):
            if self.reload.is_set():
                self.reload.clear()
                self.reload_links()
                self.reload_front()
                self.reload_certificates()
            for link in self.links:
                link.sweep()
            if time.monotonic() - last_warm > NEIGHBOUR_SECONDS:
                self.warm_neighbours()
                last_warm = time.monotonic()
        self.changing.acquire()   # an apply under way ends first; none starts after
        if self.api:
            self.api.stop()
        if self.metrics:
            self.metrics.stop()
        if self.front:
            self.front.stop()
        if self.logs is not None:
            self.logs.stop(LOGS_STOP_SECONDS)   # what the core has not taken yet, bounded
        if self.cache is not None:
            self.cache.close()
        for link in self.links:
            phase("exit", f"leaving {link.cfg.interface} protected: the program stays attached "
                          "and the maps pinned")
            link.node.close()
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
    r = sub.add_parser("run", help="protect the links and stay (SIGHUP reloads)")
    r.add_argument("--config", required=True, action="append",
                   help="a link's node config; repeat for each link of the DC")
    r.add_argument("--serve", help="the TLS front end's config (agent/l7)")
    r.add_argument("--metrics", help="where to serve /metrics over mTLS (agent/metrics)")
    r.add_argument("--logs", help="where customer logs and the sample go (agent/logs)")
    r.add_argument("--api", help="the operators' API over mTLS (agent/api.py)")
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
            return Agent(args.config, args.serve, args.metrics, args.logs, args.api).run()
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
