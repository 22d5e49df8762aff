"""The multi-DC namespace lab (lab/cluster.py), built for real without agents.

One lab per module, with a prefix unique to the run; every test below works
on it in order (the move tests leave the client where they found her).
Which DC answered a ping is read from the ICMP counters of each DC's own
network namespace (/proc/net/snmp seen from inside), which nothing but the
test's pings moves. Everything is removed in the fixture, however the
tests end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import NetNS, netns

from lab.cluster import Lab, LabError
from lab.topology import load_topology

TOPO = load_topology()
ROOT = Path(__file__).resolve().parents[2]
BPFFS = Path("/sys/fs/bpf")


def _leftovers(prefix: str) -> list[str]:
    spaces = [n for n in netns.listnetns() if n.startswith(prefix)]
    pins = [p.name for p in BPFFS.iterdir() if p.name.startswith(f"privedge-{prefix}")]
    return spaces + pins


@pytest.fixture(scope="module")
def lab():
    lab = Lab(TOPO, prefix=f"t{secrets.token_hex(3)}-")
    try:
        lab.up(agents=False)
        yield lab
    finally:
        lab.down()
        assert _leftovers(lab.prefix) == []


def _run(lab: Lab, host: str, *argv: str) -> subprocess.CompletedProcess:
    return lab.exec(host, list(argv), capture_output=True, text=True, timeout=30)


def _echo_replies(lab: Lab, dc: str, v6: bool = False) -> int:
    """ICMP echo replies sent by a DC's network namespace so far."""
    if v6:
        text = _run(lab, dc, "cat", "/proc/net/snmp6").stdout
        return int(next(line.split()[1] for line in text.splitlines()
                        if line.startswith("Icmp6OutEchoReplies")))
    lines = [line.split() for line in _run(lab, dc, "cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Icmp:")]
    return int(lines[1][lines[0].index("OutEchoReps")])


def _ping_answered_by(lab: Lab, host: str, address: str) -> list[str]:
    """Ping once (bounded: one packet, two seconds) and say which DCs replied."""
    v6 = ":" in address
    before = {dc: _echo_replies(lab, dc, v6) for dc in TOPO.dc_names()}
    ping = _run(lab, host, "ping", *(["-6"] if v6 else []), "-c", "1", "-W", "2", address)
    assert ping.returncode == 0, f"{host} -> {address}: {ping.stdout}{ping.stderr}"
    return [dc for dc in TOPO.dc_names() if _echo_replies(lab, dc, v6) > before[dc]]


def _sysctl(lab: Lab, host: str, key: str) -> str:
    return _run(lab, host, "sysctl", "-n", key).stdout.strip()


def test_status_shows_the_whole_lab(lab) -> None:
    st = lab.status()
    p = lab.prefix
    assert st["up"] and st["prefix"] == p
    spaces = st["namespaces"]
    assert set(spaces) == {p + n for n in ("inet", "bb", "dus", "fra", "iad", "client",
                                           "attacker", "uscustomer", "origin", "core")}
    assert spaces[p + "inet"]["ports"] == sorted(["dus", "fra", "iad", "client", "attacker",
                                                   "uscustomer", "origin"])
    assert spaces[p + "bb"]["ports"] == ["core", "dus", "fra", "iad"]
    dus = spaces[p + "dus"]
    assert dus["addresses"] == {"lo": ["198.51.100.1/24", "2001:db8:100::1/128"],
                                "inet0": ["203.0.113.1/24", "2001:db8:113::1/64"],
                                "bb0": ["198.18.0.1/24"]}
    assert dus["anycast_local"] == {"v4": True, "v6": True}
    assert dus["agent"] == {"pid": None, "alive": False}
    assert spaces[p + "core"]["addresses"] == {"bb0": ["198.18.0.10/24"]}
    assert spaces[p + "client"]["anycast_routes"]["v4"] == {"via": "203.0.113.1", "dc": "dus"}
    assert st["anycast"] == {"client": {"v4": "dus", "v6": "dus"},
                             "attacker": {"v4": "iad", "v6": "iad"},
                             "uscustomer": {"v4": "iad", "v6": "iad"}}


