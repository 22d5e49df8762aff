"""privedge-net on the lab (issue 6): from the core's namespace, over mTLS on
the backbone, to every DC's agent API at once.

Katerina's address is denied on all three DCs with one command; her pings to
the anycast address are then dropped whichever DC her route points at, and
pass again after the prefix is removed. With one DC's agent stopped, the
others still take the change and the DC that is down is named."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from lab.cluster import ROOT, Lab
from tests.integration.labs import whole_lab

ANYCAST = "198.51.100.10"
CLIENT = "203.0.113.10/32"
DCS = ("dus", "fra", "iad")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from whole_lab("c")


def net(lab: Lab, *args: str) -> tuple[int, str, str]:
    argv = [lab.python, "-m", "control.netcli", "--network", str(lab.network_file),
            "--pki", str(lab.state_dir / "netpki"), "--operator", "lab-admin",
            "--audit", str(lab.state_dir / "control-audit.jsonl"), *args]
    r = lab.exec("core", argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr


def pings(lab: Lab, via: str) -> int:
    lab.move("client", via)
    r = lab.exec("client", ["ping", "-c", "3", "-i", "0.2", "-W", "1", ANYCAST],
                 capture_output=True, text=True, timeout=30)
    return int(r.stdout.split(" received")[0].rsplit(" ", 1)[-1])


def test_status_reaches_every_dc(lab: Lab) -> None:
    code, out, err = net(lab, "status")
    assert code == 0, err
    assert [line.split(":")[0] for line in out.splitlines()] == list(DCS)
    assert all("inet0 gen" in line and "bb0 gen" in line for line in out.splitlines())


def test_one_deny_reaches_every_dc_and_traffic_changes_on_all(lab: Lab) -> None:
    try:
        assert all(pings(lab, dc) == 3 for dc in DCS)
        code, out, err = net(lab, "--json", "deny", "add", CLIENT, "--expires", "10m")
        assert code == 0, out + err
        assert {dc: r["ok"] for dc, r in json.loads(out).items()} == dict.fromkeys(DCS, True)
        assert [pings(lab, dc) for dc in DCS] == [0, 0, 0]
        code, out, err = net(lab, "deny", "remove", CLIENT)
        assert code == 0, out + err
        assert [pings(lab, dc) for dc in DCS] == [3, 3, 3]
    finally:
        lab.move("client", "dus")
    verify = lab.exec("core", [lab.python, "-m", "control.audit", "verify",
                               str(lab.state_dir / "control-audit.jsonl")],
                      capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert verify.returncode == 0, verify.stderr


def test_a_dc_that_is_down_is_named_and_the_others_take_the_change(lab: Lab) -> None:
    assert lab.stop_agent("iad") is not None   # its programs stay attached, its API is gone
    try:
        code, out, _ = net(lab, "deny", "add", "192.0.2.0/24", "--dry-run")
        assert code == 1
        lines = dict(line.split(None, 1) for line in out.splitlines())
        assert lines["dus"].startswith("ok") and lines["fra"].startswith("ok")
        assert lines["iad"].startswith("FAILED") and "no answer from 198.18.0.3" in lines["iad"]
    finally:
        lab.up(agents=True)              # iad's agent again, adopting its pins
