"""`privedge-agent check` validates without touching anything; usage errors exit 2."""

from __future__ import annotations

import pytest

from agent.daemon import main


def test_check_valid_config(tmp_path, capsys) -> None:
    deny = tmp_path / "drop.txt"
    deny.write_text("192.0.2.0/24\n198.51.100.7\n2001:db8:bad::/48\n")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"interface: edge0\ndeny: {{files: [{deny}]}}\n")
    assert main(["check", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "valid; 3 deny entries" in out and "nothing was changed" in out


def test_check_names_the_bad_line_of_a_deny_file(tmp_path, capsys) -> None:
    deny = tmp_path / "drop.txt"
    deny.write_text("192.0.2.0/24\n192.0.2.300\n")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"interface: edge0\ndeny: {{files: [{deny}]}}\n")
    assert main(["check", "--config", str(cfg)]) == 1
    assert f"{deny}:2: '192.0.2.300' is not an IPv4 or IPv6 prefix" in capsys.readouterr().err


def test_check_names_the_bad_setting(tmp_path, capsys) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text("interface: edge0\nrole: router\n")
    assert main(["check", "--config", str(cfg)]) == 1
    assert "role: 'router': Input should be 'public' or 'backbone'" in capsys.readouterr().err


def test_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


STEERING = """steering:
  dc: dus
  region: eu
  backbone_interface: bb0
  backbone_address: 198.18.0.1
  dcs: [{name: dus, region: eu, backbone: 198.18.0.1}, {name: iad, region: us, backbone: %s}]
"""


def test_run_refuses_links_that_disagree(tmp_path, capsys) -> None:
    """A DC's links must steer alike; the agent refuses before touching anything."""
    inet, bb = tmp_path / "inet0.yaml", tmp_path / "bb0.yaml"
    inet.write_text("interface: inet0\n" + STEERING % "198.18.0.3")
    bb.write_text("interface: bb0\nrole: backbone\n" + STEERING % "198.18.0.4")
    assert main(["run", "--config", str(inet), "--config", str(bb)]) == 1
    assert "must carry the same steering section" in capsys.readouterr().err


def test_run_refuses_an_interface_twice(tmp_path, capsys) -> None:
    cfg = tmp_path / "inet0.yaml"
    cfg.write_text("interface: inet0\n")
    assert main(["run", "--config", str(cfg), "--config", str(cfg)]) == 1
    assert "configured twice" in capsys.readouterr().err