def test_sysctls_mtu_and_gro(lab) -> None:
    for dc in TOPO.dc_names():
        assert _sysctl(lab, dc, "net.ipv4.ip_forward") == "0"
        assert _sysctl(lab, dc, "net.ipv4.conf.bb0.forwarding") == "1"
        assert _sysctl(lab, dc, "net.ipv4.conf.inet0.forwarding") == "0"
        assert _sysctl(lab, dc, "net.ipv6.conf.bb0.disable_ipv6") == "0"
        assert _sysctl(lab, dc, "net.ipv6.conf.inet0.accept_ra") == "0"
    for host in ("dus", "client", "core"):
        for key in ("all", "default", "lo"):
            assert _sysctl(lab, host, f"net.ipv4.conf.{key}.rp_filter") == "0"
    with NetNS(lab.ns("fra")) as ns:
        assert ns.get_links(ns.link_lookup(ifname="bb0")[0])[0].get_attr("IFLA_MTU") == 1600
    for port in ("dus", "fra", "iad", "core"):
        out = _run(lab, "bb", "ethtool", "-k", port).stdout
        assert "generic-receive-offload: on" in out, port


def test_client_reaches_the_anycast_address_at_her_nearest_dc(lab) -> None:
    route = _run(lab, "client", "ip", "route", "get", "198.51.100.10").stdout
    assert "via 203.0.113.1 " in route
    assert _ping_answered_by(lab, "client", "198.51.100.10") == ["dus"]
    assert _ping_answered_by(lab, "client", "2001:db8:100::10") == ["dus"]
    assert _ping_answered_by(lab, "uscustomer", "198.51.100.65") == ["iad"]


def test_move_changes_the_route_and_the_answering_dc(lab) -> None:
    changes = lab.move("client", "fra")
    assert changes == ["route 198.51.100.0/24 via 203.0.113.2 (fra)",
                       "route 2001:db8:100::/48 via 2001:db8:113::2 (fra)"]
    assert lab.move("client", "fra") == []
    assert "via 203.0.113.2 " in _run(lab, "client", "ip", "route", "get",
                                      "198.51.100.10").stdout
    assert lab.status()["anycast"]["client"] == {"v4": "fra", "v6": "fra"}
    assert _ping_answered_by(lab, "client", "198.51.100.10") == ["fra"]
    assert _ping_answered_by(lab, "client", "2001:db8:100::10") == ["fra"]
    # A later `up` keeps her in Frankfurt: the move is part of the lab's state.
    assert lab.up(agents=False)["changes"] == []
    assert lab.status()["anycast"]["client"] == {"v4": "fra", "v6": "fra"}
    lab.move("client", "dus")
    assert lab.status()["anycast"]["client"] == {"v4": "dus", "v6": "dus"}
    assert "--via" not in lab.provision_argv(TOPO.node("client"))


def test_core_reaches_the_dcs_over_the_backbone_at_mtu_1600(lab) -> None:
    for addr in ("198.18.0.1", "198.18.0.3"):
        ping = _run(lab, "core", "ping", "-c", "1", "-W", "2", addr)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    # 1572 bytes of payload + 8 ICMP + 20 IP = 1600, with don't-fragment.
    ping = _run(lab, "core", "ping", "-M", "do", "-s", "1572", "-c", "1", "-W", "2", "198.18.0.2")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # The backbone is not the internet: core has no anycast route.
    assert _run(lab, "core", "ping", "-c", "1", "-W", "1", "198.51.100.10").returncode != 0


def test_up_twice_changes_nothing(lab) -> None:
    assert lab.up(agents=False)["changes"] == []


def test_up_repairs_what_went_missing(lab) -> None:
    netns.remove(lab.ns("origin"))
    with NetNS(lab.ns("attacker")) as ns:
        ns.route("del", dst="198.51.100.0/24")
    changes = lab.up(agents=False)["changes"]
    assert f"{lab.ns('origin')}: namespace created" in changes
    assert f"{lab.ns('attacker')}: route 198.51.100.0/24 via 203.0.113.3 (iad)" in changes
    assert lab.status()["up"]
    assert lab.up(agents=False)["changes"] == []
    assert _run(lab, "origin", "ping", "-c", "1", "-W", "2", "203.0.113.2").returncode == 0


