"""`privedge` against a live node, in process: main(argv) with real pins.

Every verb is checked for its effect on real packets, and every refusal for
its message and for changing nothing.
"""

from __future__ import annotations

import json

import pytest

from agent.abi import Reason
from control.cli import main
from tests.bpf.cases import v4, v6

R = Reason


@pytest.fixture()
def cli(edge, capsys):
    edge.apply(edge.base_rules())

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--iface", "tr0", "--bpffs", edge.bpffs, "--run-dir", edge.run_root,
                     *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _reason(edge, frame: bytes) -> R:
    before = edge.counters()
    edge.run(frame)
    after = edge.counters()
    (r,) = [R(i) for i in range(len(R)) if after[i][0] != before[i][0]]
    return r


def test_deny_add_list_remove(edge, cli) -> None:
    assert _reason(edge, v4("198.51.100.44")) == R.PASS
    code, out, _ = cli("deny", "add", "198.51.100.44", "2001:db8:44::/64", "--expires", "2h")
    assert code == 0 and "applied in place" in out
    assert _reason(edge, v4("198.51.100.44")) == R.DROP_DENYLIST
    assert _reason(edge, v6("2001:db8:44::1")) == R.DROP_DENYLIST
    code, out, _ = cli("--json", "deny", "list")
    rows = json.loads(out)
    assert {r["prefix"] for r in rows} == {"198.51.100.44/32", "2001:db8:44::/64"}
    assert all(r["source"] == "adhoc" and r["expires"] for r in rows)
    code, out, _ = cli("deny", "remove", "198.51.100.44")
    assert code == 0
    assert _reason(edge, v4("198.51.100.44")) == R.PASS
    assert _reason(edge, v6("2001:db8:44::1")) == R.DROP_DENYLIST


def test_deny_load_swaps_a_generation(edge, cli, tmp_path) -> None:
    f = tmp_path / "feed.txt"
    f.write_text("# feed\n198.51.100.0/26\n203.0.113.9\n2001:db8:feed::/48\n")
    gen = edge.node.active().generation
    code, out, _ = cli("deny", "load", str(f))
    assert code == 0 and f"generation {gen + 1} live" in out
    assert _reason(edge, v4("198.51.100.63")) == R.DROP_DENYLIST
    assert _reason(edge, v4("198.51.100.64")) == R.PASS
    code, out, _ = cli("--json", "deny", "list", "--source", "list")
    assert len(json.loads(out)) == 3


def test_a_file_with_one_bad_line_changes_nothing(edge, cli, tmp_path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("198.51.100.0/26\n")
    assert cli("deny", "load", str(good))[0] == 0
    gen = edge.node.active().generation
    bad = tmp_path / "bad.txt"
    bad.write_text("203.0.113.0/24\n198.51.100.300\n192.0.2.0/24\n")
    code, _, err = cli("deny", "load", str(bad))
    assert code == 1
    assert f"{bad}:2: '198.51.100.300' is not an IPv4 or IPv6 prefix" in err
    assert "nothing applied" in err
    assert edge.node.active().generation == gen
    assert _reason(edge, v4("203.0.113.5")) == R.PASS
    assert _reason(edge, v4("198.51.100.5")) == R.DROP_DENYLIST


def test_refusals_name_the_problem(edge, cli, tmp_path) -> None:
    code, _, err = cli("deny", "add", "10.0.0.1/8")
    assert code == 1 and "host bits are set (did you mean 10.0.0.0/8?)" in err
    code, _, err = cli("deny", "remove", "192.0.2.77")
    assert code == 1 and "not on the denylist: 192.0.2.77/32" in err
    code, _, err = cli("allow", "remove", "192.0.2.0/24")
    assert code == 1 and "not on the allowlist" in err
    code, _, err = cli("limits", "set", "--syn-pps", "-3")
    assert code == 1 and "greater than or equal to 0" in err
    with pytest.raises(SystemExit) as e:
        cli("deny", "add", "192.0.2.1", "--expires", "soon")
    assert e.value.code == 2


def test_over_capacity_changes_nothing(edge, cli, tmp_path) -> None:
    rules = edge.base_rules().replace(capacity=edge.base_rules().capacity.model_copy(
        update={"deny4_lpm": 16}))
    edge.apply(rules)
    gen = edge.node.active().generation
    f = tmp_path / "many.txt"
    f.write_text("".join(f"198.51.{i}.0/25\n" for i in range(20)))
    code, _, err = cli("deny", "load", str(f))
    assert code == 1 and "over its capacity of 16 (capacity.deny4_lpm)" in err
    assert edge.node.active().generation == gen
    assert _reason(edge, v4("198.51.3.1")) == R.PASS


def test_dry_run_changes_nothing(edge, cli, tmp_path) -> None:
    gen = edge.node.active().generation
    f = tmp_path / "feed.txt"
    f.write_text("198.51.100.0/24\n")
    for argv in (("deny", "add", "198.51.100.1", "--dry-run"),
                 ("deny", "load", str(f), "--dry-run"),
                 ("allow", "add", "198.51.100.0/25", "--dry-run"),
                 ("limits", "set", "--syn-pps", "1", "--dry-run")):
        code, out, _ = cli(*argv)
        assert code == 0 and "dry run" in out, argv
    assert edge.node.active().generation == gen
    assert _reason(edge, v4("198.51.100.1")) == R.PASS


def test_allow_and_limits(edge, cli) -> None:
    assert cli("deny", "add", "198.51.100.0/24")[0] == 0
    assert cli("allow", "add", "198.51.100.128/25")[0] == 0
    assert _reason(edge, v4("198.51.100.200")) == R.PASS_ALLOW
    assert _reason(edge, v4("198.51.100.2")) == R.DROP_DENYLIST
    gen = edge.node.active().generation
    code, out, _ = cli("limits", "set", "--syn-pps", "7", "--syn-burst", "9")
    assert code == 0 and edge.node.active().generation == gen + 1
    code, out, _ = cli("--json", "limits")
    assert json.loads(out)["syn"] == {"pps": 7, "burst": 9}
    assert _reason(edge, v4("198.51.100.200")) == R.PASS_ALLOW  # rules survived the swap


def test_status_shows_generation_and_counters(edge, cli) -> None:
    edge.run(v4("198.51.100.9"))
    code, out, _ = cli("--json", "status", "--interval", "0.2")
    s = json.loads(out)
    assert s["generation"] == edge.node.active().generation
    ok = next(c for c in s["counters"] if c["reason"] == "ok")
    assert ok["verdict"] == "PASS" and ok["packets"] >= 1 and ok["pps"] is not None
    code, out, _ = cli("status", "--interval", "0")
    assert code == 0 and "generation" in out and "PASS" in out
