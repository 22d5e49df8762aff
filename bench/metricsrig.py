"""The agent's /metrics server as a DC runs it, in a process of its own, for
bench/metadata.py to scrape (its CPU is then this process's alone).

    python -m bench.metricsrig --pki DIR [--zones 10]

DIR holds certificates of control/pki.py's plan for DCs dus, fra and iad
(agents/<dc>.crt|key, ca.crt). This process builds what agent/daemon.py's
start_metrics registers, with traffic in every series:

  XdpCollector   two real XDP nodes (agent/standalone.py), inet0 (role
                 public) and bb0 (backbone) like a DC's two links, their
                 per-CPU counters made non-zero by BPF_PROG_TEST_RUN
  L7Collector    a front end's Counters (agent/l7/counters.py) of `--zones`
                 zones: requests, every rule action, responses of every status
                 class and cache status, latencies across the buckets
  LogsCollector  a real LogRouter (both streams) holding submitted records
  RttCollector   MetricsService's prober, two peer DCs (fra on 127.0.0.2,
                 iad on 127.0.0.3, each a MetricsServer with its own
                 certificate), probed a few times

all through MetricsService (an AllowlistRegistry, the real MetricsServer
over mTLS) on 127.0.0.1. Beside it, the baseline: a MetricsServer with an
empty registry, the same certificate (TLS and HTTP alone).

It prints one JSON line when ready: {"pid", "full", "empty", "series_xdp",
...} (ports), then serves until its standard input closes, and cleans up
its BPF pins on the way out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from prometheus_client.openmetrics.exposition import generate_latest

from agent.config import Capacity
from agent.l7.counters import (
    CACHE_STATUSES,
    LATENCY_BUCKETS,
    TLS_VERSIONS,
    Counters,
    Refusal,
    RequestError,
    RuleAction,
)
from agent.logs.config import parse_logs_config
from agent.logs.metrics import LogsCollector
from agent.logs.records import LOG_FIELDS, SAMPLE_FIELDS
from agent.logs.router import LogRouter
from agent.metrics.config import MetricsConfig
from agent.metrics.l7 import L7Collector
from agent.metrics.registry import AllowlistRegistry
from agent.metrics.rtt import RttCollector
from agent.metrics.server import MetricsServer, TlsFiles
from agent.metrics.service import MetricsService
from agent.metrics.xdp import XdpCollector
from agent.standalone import StandaloneNode
from bench import denylist

ZONE_NAMES = ("www", "shop-eu", "blog", "api", "docs", "status", "media", "store-us",
              "news", "mail", "forum", "wiki")
LISTEN, PEERS = "127.0.0.1", {"fra": "127.0.0.2", "iad": "127.0.0.3"}
RTT_ROUNDS = 5
SMALL = Capacity(deny4_exact=65536)  # the lab's size: fast to load, same program


def tls(pki: Path, dc: str) -> TlsFiles:
    return TlsFiles(pki / "agents" / f"{dc}.crt", pki / "agents" / f"{dc}.key", pki / "ca.crt")


# ------------------------------------------------------------------------- XDP


def _frames() -> dict[str, bytes]:
    """Frames that end in different counters: denied, clean, bogon, not IP, truncated."""
    from scapy.all import ARP, IP, TCP, UDP, Ether, raw

    addr, _ = denylist.entries(2)  # entry 1 is a /32 of the list
    denied = ".".join(str((int(addr[1]) >> s) & 255) for s in (24, 16, 8, 0))
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

    def tcp(src: str) -> bytes:
        f = raw(eth / IP(src=src, dst="198.51.100.10") / TCP(sport=40000, dport=443, flags="A"))
        return f + b"\x00" * (64 - len(f))

    return {"denied": tcp(denied), "clean": tcp("199.18.7.7"), "bogon": tcp("10.1.2.3"),
            "udp": raw(eth / IP(src="199.18.7.8", dst="198.51.100.10") / UDP(dport=53)),
            "arp": raw(eth / ARP()), "truncated": raw(eth / IP(src="199.18.7.9"))[:20]}


def xdp_nodes(frames: dict[str, bytes]) -> tuple[dict[str, StandaloneNode], int]:
    """inet0 (public) and bb0 (backbone), counters made non-zero; also
    returns how many (node, reason) counters ended up non-zero."""
    nodes: dict[str, StandaloneNode] = {}
    try:
        for ifname, role in (("inet0", "public"), ("bb0", "backbone")):
            node = nodes[ifname] = StandaloneNode(f"ms{ifname}", SMALL)
            node.apply(node.base_rules(role=role).with_deny("list", denylist.tables(1000)))
            for i, f in enumerate(frames.values()):
                node.run(f, repeat=7 + 13 * i)
    except BaseException:
        for node in nodes.values():
            node.close()
        raise
    nonzero = sum(1 for n in nodes.values() for c in n.counters() if c[0])
    return nodes, nonzero


# ------------------------------------------------------------------------- L7


def busy_counters(zones: list[str], rng: random.Random) -> Counters:
    """Counters with a non-zero value in every series of every zone."""
    c = Counters(zones)
    for _ in range(1000):
        c.accepted()
    for reason in Refusal:
        c.refused(reason)
    for version in (*TLS_VERSIONS, "TLSv1.1"):
        c.handshake(version)
    for error in RequestError:
        c.request_error(error)
    upper = [*LATENCY_BUCKETS, 20.0]
    for zone in zones:
        for action in RuleAction:
            c.action(zone, action)
        for status in (101, 200, 301, 404, 503):
            for cache in CACHE_STATUSES:
                c.response(zone, status, "" if cache == "none" else cache.upper(),
                           rng.uniform(0, upper[rng.randrange(len(upper))]))
        for bound in upper:  # every latency bucket
            c.response(zone, 200, "HIT", bound * 0.99)
        for _ in range(rng.randrange(100, 10_000)):
            c.served(zone)
    return c


# ------------------------------------------------------------------------- logs


def log_router(pki: Path, zones: list[str], rng: random.Random) -> LogRouter:
    """A real LogRouter of this DC (not started: its core is nowhere), with
    records submitted to both streams, so its counts are not all zero."""
    t = tls(pki, "dus")
    cfg = parse_logs_config({
        "dc": "dus", "cert": str(t.cert), "key": str(t.key), "ca": str(t.ca),
        "cores": {"core": {"url": "https://127.0.0.10:8443",
                           "tls_name": "core.privedge.internal"}},
        "default_core": "core", "zones": {z: {} for z in zones},
        "sample": {"rate": 0.01, "core": "core"}})
    router = LogRouter(cfg)
    for _ in range(rng.randrange(100, 1000)):
        router.log(zones[0], tuple(range(len(LOG_FIELDS))))
    for _ in range(rng.randrange(10, 100)):
        router.sample(tuple(range(len(SAMPLE_FIELDS))))
    return router


# ------------------------------------------------------------------------- where it goes


def render_ms(collectors: dict[str, object], runs: int = 21) -> dict[str, float]:
    """CPU ms (this thread) to collect and render each collector alone in
    OpenMetrics through an AllowlistRegistry, all of them together, and all
    of them gzipped as the handler does: where a scrape's CPU goes, past TLS."""
    def cost(registry: AllowlistRegistry, gz: bool = False) -> float:
        times = []
        for _ in range(runs):
            t0 = time.thread_time_ns()
            out = generate_latest(registry)
            if gz:
                gzip.compress(out)  # level 9, as prometheus_client's handler
            times.append((time.thread_time_ns() - t0) / 1e6)
        return round(statistics.median(times), 3)

    out = {}
    every = AllowlistRegistry()
    for name, collector in collectors.items():
        alone = AllowlistRegistry()
        alone.register(collector)  # type: ignore[arg-type]
        every.register(collector)  # type: ignore[arg-type]
        out[name] = cost(alone)
    out["all"] = cost(every)
    out["all_gzip"] = cost(every, gz=True)
    return out


