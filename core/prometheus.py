"""The core's Prometheus config, generated from the network config.

    python -m core.prometheus --topology lab/topology.yaml --pki /etc/privedge/pki \\
        --out /etc/privedge/prometheus.yml [--interval 15]

One scrape job, `privedge-agents`, with a target per DC: its backbone
address and metrics port, labelled with the DC's name and region, scraped
over HTTPS with Prometheus's own client certificate (control/pki.py issues
prometheus.crt) and the agents verified against the network CA. The alert
rules (core/prometheus/privedge.rules.yml) are loaded beside it; the
Grafana dashboard (core/grafana/privedge.json) reads the same series.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "prometheus" / "privedge.rules.yml"
DASHBOARD = HERE / "grafana" / "privedge.json"
JOB = "privedge-agents"
METRICS_PORT = 9443


def scrape_targets(topology: object, port: int = METRICS_PORT) -> list[dict]:
    """A static target per DC: backbone address and port, labels dc and region."""
    bb = topology.backbone.name  # type: ignore[attr-defined]
    return [{"targets": [f"{dc.link(bb).v4}:{port}"],
             "labels": {"dc": dc.name, "region": dc.region}}
            for dc in topology.dcs]  # type: ignore[attr-defined]


def prometheus_config(topology: object, pki: Path, interval: float = 15.0,
                      port: int = METRICS_PORT, rules: Path = RULES) -> dict:
    """The whole prometheus.yml as a mapping (yaml.safe_dump it)."""
    seconds = f"{interval:g}s"
    return {
        "global": {"scrape_interval": seconds, "evaluation_interval": seconds,
                   "scrape_timeout": f"{min(interval, 10.0):g}s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{
            "job_name": JOB,
            "scheme": "https",
            "metrics_path": "/metrics",
            "tls_config": {"ca_file": str(pki / "ca.crt"),
                           "cert_file": str(pki / "prometheus.crt"),
                           "key_file": str(pki / "prometheus.key"),
                           "min_version": "TLS12"},
            "static_configs": scrape_targets(topology, port),
        }],
    }


def main(argv: list[str] | None = None) -> int:
    from lab.topology import TopologyError, load_topology  # the network config's loader

    p = argparse.ArgumentParser(prog="python -m core.prometheus",
                                description=__doc__.split("\n")[0])
    p.add_argument("--topology", type=Path, required=True, help="the network config")
    p.add_argument("--pki", type=Path, required=True, help="the privedge-pki directory")
    p.add_argument("--out", type=Path, help="write here (default: stdout)")
    p.add_argument("--interval", type=float, default=15.0, help="scrape interval, seconds")
    args = p.parse_args(argv)
    try:
        topology = load_topology(args.topology)
    except (OSError, TopologyError) as e:
        print(f"{args.topology}: {e}", file=sys.stderr)
        return 1
    text = yaml.safe_dump(prometheus_config(topology, args.pki.absolute(), args.interval),
                          sort_keys=False)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
