"""Regional Services in the whole lab: real agents, real TLS, real veths.

The lab (lab/topology.yaml) comes up under a prefix of this run's own with
an agent per DC. A user in the US reaches the EU-only zone through Ashburn;
the TLS connection must be completed in the EU (dus or fra), proven by the
DCs' XDP counters and by the front ends' own counters, never by iad. A
capture on the backbone bridge during the exchange holds the tunnelled
packets but not the marker the client sent inside TLS.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP
from scapy.utils import rdpcap

from agent.l7.proxy import TRACE_PATH
from lab.cluster import Lab
from tests.integration.labs import front, whole_lab

EU4, EU6, WWW4 = "198.51.100.65", "2001:db8:100::65", "198.51.100.10"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from whole_lab("r")


def _ns(lab: Lab, name: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{lab.ns(name)}"]


def xdp(lab: Lab, dc: str, link: str) -> dict:
    """`privedge status --json` of one DC link: packets by reason, tunnels by DC."""
    paths = lab.dc_dir(dc)
    out = subprocess.run(
        [*_ns(lab, dc), lab.python, "-m", "control.cli", "--iface", link,
         "--bpffs", lab.bpffs(dc), "--run-dir", str(paths / "run"), "--json", "status",
         "--interval", "0"],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    s = json.loads(out.stdout)
    s["by_reason"] = {c["reason"]: c["packets"] for c in s["counters"]}
    return s


def served(status: dict, zone: str) -> int:
    return status["requests"].get(zone, 0)


def https(lab: Lab, host: str, name: str, address: str, marker: str = "",
          timeout: float = 8) -> subprocess.CompletedProcess:
    """One HTTPS request with curl from a lab host; the marker rides inside TLS."""
    url = f"https://{name}{TRACE_PATH}?{marker}"  # answered by the edge: DC, region, zone
    return subprocess.run(
        [*_ns(lab, host), "curl", "-sS", "--max-time", str(timeout),
         "--cacert", str(lab.state_dir / "pki" / "ca.crt"),
         "--resolve", f"{name}:443:{address}", "-H", f"X-Marker: {marker}", url],
        capture_output=True, text=True, timeout=timeout + 10)


class Capture:
    """tcpdump on every port of the backbone switch, started and stopped by PID."""

    def __init__(self, lab: Lab, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [*_ns(lab, "bb"), "tcpdump", "-Z", "root", "--immediate-mode", "-i", "any", "-U", "-w",
             str(path)],
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not path.exists() or path.stat().st_size == 0:
            assert time.monotonic() < deadline and self.proc.poll() is None, "tcpdump did not start"
            time.sleep(0.05)

    def stop(self) -> bytes:
        time.sleep(0.5)  # the last packets reach the bridge
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return self.path.read_bytes()


def tunnel_packets(pcap: Path, proto: int) -> int:
    """Frames of the capture that are IPv4 with protocol `proto` (4 IPIP, 41 6in4)."""
    return sum(1 for p in rdpcap(str(pcap)) if IP in p and p[IP].proto == proto)


@pytest.mark.parametrize("address,proto", [(EU4, 4), (EU6, 41)], ids=["v4", "v6"])
def test_us_user_is_served_in_the_eu(lab: Lab, tmp_path: Path, address: str, proto: int):
    marker = f"privedge-marker-{secrets.token_hex(8)}"
    before = {dc: front(lab, dc) for dc in ("dus", "fra", "iad")}
    steered_before = xdp(lab, "iad", "inet0")["by_reason"]["steer"]
    decap_before = {dc: xdp(lab, dc, "bb0")["by_reason"]["decap"] for dc in ("dus", "fra")}
    cap = Capture(lab, tmp_path / "bb.pcap")
    try:
        r = https(lab, "uscustomer", "shop.example.eu", address, marker)
    finally:
        pcap = cap.stop()
    assert r.returncode == 0, f"curl failed: {r.stderr}"
    answer = json.loads(r.stdout)
    assert answer["zone"] == "shop-eu" and answer["region"] == "eu"
    dc = answer["dc"]
    assert dc in ("dus", "fra"), f"served by {dc}, outside the zone's region"

    after = {d: front(lab, d) for d in ("dus", "fra", "iad")}
    assert served(after[dc], "shop-eu") == served(before[dc], "shop-eu") + 1
    assert after["iad"]["connections_accepted"] == before["iad"]["connections_accepted"], \
        "iad's front end accepted a connection for the EU zone"
    assert xdp(lab, "iad", "inet0")["by_reason"]["steer"] > steered_before
    assert xdp(lab, dc, "bb0")["by_reason"]["decap"] > decap_before[dc]

    # The backbone carried the exchange, tunnelled, and none of it readable.
    assert tunnel_packets(tmp_path / "bb.pcap", proto) >= 3
    assert marker.encode() not in pcap, "the request's marker crossed the backbone in clear"
    assert b"shop-eu" not in pcap  # the response body is encrypted too


def test_denylisted_source_never_crosses_the_backbone(lab: Lab, tmp_path: Path):
    denied_before = xdp(lab, "iad", "inet0")["by_reason"]["denylist"]
    decap_before = {dc: xdp(lab, dc, "bb0")["by_reason"]["decap"] for dc in ("dus", "fra")}
    cap = Capture(lab, tmp_path / "attack.pcap")
    try:
        r = https(lab, "attacker", "shop.example.eu", EU4, timeout=2)
    finally:
        cap.stop()
    assert r.returncode != 0
    assert xdp(lab, "iad", "inet0")["by_reason"]["denylist"] > denied_before
    assert {dc: xdp(lab, dc, "bb0")["by_reason"]["decap"] for dc in ("dus", "fra")} \
        == decap_before
    assert tunnel_packets(tmp_path / "attack.pcap", 4) == 0


def test_moving_changes_the_ingress_not_the_region(lab: Lab):
    try:
        assert json.loads(https(lab, "client", "shop.example.eu", EU4).stdout)["dc"] == "dus"
        assert json.loads(https(lab, "client", "www.example.com", WWW4).stdout)["dc"] == "dus"
        in_region = xdp(lab, "fra", "inet0")["by_reason"]["in_region"]
        lab.move("client", "fra")
        assert json.loads(https(lab, "client", "shop.example.eu", EU4).stdout)["dc"] == "fra"
        assert json.loads(https(lab, "client", "www.example.com", WWW4).stdout)["dc"] == "fra"
        assert xdp(lab, "fra", "inet0")["by_reason"]["in_region"] > in_region
    finally:
        lab.move("client", "dus")


def test_guard_refuses_when_steering_is_bypassed(lab: Lab):
    """With iad's XDP program detached, the EU zone's packets reach iad's
    stack; its front end refuses them before any TLS byte, and counts it."""
    before = front(lab, "iad")["refused"]["region_address"]
    subprocess.run([*_ns(lab, "iad"), "ip", "link", "set", "dev", "inet0", "xdp", "off"],
                   check=True, timeout=10)
    try:
        r = https(lab, "uscustomer", "shop.example.eu", EU4, timeout=3)
        assert r.returncode != 0, "iad served the EU zone"
        assert front(lab, "iad")["refused"]["region_address"] > before
        # The shared zone is still served by iad.
        assert json.loads(https(lab, "uscustomer", "www.example.com", WWW4).stdout)["dc"] \
            == "iad"
    finally:
        lab.restart_agent("iad")  # the agent adopts its pins and attaches again
    assert "native" in xdp(lab, "iad", "inet0")["attached"]


def test_reload_keeps_steering_and_serving(lab: Lab):
    """SIGHUP re-applies both links (backbone prepared again) and restarts
    the front end on its fixed port; the EU zone is still reached via iad."""
    log = lab.dc_dir("iad") / "agent.log"
    seen = log.read_text().count("[reload]")
    os.kill(lab.agent_pid("iad"), signal.SIGHUP)
    deadline = time.monotonic() + 60
    while log.read_text().count("[reload]") < seen + 2:  # both links
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    time.sleep(1.5)  # the front end's restart follows the links
    text = log.read_text()
    assert "refused" not in text.split("[ready]")[-1], text[-2000:]
    r = https(lab, "uscustomer", "shop.example.eu", EU4)
    assert r.returncode == 0 and json.loads(r.stdout)["dc"] in ("dus", "fra"), r.stderr
    r = https(lab, "uscustomer", "www.example.com", WWW4)
    assert r.returncode == 0 and json.loads(r.stdout)["dc"] == "iad", r.stderr


def test_plain_http_redirects_to_https_in_the_region(lab: Lab):
    """Port 80 of the EU zone from the US: steered like 443, answered in the
    EU with a redirect to HTTPS; iad's front end sees nothing of it."""
    before = front(lab, "iad")["connections_accepted"]
    r = subprocess.run([*_ns(lab, "uscustomer"), "curl", "-sS", "-o", "/dev/null", "-w",
                        "%{http_code} %{redirect_url}", "--max-time", "8",
                        "--resolve", f"shop.example.eu:80:{EU4}", "http://shop.example.eu/x"],
                       capture_output=True, text=True, timeout=20)
    assert r.stdout == "301 https://shop.example.eu/x", r.stdout + r.stderr
    assert front(lab, "iad")["connections_accepted"] == before
