"""privedge-net on the lab (issue 6): from the core's namespace, over mTLS on
the backbone, to every DC's agent API at once.

Katerina's address is denied on all three DCs with one command; her pings to
the anycast address are then dropped whichever DC her route points at, and
pass again after the prefix is removed. With one DC's agent stopped, the
others still take the change and the DC that is down is named.

Whole generations: one apply denies her and blocks a path of www on every
DC, and applying the lab's own network takes both away; an invalid file,
and a list no DC has room for, change nothing anywhere; with iad down an
apply reaches dus and fra, iad comes back behind (the control plane kept
from it) and `reconcile` brings it level, and an agent that starts pulls
the current generation before it protects anything."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab.cluster import ROOT, Lab
from tests.integration.labs import whole_lab

ANYCAST = "198.51.100.10"
WWW = "www.example.com"
BLOCKED = "/blocked-by-generation"
CLIENT = "203.0.113.10/32"
DCS = ("dus", "fra", "iad")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    yield from whole_lab("c")


def net(lab: Lab, *args: str) -> tuple[int, str, str]:
    argv = [lab.python, "-m", "control.netcli", "--network", str(lab.network_file),
            "--pki", str(lab.state_dir / "netpki"), "--operator", "lab-admin",
            "--audit", str(lab.state_dir / "control-audit.jsonl"),
            "--store", str(lab.control_store), *args]
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
    assert all("inet0 bpf gen" in line and "bb0 bpf gen" in line for line in out.splitlines())


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


# -------------------------------------------------------------- whole generations


def lab_network(lab: Lab) -> dict:
    return yaml.safe_load(lab.network_file.read_text())


def write_network(lab: Lab, name: str, doc: dict) -> Path:
    path = lab.state_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def denying_katerina(lab: Lab) -> dict:
    """The lab's network, Katerina's /32 denied and a path of www blocked."""
    doc = copy.deepcopy(lab_network(lab))
    doc["deny"]["prefixes"].append(CLIENT)
    www = next(z for z in doc["zones"] if z["name"] == "www")
    www["firewall"].append({"expression": f'http.request.uri.path eq "{BLOCKED}"',
                            "action": "block"})
    return doc


def status_of(lab: Lab, path: str, via: str) -> int:
    """The HTTP status of one request to www through `via`."""
    lab.move("client", via)
    r = lab.exec("client", ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
                            "%{http_code}", "--cacert", str(lab.state_dir / "pki" / "ca.crt"),
                            "--resolve", f"{WWW}:443:{ANYCAST}", f"https://{WWW}{path}"],
                 capture_output=True, text=True, timeout=40)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def generations(lab: Lab) -> dict[str, int]:
    _, out, _ = net(lab, "--json", "status")
    return {dc: (r.get("network") or {}).get("generation", -1) if r["ok"] else -1
            for dc, r in json.loads(out).items()}


def applied(out: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in out.splitlines())


def test_one_apply_changes_traffic_on_every_dc_and_another_takes_it_back(lab: Lab) -> None:
    try:
        assert [status_of(lab, BLOCKED, dc) for dc in DCS] == [200, 200, 200]
        code, out, err = net(lab, "apply", str(lab.network_file))   # the lab as it is
        assert code == 0, out + err
        assert "new DC: everything" in err                         # the control plane's first
        code, out, err = net(lab, "apply", str(write_network(lab, "katerina",
                                                             denying_katerina(lab))))
        assert code == 0, out + err
        number = max(generations(lab).values())
        assert generations(lab) == dict.fromkeys(DCS, number)
        assert all(v.startswith("ok") and v.endswith(f"generation {number}")
                   for v in applied(out).values()), out
        assert "deny +1 -0 prefixes; zones changed: www" in err
        assert [pings(lab, dc) for dc in DCS] == [0, 0, 0]
        code, out, err = net(lab, "apply", str(lab.network_file))
        assert code == 0, out + err
        assert generations(lab) == dict.fromkeys(DCS, number + 1)
        assert [pings(lab, dc) for dc in DCS] == [3, 3, 3]
        assert [status_of(lab, BLOCKED, dc) for dc in DCS] == [200, 200, 200]
    finally:
        lab.move("client", "dus")


def test_the_www_block_is_served_by_each_dc_while_the_generation_holds(lab: Lab) -> None:
    doc = denying_katerina(lab)
    doc["deny"]["prefixes"].remove(CLIENT)      # she may connect; the path is blocked
    try:
        code, out, err = net(lab, "apply", str(write_network(lab, "blocking", doc)))
        assert code == 0, out + err
        assert [status_of(lab, BLOCKED, dc) for dc in DCS] == [403, 403, 403]
        assert [status_of(lab, "/elsewhere", dc) for dc in DCS] == [200, 200, 200]
    finally:
        assert net(lab, "apply", str(lab.network_file))[0] == 0
        lab.move("client", "dus")


def test_an_invalid_file_or_a_list_no_dc_can_hold_changes_nothing_anywhere(lab: Lab) -> None:
    before = generations(lab)
    store = sorted(p.name for p in lab.control_store.iterdir())
    current = (lab.control_store / "current").read_text()
    bad = denying_katerina(lab)
    bad["deny"]["prefixes"].append("203.0.113.300/32")
    bad["zones"][0]["firewall"].append({"expression": "http.request.uri.path eq",
                                        "action": "block"})
    code, out, err = net(lab, "apply", str(write_network(lab, "invalid", bad)))
    assert code == 1 and out == ""
    assert "deny.prefixes[3]: '203.0.113.300/32'" in err, err
    assert "zones[0].firewall[" in err and "nothing was sent" in err, err
    bad = denying_katerina(lab)
    bad["zones"][1]["region"] = "mars"                      # checks across the file
    code, out, err = net(lab, "apply", str(write_network(lab, "invalid", bad)))
    assert code == 1 and "zones[1].region: 'mars': not a defined region" in err, err
    assert generations(lab) == before
    assert sorted(p.name for p in lab.control_store.iterdir()) == store
    # Valid as a file, but 140,000 /32s: more than any lab DC's exact table
    # holds (131,072). Every DC refuses it whole, and the network stays where it was.
    big = denying_katerina(lab)
    (lab.state_dir / "too-many.txt").write_text(
        "".join(f"100.{i >> 16}.{(i >> 8) & 255}.{i & 255}/32\n" for i in range(140_000)))
    big["deny"]["files"] = ["too-many.txt"]
    code, out, err = net(lab, "apply", str(write_network(lab, "too-many", big)))
    assert code == 1
    refused = applied(out)
    assert all(refused[dc].startswith("FAILED") and "nothing changed" in refused[dc]
               and "131,072" in refused[dc] for dc in DCS), out
    assert "refused by every DC" in err
    assert generations(lab) == before
    assert (lab.control_store / "current").read_text() == current   # not what DCs should be at
    assert [pings(lab, dc) for dc in DCS] == [3, 3, 3]
    lab.move("client", "dus")


def test_a_dc_down_during_apply_is_brought_level_by_reconcile_or_its_own_pull(
        lab: Lab) -> None:
    current = lab.control_store / "current"
    try:
        had = generations(lab)["iad"]
        assert lab.stop_agent("iad") is not None
        code, out, err = net(lab, "apply", str(write_network(lab, "katerina",
                                                             denying_katerina(lab))))
        assert code == 1
        lines = applied(out)
        assert lines["iad"].startswith("FAILED") and "no answer from 198.18.0.3" in lines["iad"]
        assert lines["dus"].startswith("ok") and lines["fra"].startswith("ok")
        number = int(current.read_text())
        assert [pings(lab, dc) for dc in ("dus", "fra")] == [0, 0]
        # iad starts while the control plane has nothing to give: it starts
        # with the generation it had (never an empty rule set), behind.
        shutil.move(current, current.with_suffix(".hold"))
        lab.up(agents=True)
        gens = generations(lab)
        assert gens["iad"] == had < number and gens["dus"] == gens["fra"] == number
        assert pings(lab, "iad") == 3
        shutil.move(current.with_suffix(".hold"), current)
        code, out, err = net(lab, "status")
        assert f"iad: region us; network generation {had} (behind" in out, out
        code, out, err = net(lab, "reconcile")
        assert code == 0, out + err
        assert "dus: at generation" in err and f"wants {number}" in err
        assert list(applied(out)) == ["iad"]
        assert generations(lab) == dict.fromkeys(DCS, number)
        assert pings(lab, "iad") == 0
        # Down again while the deny is lifted: at start it pulls the network.
        assert lab.stop_agent("iad") is not None
        assert net(lab, "apply", str(lab.network_file))[0] == 1
        lab.up(agents=True)
        assert generations(lab) == dict.fromkeys(DCS, number + 1)
        assert "pulled from the control plane" in (lab.dc_dir("iad") / "agent.log").read_text()
        assert [pings(lab, dc) for dc in DCS] == [3, 3, 3]
    finally:
        if current.with_suffix(".hold").exists():
            shutil.move(current.with_suffix(".hold"), current)
        lab.up(agents=True)
        lab.move("client", "dus")