# ------------------------------------------------------------------------- servers


def peer_servers(pki: Path) -> tuple[list[MetricsServer], int]:
    """fra and iad: MetricsServers with their own certificates, one port on
    two loopback addresses (the prober has one port for all peers)."""
    for _ in range(20):
        first = MetricsServer(AllowlistRegistry(), PEERS["fra"], 0, tls(pki, "fra"))
        first.start()
        port = first.address[1]
        try:
            second = MetricsServer(AllowlistRegistry(), PEERS["iad"], port, tls(pki, "iad"))
            second.start()
        except OSError:
            first.stop()
            continue
        return [first, second], port
    raise RuntimeError("no port free on both 127.0.0.2 and 127.0.0.3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pki", type=Path, required=True, help="control/pki.py directory")
    p.add_argument("--zones", type=int, default=10, help="zones of the front end")
    args = p.parse_args(argv)
    rng = random.Random(23)
    zones = list(ZONE_NAMES[:args.zones])
    nodes, nonzero = xdp_nodes(_frames())
    servers: list[MetricsServer] = []
    service: MetricsService | None = None
    try:
        peers, peer_port = peer_servers(args.pki)
        servers += peers
        counters = busy_counters(zones, rng)
        router = log_router(args.pki, zones, rng)
        t = tls(args.pki, "dus")
        cfg = MetricsConfig.model_validate({
            "listen": LISTEN, "port": 0, "cert": t.cert, "key": t.key, "ca": t.ca,
            # The probe thread waits an hour: the bench probes before it scrapes,
            # so no probe runs beside a measured scrape.
            "rtt": {"interval": 3600, "port": peer_port, "peers": PEERS}})
        collectors = [XdpCollector({name: n.node for name, n in nodes.items()}),
                      L7Collector(lambda: counters),
                      LogsCollector(lambda: router)]
        service = MetricsService(cfg, collectors).start()
        assert service.prober is not None
        for _ in range(RTT_ROUNDS):
            service.prober.probe_all()
        rtt = service.prober.snapshot()
        render = render_ms(dict(zip(("xdp", "l7", "logs"), collectors, strict=True))
                           | {"rtt": RttCollector(service.prober)})
        empty = MetricsServer(AllowlistRegistry(), LISTEN, 0, t).start()
        servers.append(empty)
        print(json.dumps({"pid": os.getpid(), "full": service.address[1],
                          "empty": empty.address[1], "zones": zones,
                          "xdp_nonzero_counters": nonzero,
                          "rtt_samples": {dc: sum(s["buckets"]) for dc, s in rtt.items()},
                          "rtt_failures": {dc: s["failures"] for dc, s in rtt.items()},
                          "render_cpu_ms": render}),
              flush=True)
        sys.stdin.read()  # serve until the bench closes our stdin
    finally:
        if service is not None:
            service.stop()
        for s in servers:
            s.stop()
        for n in nodes.values():
            n.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
