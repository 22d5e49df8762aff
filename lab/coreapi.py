"""Reading the lab's core from inside its namespace, as its users do: the log
store's API (core/README.md) and each DC's /metrics, with certificates of
the network PKI (<state>/netpki, control/pki.py). curl does the TLS."""

from __future__ import annotations

import json
import subprocess
import time

from core.prometheus import METRICS_PORT
from lab.agents import CORE_PORT, core_address
from lab.cluster import Lab
from lab.topology import Topology

CORE_NAME = "core.privedge.internal"

TIMEOUT = 30.0


def curl(lab: Lab, host: str, *args: str, timeout: float = TIMEOUT
         ) -> subprocess.CompletedProcess:
    return lab.exec(host, ["curl", "-sS", "--max-time", str(timeout), *args],
                    capture_output=True, text=True, timeout=timeout * 2 + 10)


def _tls(lab: Lab, party: str) -> list[str]:
    pki = lab.state_dir / "netpki"
    return ["--cacert", str(pki / "ca.crt"), "--cert", str(pki / f"{party}.crt"),
            "--key", str(pki / f"{party}.key")]


def core_get(lab: Lab, path: str, party: str) -> tuple[int, str]:
    """(status, body) of a GET to the log store as `party` (e.g. zones/www)."""
    r = curl(lab, "core", *_tls(lab, party), "-w", "\n%{http_code}", "--resolve",
             f"{CORE_NAME}:{CORE_PORT}:{core_address(lab.topology)}",
             f"https://{CORE_NAME}:{CORE_PORT}{path}")
    if r.returncode != 0:
        raise RuntimeError(f"GET {path} as {party}: {r.stderr.strip()}")
    body, _, status = r.stdout.rpartition("\n")
    return int(status), body


def day(when: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(when))


def zone_logs(lab: Lab, zone: str, party: str, on: str | None = None) -> tuple[int, list[dict]]:
    """A zone's stored log records of a UTC day (default today), read as `party`."""
    status, body = core_get(lab, f"/v1/zones/{zone}/logs?day={on or day()}", party)
    return status, [json.loads(line) for line in body.splitlines() if line.startswith("{")]


def backbone_address(topology: Topology, dc: str) -> str:
    return str(topology.dc(dc).link(topology.backbone.name).v4)


def scrape(lab: Lab, dc: str, party: str = "prometheus") -> str:
    """One DC's /metrics as `party` sees it (by default the core's Prometheus)."""
    r = curl(lab, "core", *_tls(lab, party),
             f"https://{backbone_address(lab.topology, dc)}:{METRICS_PORT}/metrics")
    if r.returncode != 0:
        raise RuntimeError(f"scrape of {dc}: {r.stderr.strip()}")
    return r.stdout