def test_the_vm_provisioning_path_finds_nics_by_mac(lab) -> None:
    """What a Vagrant VM runs: `python -m lab provision HOST --if SEG=mac:MAC`;
    on a provisioned host it changes nothing."""
    with NetNS(lab.ns("dus")) as ns:
        macs = {n: ns.get_links(ns.link_lookup(ifname=n)[0])[0].get_attr("IFLA_ADDRESS")
                for n in ("inet0", "bb0")}
    out = _run(lab, "dus", sys.executable, "-m", "lab", "provision", "dus",
               "--topology", str(lab.topology_file), "--json",
               "--if", f"inet=mac:{macs['inet0']}", "--if", f"bb=mac:{macs['bb0']}")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"host": "dus", "changes": []}


def test_cli_status_and_exec(lab) -> None:
    base = [sys.executable, "-m", "lab", "--prefix", lab.prefix]
    out = subprocess.run([*base, "status", "--json"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["anycast"]["client"] == {"v4": "dus", "v6": "dus"}
    out = subprocess.run([*base, "exec", "client", "--", "ip", "-br", "addr", "show", "inet0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "203.0.113.10/24" in out.stdout
    out = subprocess.run([*base, "exec", "client", "--", "false"], timeout=60, cwd=ROOT)
    assert out.returncode == 1


def test_down_removes_everything(lab) -> None:
    state = lab.state_dir
    assert state.is_dir()
    lab.down()
    assert _leftovers(lab.prefix) == []
    assert not state.exists()
    assert not lab.status()["up"]
    lab.down()          # and again, on nothing: fine


def test_down_after_a_crash_cleans_up() -> None:
    """A lab whose state dir lost its record and topology copy, with a stray
    pin dir: down() still removes every namespace, pin dir and the state."""
    lab = Lab(TOPO, prefix=f"c{secrets.token_hex(3)}-")
    try:
        lab.up(agents=False)
        (lab.state_dir / "lab.json").unlink()
        lab.topology_file.unlink()
        Path(lab.bpffs("fra")).mkdir()
        (lab.dc_dir("iad") / "run").mkdir(parents=True)
        assert len(_leftovers(lab.prefix)) == 11
        # A fresh Lab object, like `python -m lab down` after the crash.
        Lab(TOPO, prefix=lab.prefix).down()
        assert _leftovers(lab.prefix) == []
        assert not lab.state_dir.exists()
    finally:
        for name in _leftovers(lab.prefix):
            if name.startswith("privedge-"):
                shutil.rmtree(BPFFS / name, ignore_errors=True)
            else:
                netns.remove(name)
        shutil.rmtree(lab.state_dir, ignore_errors=True)


class _StandInAgents(Lab):
    """The lab with a stand-in for the agent (until `agent.daemon run` takes
    two --config and --serve): a process that reports ready and waits,
    whose command line names agent.daemon and the DC's serve.yaml as the
    real one does."""

    def agent_argv(self, dc: str) -> list[str]:
        code = "import time; print('privedge-agent: [ready] stand-in', flush=True); time.sleep(300)"
        return [self.python, "-c", code, "agent.daemon", str(self.dc_dir(dc) / "serve.yaml")]


def test_agents_start_once_and_stop_on_down() -> None:
    lab = _StandInAgents(TOPO, prefix=f"a{secrets.token_hex(3)}-")
    try:
        lab.up(agents=True)
        pids = {dc: lab.agent_pid(dc) for dc in TOPO.dc_names()}
        assert all(pids.values()), pids
        for dc, pid in pids.items():
            assert os.readlink(f"/proc/{pid}/ns/net") == \
                f"net:[{os.stat(f'/run/netns/{lab.ns(dc)}').st_ino}]"
            d = lab.dc_dir(dc)
            assert {p.name for p in d.iterdir()} >= {"inet0.yaml", "bb0.yaml", "serve.yaml",
                                                     "agent.log", "agent.pid"}
        assert (lab.state_dir / "pki" / "ca.crt").exists()
        st = lab.status()["namespaces"]
        assert st[lab.ns("dus")]["agent"] == {"pid": pids["dus"], "alive": True}
        assert lab.up(agents=True)["changes"] == []          # running agents are kept
        assert {dc: lab.agent_pid(dc) for dc in TOPO.dc_names()} == pids
        # Lose one record: down still finds that agent in its namespace.
        (lab.dc_dir("fra") / "agent.pid").unlink()
        removed = Lab(TOPO, prefix=lab.prefix).down()["removed"]
        assert f"agent of dus (pid {pids['dus']})" in removed
        assert any(r.startswith(f"unrecorded agent in {lab.ns('fra')} (pid {pids['fra']}")
                   for r in removed)
        for pid in pids.values():
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
        assert _leftovers(lab.prefix) == []
    finally:
        lab.down()


def test_real_agents_filter_and_steer() -> None:
    """The whole lab with its agents: the client is served by her DC, the
    denylisted attacker by nobody, and a US user's packets to the EU-only
    zone are steered over the backbone to an EU DC, which answers directly."""
    lab = Lab(TOPO, prefix=f"r{secrets.token_hex(3)}-")
    try:
        lab.up(agents=True)
        assert all(lab.agent_pid(dc) for dc in TOPO.dc_names())
        assert _ping_answered_by(lab, "client", "198.51.100.10") == ["dus"]
        assert _run(lab, "attacker", "ping", "-c", "1", "-W", "1",
                    "198.51.100.10").returncode != 0
        for address in ("198.51.100.65", "2001:db8:100::65"):
            answered = _ping_answered_by(lab, "uscustomer", address)
            assert len(answered) == 1 and answered[0] in TOPO.dc_names("eu"), answered
        assert lab.up(agents=True)["changes"] == []
    finally:
        lab.down()
    assert _leftovers(lab.prefix) == []


def test_namespaces_of_someone_else_are_left_alone() -> None:
    """The demo also makes el-client and el-dus: a lab with the same prefix
    refuses to build into them, and its down() does not remove them."""
    lab = Lab(TOPO, prefix=f"f{secrets.token_hex(3)}-")
    other = lab.ns("dus")
    netns.create(other)
    try:
        with NetNS(other) as ns:
            ns.link("add", ifname="rx0", kind="veth", peer="tx0")
        with pytest.raises(LabError, match=rf"{other} has rx0, tx0\..*another --prefix"):
            lab.up(agents=False)
        assert _leftovers(lab.prefix) == [other]
        with pytest.raises(LabError, match=rf"left {other} alone: not made by this lab"):
            lab.down()
        assert _leftovers(lab.prefix) == [other]
    finally:
        netns.remove(other)
        shutil.rmtree(lab.state_dir, ignore_errors=True)


def test_down_in_a_users_directory_removes_only_the_labs_files(tmp_path) -> None:
    """With --state-dir pointing at a directory of the user's and the record
    lost, down removes the lab's namespaces and files and nothing else."""
    (tmp_path / "precious.txt").write_text("mine")
    other = Lab(load_topology(), prefix=f"u{os.getpid() % 100000}-", state_dir=tmp_path)
    try:
        other.up(agents=False)
        (tmp_path / "lab.json").unlink()
    finally:
        other.down()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    assert not [n for n in netns.listnetns() if n.startswith(other.prefix)]


def _in_anonymous_netns(script: str) -> subprocess.CompletedProcess:
    """Run a shell script in a throwaway network namespace (unshare, not under
    /run/netns): to provisioning it looks like a machine's own network, and
    if a guard failed, only that namespace would change."""
    return subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_provision_refuses_the_machines_own_network() -> None:
    """Outside a lab namespace, without --vm, provisioning changes nothing."""
    r = _in_anonymous_netns(f"{sys.executable} -m lab provision client --if inet=lo; "
                            "echo rc=$?; ip -o addr show lo")
    assert "rc=1" in r.stdout, r.stdout + r.stderr
    assert "not a lab namespace but the machine's own network" in r.stderr
    assert "203.0.113.10" not in r.stdout


def test_provision_never_takes_the_default_route_nic() -> None:
    """Even with --vm, the NIC a machine reaches the world by is refused."""
    r = _in_anonymous_netns(
        "ip link add up0 type veth peer name up1 && ip link set up0 up && "
        "ip addr add 192.0.2.2/24 dev up0 && ip route add default via 192.0.2.1 && "
        f"{sys.executable} -m lab provision client --vm --if inet=up0; echo rc=$?; "
        "ip -o addr show up0")
    assert "rc=1" in r.stdout, r.stdout + r.stderr
    assert "up0 (segment inet) carries this machine's default route" in r.stderr
    assert "203.0.113.10" not in r.stdout
