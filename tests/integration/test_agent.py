"""The agent process on a veth: reload on SIGHUP, expiry, status."""

from __future__ import annotations

import signal
import time

import yaml

from lab import attack_mix


def _wait(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def test_sighup_reloads_the_config_as_a_new_generation(lab) -> None:
    path = lab.config(deny={"prefixes": ["192.0.2.0/24"]})
    lab.start_agent()
    gen = lab.cli("status", "--interval", "0")["generation"]
    cfg = yaml.safe_load(path.read_text())
    cfg["deny"]["prefixes"].append("198.51.100.0/24")
    path.write_text(yaml.safe_dump(cfg))
    lab.agent.send_signal(signal.SIGHUP)
    assert _wait(lambda: lab.cli("status", "--interval", "0")["generation"] == gen + 1), \
        lab.log.read_text()
    listed = {r["prefix"] for r in lab.cli("deny", "list", "--source", "config")}
    assert listed == {"192.0.2.0/24", "198.51.100.0/24"}
    # A broken config on reload changes nothing and says why.
    path.write_text(path.read_text() + "limits: {syn: {pps: -1, burst: 1}}\n")
    lab.agent.send_signal(signal.SIGHUP)
    assert _wait(lambda: "refused, nothing changed" in lab.log.read_text())
    assert lab.cli("status", "--interval", "0")["generation"] == gen + 1


def test_expired_entries_are_swept_by_the_agent(lab) -> None:
    lab.config()
    lab.start_agent()
    lab.cli("deny", "add", "198.51.100.77", "--expires", "2s")
    assert {r["prefix"] for r in lab.cli("deny", "list")} == {"198.51.100.77/32"}
    assert _wait(lambda: lab.cli("deny", "list") == [], timeout=15), lab.log.read_text()
    assert "expired and removed" in lab.log.read_text()


def test_status_reports_the_native_attachment_and_counts(lab) -> None:
    lab.config(**attack_mix.NODE_RULES)
    lab.start_agent()
    s = lab.cli("status", "--interval", "0", inside=True)
    assert s["interface"] == "rx0" and s["generation"] >= 1
    assert s["deny"]["config"] == 3 and s["role"] == "public"
    assert s["edge_program"]["tag"]
    assert s["attached"].startswith("native, root program id")
    # From another namespace the interface is out of sight, and it says so.
    assert lab.cli("status", "--interval", "0")["attached"].startswith("unknown here")
