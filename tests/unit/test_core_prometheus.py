"""core/prometheus.py and the files beside it: the generated Prometheus
config and the alert rules pass promtool, and the rules and the Grafana
dashboard ask only for series the agent's collectors export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from agent.l7.counters import Counters
from agent.logs.metrics import LogsCollector
from agent.metrics.l7 import L7Collector
from agent.metrics.registry import AllowlistRegistry
from agent.metrics.rtt import RttCollector, RttProber
from agent.metrics.server import TlsFiles
from agent.metrics.xdp import XdpCollector
from control import pki
from core.prometheus import DASHBOARD, JOB, RULES, main, prometheus_config
from lab.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "lab" / "topology.yaml"
# Labels Prometheus adds to every scraped series (the scrape config's target labels).
TARGET_LABELS = {"dc", "region", "job", "instance"}


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: it comes with Debian's prometheus (make setup)"
    return path


@pytest.fixture(scope="module")
def network_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.run(d, pki.plan_from_topology(TOPOLOGY, {}))
    return d


def test_the_config_scrapes_every_dc_over_mtls_and_passes_promtool(network_pki: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "prometheus.yml"
    assert main(["--topology", str(TOPOLOGY), "--pki", str(network_pki), "--out", str(out),
                 "--interval", "5"]) == 0
    cfg = yaml.safe_load(out.read_text())
    job = cfg["scrape_configs"][0]
    assert job["job_name"] == JOB and job["scheme"] == "https"
    assert job["tls_config"]["cert_file"] == str(network_pki / "prometheus.crt")
    targets = {t["labels"]["dc"]: t["targets"] for t in job["static_configs"]}
    assert targets == {"dus": ["198.18.0.1:9443"], "fra": ["198.18.0.2:9443"],
                       "iad": ["198.18.0.3:9443"]}
    check = subprocess.run([_promtool(), "check", "config", str(out)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_alert_rules_pass_promtool() -> None:
    check = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {"PrivedgeDcDown", "PrivedgeDropRateSpike", "PrivedgeOriginErrorRatio"} <= names


def _exported(network_pki: Path) -> dict[str, set[str]]:
    """Series name -> label names, from the agent's real collectors."""
    registry = AllowlistRegistry()
    registry.register(XdpCollector({}))
    registry.register(L7Collector(lambda: Counters(["www"])))
    tls = TlsFiles(network_pki / "agents" / "dus.crt", network_pki / "agents" / "dus.key",
                   network_pki / "ca.crt")
    registry.register(RttCollector(RttProber({"fra": "127.0.0.1"}, 9, tls)))

    class Shippers:   # what a LogRouter reports: one shipper per stream
        def stats(self) -> list[tuple[str, str, dict[str, int | str]]]:
            return [("logs", "core", {}), ("sample", "core", {})]

    registry.register(LogsCollector(Shippers))
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    for family in registry.collect():   # families without samples (no XDP link here)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        for suffix in suffixes.get(family.type, ("",)):
            out.setdefault(family.name + suffix, set())
    out["privedge_xdp_packets_total"] |= {"interface", "verdict", "reason"}
    out["up"] = set()
    assert generate_latest(registry)   # the registry renders
    return out


def _queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [(f"dashboard: {p['title']}", t["expr"]) for p in dash["panels"]
             for t in p["targets"]]
    rules = yaml.safe_load(RULES.read_text())
    return exprs + [(f"rule: {r['alert']}", r["expr"]) for g in rules["groups"]
                    for r in g["rules"]]


def test_dashboard_and_rules_ask_only_for_exported_series(network_pki: Path) -> None:
    exported = _exported(network_pki)
    for where, expr in _queries():
        for name, selector in re.findall(r"\b((?:privedge|up)\w*)(\{[^}]*\})?", expr):
            assert name in exported, f"{where}: {name} is not exported"
            labels = set(re.findall(r"(\w+)\s*[=!~]{1,2}", selector))
            unknown = labels - exported[name] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label(s) {', '.join(sorted(unknown))}"


def test_the_dashboard_is_importable_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "dc"}


def test_a_config_for_the_lab_topology_names_each_dcs_region() -> None:
    cfg = prometheus_config(load_topology(TOPOLOGY), Path("/pki"))
    regions = {t["labels"]["dc"]: t["labels"]["region"]
               for t in cfg["scrape_configs"][0]["static_configs"]}
    assert regions == {"dus": "eu", "fra": "eu", "iad": "us"}
