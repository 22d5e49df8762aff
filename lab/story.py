"""The Regional Services story, told on the multi-DC lab (`python -m lab.demo`).

    1  the lab comes up: three DCs with an agent each, five hosts
    2  Katerina in Cologne (anycast via dus) opens the EU-only shop and a
       global site: dus answers both
    3  she drives to Frankfurt (a route change): fra answers, IPv4 and IPv6
    4  a user in the US (anycast via iad) opens the EU shop: iad's XDP
       tunnels the packets over the backbone to dus or fra, which answer;
       iad never terminates TLS, and a capture of the backbone holds the
       tunnelled packets but not a marker the user sent inside TLS
    5  the denylisted attacker floods the EU shop's address through iad:
       every frame is dropped there, none crosses the backbone
    6  Katerina browses www through dus: cache, WAF, challenge, login check
    7  what the core learns: its Prometheus scrapes every DC over mTLS (the
       drops at iad, the requests at dus, by closed labels only); www's own
       certificate reads Katerina's log records, stored encrypted
    8  the operator runs the network from one file: one `privedge-net apply`
       from the core blocks a path of www on all three DCs (each reports the
       generation it reached and how long it took), a file with a mistake
       changes nothing anywhere, and applying the lab's own file takes the
       block away

Each step prints what it does, then its evidence (counter deltas read
from the DCs' XDP programs and TLS front ends, a capture on the backbone),
then PASS or FAIL. Everything runs in namespaces named <prefix><name>.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

from pyroute2 import NetNS

from agent.l7.proxy import TRACE_PATH
from lab import netns
from lab.cluster import ROOT, Lab, LabError
from lab.topology import Topology, TopologyError, load_topology

EU4, EU6 = "198.51.100.65", "2001:db8:100::65"
WWW4 = "198.51.100.10"
SHOP, WWW = "shop.example.eu", "www.example.com"
BURST_EACH = 500            # frames per kind in the attacker's burst (4 kinds)
BURST_PPS = 20000
CURL_TIMEOUT = 8.0
IN = 4                      # 4 spaces: every line of a step is indented this far
COL = 30                    # the evidence column


class StepFailed(Exception):
    """A step could not do what it set out to; the message says what happened."""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def say(text: str = "") -> None:
    print(" " * IN + text if text else "", flush=True)


def row(label: str, value: str) -> None:
    say(f"{label:<{COL}}{value}")


def signed(n: int) -> str:
    return f"+{n:,}" if n >= 0 else f"{n:,}"


# -- evidence: counters, requests, a capture ----------------------------------


class Counters(dict):
    """One reading of every DC: XDP packets by reason per link, tunnelled
    packets per destination DC, and the TLS front end's counters, flattened
    to (dc, what, name) -> number so two readings subtract."""

    def __sub__(self, other: Counters) -> Counters:
        return Counters({k: v - other.get(k, 0) for k, v in self.items()})


def read_counters(lab: Lab) -> Counters:
    """What `privedge --json status` reports per link (the same pinned
    per-CPU counters, read in this process: six CLI runs would take seconds)
    and what each front end's status socket says."""
    from agent import abi
    from agent.l7.status import read_status
    from agent.libbpf import BpfError
    from agent.node import Node, NodeError
    from control.ops import OpError, current_rules

    out = Counters()
    for dc in lab.topology.dc_names():
        for link in (lab.topology.public.ifname, lab.topology.backbone.ifname):
            try:
                node = Node(link, lab.bpffs(dc), str(lab.dc_dir(dc) / "run")).open()
                try:
                    counters = node.counters()
                    for r in abi.Reason:
                        out[dc, link, r.label] = counters[r].packets
                    steering = current_rules(node).steering
                    if steering:
                        tunnelled = node.counters("steered")
                        for i, d in enumerate(steering.dcs):
                            out[dc, f"{link} tunnel", d.name] = tunnelled[i].packets
                finally:
                    node.close()
            except (NodeError, OpError, BpfError) as e:
                raise StepFailed(f"counters of {dc} {link}: {e}") from None
        try:
            st = read_status(str(lab.dc_dir(dc) / "l7.sock"))
        except (OSError, ValueError) as e:
            raise StepFailed(f"front end of {dc} does not answer on its status socket: "
                             f"{e}") from None
        out[dc, "front", "accepted"] = st["connections_accepted"]
        for zone, n in st["requests"].items():
            out[dc, "requests", zone] = n
    return out


def curl_to(lab: Lab, name: str, address: str) -> list[str]:
    """curl, bounded, trusting the lab CA, with `name` resolved to `address`."""
    res = f"[{address}]" if ":" in address else address
    return ["curl", "-sS", "--max-time", str(CURL_TIMEOUT),
            "--cacert", str(lab.state_dir / "pki" / "ca.crt"), "--resolve", f"{name}:443:{res}"]


def https(lab: Lab, host: str, name: str, address: str, marker: str = "") -> tuple[int, dict]:
    """One HTTPS request with curl from a lab host: (status code, JSON answer).
    The marker rides inside TLS, in the query and in a request header. The
    trace path is answered by the edge itself: which DC, region and zone."""
    argv = [*curl_to(lab, name, address), "-w", "\n%{http_code}",
            f"https://{name}{TRACE_PATH}?{marker}"]
    if marker:
        argv += ["-H", f"X-Marker: {marker}"]
    r = lab.exec(host, argv, capture_output=True, text=True, timeout=CURL_TIMEOUT + 10)
    if r.returncode != 0:
        raise StepFailed(f"{host}: https://{name}/ via {address} failed: "
                         f"{r.stderr.strip() or f'curl exited with {r.returncode}'}")
    body, _, code = r.stdout.rpartition("\n")
    try:
        answer = json.loads(body)
    except ValueError:
        raise StepFailed(f"{host}: https://{name}/ via {address} answered "
                         f"{code}, not JSON: {body[:80]!r}") from None
    return int(code), answer


def show_request(name: str, address: str, code: int, answer: dict, path: str = "") -> None:
    say(f"{'GET https://' + name + '/' + path:<38}{address:<18}{code}  "
        f"{answer.get('dc', '?')} ({answer.get('region', '?')}), zone {answer.get('zone', '?')}")


class Capture:
    """tcpdump on every port of a switch namespace, started and stopped by PID."""

    running: ClassVar[list[Capture]] = []     # stopped by tell() however it ends

    def __init__(self, lab: Lab, segment: str, path: Path) -> None:
        self.path = path
        self.errors = path.with_suffix(".err")
        with open(self.errors, "w") as err:
            self.proc = subprocess.Popen(
                netns.nsenter(lab.ns(segment), ["tcpdump", "-Z", "root", "--immediate-mode",
                                                "-i", "any", "-U", "-w", str(path)]),
                stdout=subprocess.DEVNULL, stderr=err)
        Capture.running.append(self)
        deadline = time.monotonic() + 10
        while not path.exists() or path.stat().st_size == 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StepFailed(f"tcpdump in {lab.ns(segment)} did not start: "
                                 f"{self.errors.read_text().strip()}")
            time.sleep(0.05)

    def stop(self, linger: float = 0.5) -> bytes:
        if self.proc.poll() is None:
            try:
                time.sleep(linger)  # the last packets reach the bridge
            finally:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        return self.path.read_bytes() if self.path.exists() else b""

    def frames(self) -> list:
        """The frames as they entered the switch: `-i any` sees each one on two
        ports, arriving and leaving; the leaving copy is left out."""
        from scapy.utils import rdpcap

        return [p for p in rdpcap(str(self.path))
                if getattr(p.firstlayer(), "pkttype", 0) != 4]   # 4: outgoing


def ip_layers(frame) -> Iterator:
    """Every IP header of a frame, outer and tunnelled."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    for layer in frame.iterpayloads():
        if isinstance(layer, (IP, IPv6)):
            yield layer


def tunnel_kind(frame) -> str | None:
    from scapy.layers.inet import IP

    if IP in frame:
        return {4: "IPIP", 41: "6in4"}.get(frame[IP].proto)
    return None


def link_mac(lab: Lab, host: str, ifname: str) -> str:
    r = lab.exec(host, ["ip", "-j", "link", "show", ifname], capture_output=True, text=True,
                 timeout=10)
    if r.returncode != 0:
        raise StepFailed(f"no {ifname} in {lab.ns(host)}: {r.stderr.strip()}")
    return json.loads(r.stdout)[0]["address"]


# -- the story ----------------------------------------------------------------


class Story:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab = lab
        self.topo: Topology = lab.topology
        self.tmp = tmp
        self.failures: list[str] = []
        self.results: list[tuple[int, str, bool]] = []
        self.lab_up = False

    def expect(self, ok: bool, failure: str) -> bool:
        if not ok:
            self.failures.append(failure)
        return ok

    def step(self, n: int, headline: str, short: str, fn: Callable[[], str]) -> bool:
        print(f"\n[{n}] {headline}", flush=True)
        self.failures = []
        verdict = ""
        if n > 1 and not self.lab_up:
            self.failures.append("skipped: the lab is not up")
        else:
            try:
                verdict = fn()
            except (StepFailed, LabError, TopologyError) as e:
                self.failures.append(str(e))
            except (subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
                self.failures.append(f"{type(e).__name__}: {e}")
        ok = not self.failures
        say()
        if ok:
            say(f"PASS  {verdict}")
        for f in self.failures:
            lines = f.splitlines() or [""]
            say(f"FAIL  {lines[0]}")
            for line in lines[1:]:
                say(f"      {line}")
        self.results.append((n, short, ok))
        return ok

    def run(self) -> bool:
        t = self.topo
        self.step(1, f"Bring the lab up: {len(t.dcs)} DCs with an agent each, "
                     f"{len(t.hosts)} hosts, 2 switches",
                  f"lab up: {len(t.dcs)} DCs with agents, {len(t.hosts)} hosts", self.bring_up)
        self.step(2, "Katerina in Cologne (client, anycast via dus) opens the EU shop and a "
                     "global site", "Cologne: dus serves both zones", self.cologne)
        self.step(3, "She drives to Frankfurt: her anycast route now points at fra",
                  "Frankfurt: fra serves the EU zone, v4 and v6", self.frankfurt)
        self.step(4, "A user in the US (uscustomer, anycast via iad) opens the EU-only shop",
                  "US user: served in the EU, no plaintext on bb", self.us_user)
        self.step(5, "The attacker (denylisted, anycast via iad) floods the EU shop's address",
                  "attacker: dropped at iad, nothing tunnelled", self.attacker)
        self.step(6, "Katerina browses www through dus: cache, WAF, challenge, leaked password",
                  "L7: cache, WAF, challenge, login check", self.pipeline)
        self.step(7, "What the core learns: metrics from every DC, www's logs for www only",
                  "core: Prometheus, encrypted customer logs", self.core)
        self.step(8, "The operator changes the network from one file: one apply, three DCs",
                  "control plane: one apply, every DC, or none", self.control_plane)
        return all(ok for _, _, ok in self.results)

    # -- 1

    def bring_up(self) -> str:
        t, lab = self.topo, self.lab
        say(f"Lab(load_topology(), prefix={lab.prefix!r}).up(agents=True)")
        t0 = time.monotonic()
        changes = lab.up(agents=True)["changes"]
        say(f"up in {time.monotonic() - t0:.1f} s ({len(changes):,} changes); "
            f"namespaces {lab.prefix}*, state in {lab.state_dir}")
        self.lab_up = True
        say()
        inet, bb = t.public.name, t.backbone.name
        say(f"{'DC':<6}{'region':<8}{'city':<13}{'inet (XDP: filter, steer)':<35}"
            f"{'bb (XDP: decap)'}")
        for d in t.dcs:
            pub, back = d.link(inet), d.link(bb)
            say(f"{d.name:<6}{d.region:<8}{d.city or '':<13}{_addrs(pub):<35}{_addrs(back)}")
        say()
        deny = [ipaddress.ip_network(n) for n in t.deny]
        say(f"{'host':<12}{'address':<32}anycast via")
        for h in t.hosts:
            link = h.link(inet) or h.link(bb)
            ips = [a for a in (link.v4, link.v6) if a is not None]
            denied = any(ip in n for ip in ips for n in deny if ip.version == n.version)
            via = h.anycast_via or "-"
            say(f"{h.name:<12}{_addrs(link):<32}{via}{'   (denylisted)' if denied else ''}")
        say()
        say(f"{'zone':<9}{'hostname':<17}{'addresses':<33}region")
        for z in t.zones:
            addrs = "  ".join(str(a) for a in z.addresses)
            region = f"{z.region} only (Regional Services)" if z.region else "global"
            say(f"{z.name:<9}{z.hostnames[0]:<17}{addrs:<33}{region}")

        st = lab.status()
        self.expect(st["up"], "not every namespace is there")
        dead = [dc for dc in t.dc_names() if not st["namespaces"][lab.ns(dc)]["agent"]["alive"]]
        self.expect(not dead, f"no agent running in {', '.join(dead)}")
        for h in t.anycast_hosts():
            got = st["anycast"].get(h.name, {})
            self.expect(set(got.values()) == {h.anycast_via},
                        f"{h.name} routes anycast via {got or 'nothing'}, not {h.anycast_via}")
        return (f"{len(lab.namespaces)} namespaces, agents ready in {', '.join(t.dc_names())}, "
                "anycast routes as in the topology")

    # -- 2

    def cologne(self) -> str:
        lab = self.lab
        if lab.move("client", "dus"):      # a kept lab may have her in Frankfurt
            say("client moved back to dus")
        before = read_counters(lab)
        answers = []
        for name, addr in ((SHOP, EU4), (WWW, WWW4)):
            code, answer = https(lab, "client", name, addr)
            show_request(name, addr, code, answer)
            answers.append(answer)
        d = read_counters(lab) - before
        say()
        row("dus inet0 in_region", f"{signed(d['dus', 'inet0', 'in_region'])} packets "
                                   "(EU zone, in its region: not steered)")
        row("dus front end requests", f"shop-eu {signed(d['dus', 'requests', 'shop-eu'])}, "
                                      f"www {signed(d['dus', 'requests', 'www'])}")
        for a in answers:
            self.expect(a.get("dc") == "dus", f"{a.get('zone')} answered by {a.get('dc')}, "
                                              "not dus")
        self.expect(d["dus", "inet0", "in_region"] > 0, "dus counted nothing as in_region")
        self.expect(d["dus", "requests", "shop-eu"] == 1 and d["dus", "requests", "www"] == 1,
                    "dus's front end did not count one request per zone")
        return "both zones answered by dus, the EU zone terminated in its region"

    # -- 3

    def frankfurt(self) -> str:
        lab = self.lab
        for c in lab.move("client", "fra"):
            say(f"lab.move('client', 'fra'): {c}")
        before = read_counters(lab)
        dcs = []
        for addr in (EU4, EU6):
            code, answer = https(lab, "client", SHOP, addr)
            show_request(SHOP, addr, code, answer)
            dcs.append(answer.get("dc"))
        d = read_counters(lab) - before
        say()
        row("fra inet0 in_region", f"{signed(d['fra', 'inet0', 'in_region'])} packets")
        row("front ends, shop-eu requests", ", ".join(
            f"{dc} {signed(d[dc, 'requests', 'shop-eu'])}" for dc in self.topo.dc_names()))
        self.expect(dcs == ["fra", "fra"], f"answered by {', '.join(map(str, dcs))}, not fra")
        self.expect(d["fra", "inet0", "in_region"] > 0, "fra counted nothing as in_region")
        self.expect(d["fra", "requests", "shop-eu"] == 2,
                    f"fra's front end counted {d['fra', 'requests', 'shop-eu']} shop-eu "
                    "requests, not 2")
        return "fra answers now, over IPv4 and IPv6: the region stays eu, the ingress moved"

    # -- 4

    def us_user(self) -> str:
        lab, eu = self.lab, self.topo.dc_names("eu")
        marker = f"privedge-marker-{secrets.token_hex(8)}"
        row("marker inside TLS", marker)
        row("", "(the request's path and its X-Marker header)")
        say(f"capturing every port of the backbone switch ({lab.ns('bb')}) with tcpdump")
        before = read_counters(lab)
        cap = Capture(lab, "bb", self.tmp / "us-user.pcap")
        served = []
        try:
            for addr in (EU4, EU6):
                code, answer = https(lab, "uscustomer", SHOP, addr, marker)
                show_request(SHOP, addr, code, answer, "<marker>")
                served.append(answer.get("dc"))
        finally:
            pcap = cap.stop()
        d = read_counters(lab) - before
        frames = cap.frames()
        kinds = [tunnel_kind(f) for f in frames]
        ipip, sixin4 = kinds.count("IPIP"), kinds.count("6in4")
        found = marker.encode() in pcap
        tunnels = {dc: d["iad", "inet0 tunnel", dc] for dc in eu}
        tunnelled = ", ".join(f"{dc} {n:,}" for dc, n in tunnels.items())
        say()
        row("iad inet0 steer", f"{signed(d['iad', 'inet0', 'steer'])} packets, "
                               f"tunnelled to {tunnelled}")
        for dc in eu:
            row(f"{dc} bb0 decap", f"{signed(d[dc, 'bb0', 'decap'])} packets")
        row("front ends, shop-eu requests", ", ".join(
            f"{dc} {signed(d[dc, 'requests', 'shop-eu'])}" for dc in self.topo.dc_names()))
        row("iad front end connections", f"{signed(d['iad', 'front', 'accepted'])} accepted")
        row("backbone capture", f"{len(frames):,} frames: IPIP {ipip:,}, 6in4 {sixin4:,} "
                                f"(iad tunnelled {sum(tunnels.values()):,})")
        say(f"marker found in capture: {'YES' if found else 'no'}")

        for addr, dc in zip((EU4, EU6), served, strict=True):
            self.expect(dc in eu, f"{SHOP} via {addr} served by {dc}, outside the zone's region")
        self.expect(d["iad", "inet0", "steer"] > 0, "iad steered nothing")
        for dc in set(served) & set(eu):
            self.expect(d[dc, "bb0", "decap"] > 0, f"{dc} decapsulated nothing on bb0")
        self.expect(d["iad", "front", "accepted"] == 0 and d["iad", "requests", "shop-eu"] == 0,
                    "iad's front end accepted a connection for the EU zone")
        self.expect(ipip >= 3 and sixin4 >= 3,
                    f"the capture holds {ipip} IPIP and {sixin4} 6in4 frames, want 3+ each")
        self.expect(not found, "the marker crossed the backbone in clear")
        return (f"served by {' and '.join(dict.fromkeys(served))} (eu), never by iad; "
                "the backbone saw only tunnelled TLS")

    # -- 5

    def attacker(self) -> str:
        from scapy.layers.inet import IP, TCP, UDP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.l2 import Ether
        from scapy.utils import wrpcap

        lab, eu = self.lab, self.topo.dc_names("eu")
        link = self.topo.node("attacker").link(self.topo.public.name)
        src4, src6 = str(link.v4), str(link.v6)
        dst_mac, src_mac = link_mac(lab, "iad", "inet0"), link_mac(lab, "attacker", "inet0")
        kinds = {
            "IPv4 TCP SYN": lambda i: IP(src=src4, dst=EU4) / TCP(sport=1024 + i, dport=443,
                                                                   flags="S", seq=i),
            "IPv4 UDP": lambda i: IP(src=src4, dst=EU4) / UDP(sport=1024 + i, dport=443)
            / (b"\0" * 64),
            "IPv6 TCP SYN": lambda i: IPv6(src=src6, dst=EU6) / TCP(sport=1024 + i, dport=443,
                                                                     flags="S", seq=i),
            "IPv6 UDP": lambda i: IPv6(src=src6, dst=EU6) / UDP(sport=1024 + i, dport=443)
            / (b"\0" * 64),
        }
        frames = [Ether(dst=dst_mac, src=src_mac) / make(i)
                  for i in range(BURST_EACH) for make in kinds.values()]
        pcap = self.tmp / "burst.pcap"
        wrpcap(str(pcap), frames, linktype=1)
        burst = len(frames)
        row("burst", f"{burst:,} frames from {src4} and {src6}")
        row("", f"{BURST_EACH:,} each: " + ", ".join(kinds))
        row("", f"to {EU4} and {EU6}, port 443")
        say(f"lab/send.py on {lab.ns('attacker')} inet0, Ethernet to iad inet0 ({dst_mac})")

        before = read_counters(lab)
        cap = Capture(lab, "bb", self.tmp / "attack.pcap")
        try:
            t0 = time.monotonic()
            r = lab.exec("attacker", [lab.python, "-m", "lab.send", "--iface", "inet0",
                                      "--pcap", str(pcap), "--pps", str(BURST_PPS),
                                      "--timeout", "20"],
                         capture_output=True, text=True, timeout=50, cwd=ROOT, env=_env())
            seconds = time.monotonic() - t0
        finally:
            cap.stop()
        if r.returncode != 0:
            raise StepFailed(f"lab/send.py failed: {r.stderr.strip()}")
        sent = json.loads(r.stdout)["sent"]
        time.sleep(0.2)
        d = read_counters(lab) - before
        frames_bb = cap.frames()
        from_attacker = sum(1 for f in frames_bb
                            if any(ip.src in (src4, src6) for ip in ip_layers(f)))
        say(f"sent {sent:,} frames in {seconds:.1f} s")
        say()
        row("iad inet0 denylist", f"{signed(d['iad', 'inet0', 'denylist'])} packets "
                                  f"(the burst: {sent:,})")
        row("iad inet0 steer", f"{signed(d['iad', 'inet0', 'steer'])} packets")
        for dc in eu:
            row(f"{dc} bb0 decap", f"{signed(d[dc, 'bb0', 'decap'])} packets")
        row("iad front end connections", f"{signed(d['iad', 'front', 'accepted'])} accepted")
        row("backbone capture", f"{from_attacker:,} frames from the attacker "
                                f"({len(frames_bb):,} frames in all)")

        self.expect(sent == burst, f"lab/send.py sent {sent:,} of {burst:,} frames")
        self.expect(d["iad", "inet0", "denylist"] == sent,
                    f"iad's denylist counter rose by {d['iad', 'inet0', 'denylist']:,}, "
                    f"not {sent:,}")
        self.expect(d["iad", "inet0", "steer"] == 0, "iad steered some of the burst")
        for dc in eu:
            self.expect(d[dc, "bb0", "decap"] == 0, f"{dc} decapsulated something on bb0")
        self.expect(from_attacker == 0, f"{from_attacker} frames from the attacker on bb")
        return (f"all {sent:,} frames dropped by iad's XDP before steering; none reached "
                "the backbone")

    # -- 6

    # -- 6

    def pipeline(self) -> str:
        lab = self.lab
        if lab.move("client", "dus"):
            say("client moved back to dus")
        jar = "/dev/shm/privedge-demo-jar"   # memory: the demo writes no request to disk

        def curl(path: str, *args: str) -> tuple[str, str]:
            """(status, cf-cache-status or the Location) of one request from el-client."""
            r = lab.exec("client", [*curl_to(lab, WWW, WWW4), "-o", "/dev/null", "-w",
                                    "%{http_code} %header{cf-cache-status}%{redirect_url}",
                                    *args, f"https://{WWW}{path}"],
                         capture_output=True, text=True, timeout=CURL_TIMEOUT + 10)
            if r.returncode != 0:
                raise StepFailed(f"curl https://{WWW}{path}: {r.stderr.strip()}")
            code, _, extra = r.stdout.partition(" ")
            return code, extra

        css = f"/static/demo-{secrets.token_hex(3)}.css"
        checks = [
            ("first fetch of a stylesheet", css, (), ("200", "MISS")),
            ("the same again", css, (), ("200", "HIT")),
            ("SQL injection in a query", "/shop?id=1%27%20UNION%20SELECT%20card%20FROM%20users--",
             (), ("403", "")),
            ("a JSON order for Mr O'Brien", "/echo/api/orders", (
                "-X", "PATCH", "-H", "Content-Type: application/json", "--data",
                '{"note": "for Mr O\'Brien, drop it at the door"}'), ("200", "DYNAMIC")),
            ("members page, no cookie: challenged", "/members", (),
             ("302", f"https://{WWW}/members")),
            ("members page, following with a cookie jar", "/members",
             ("-L", "-b", jar, "-c", jar), ("200", "DYNAMIC")),
            ("login with a leaked password", "/login", (
                "--data", "username=katerina&password=password123"), ("401", "DYNAMIC")),
        ]
        try:
            for what, path, args, want in checks:
                got = curl(path, *args)
                shown = got[1].replace(f"https://{WWW}", "") or "-"
                say(f"{what:<44}{got[0]}  {shown}")
                self.expect(got == want, f"{what}: got {got}, expected {want}")
        finally:
            Path(jar).unlink(missing_ok=True)
        from agent.l7.status import read_status

        actions = read_status(str(lab.dc_dir("dus") / "l7.sock"))["actions"]["www"]
        say()
        row("dus www actions", ", ".join(f"{k} {v}" for k, v in actions.items() if v))
        self.expect(actions["waf_block"] >= 1, "the WAF blocked nothing")
        self.expect(actions["login_leaked"] >= 1, "the leaked password was not flagged")
        self.expect(actions["challenge_passed"] >= 1, "no challenge was passed")
        return ("the cache answered the second fetch, the WAF stopped the attack and passed "
                "the order, the cookie challenge let curl in, the leaked password was flagged")

    # -- 7

    def core(self) -> str:
        from lab.cluster import PROMETHEUS_WEB
        from lab.coreapi import curl, zone_logs

        lab = self.lab

        def query(promql: str) -> dict[str, float]:
            r = curl(lab, "core", "--get", "--data-urlencode", f"query={promql}",
                     f"http://{PROMETHEUS_WEB}/api/v1/query")
            if r.returncode != 0:
                raise StepFailed(f"Prometheus in {lab.ns('core')}: {r.stderr.strip()}")
            return {x["metric"].get("dc", ""): float(x["value"][1])
                    for x in json.loads(r.stdout)["data"]["result"]}

        dcs = self.topo.dc_names()
        deadline = time.monotonic() + 30
        while True:     # Prometheus scrapes every 2 s: wait for a scrape after step 6
            up = query('up{job="privedge-agents"}')
            served = query("sum by (dc) (privedge_l7_responses_total)")
            ready = all(up.get(d) == 1 for d in dcs) and served.get("dus", 0) >= 7
            if ready or time.monotonic() > deadline:
                break
            time.sleep(1)
        drops = query('sum by (dc) (privedge_xdp_packets_total{verdict="drop"})')
        say("the core's Prometheus (Debian's), scraping each DC's /metrics over mTLS:")
        say(f"{'DC':<6}{'up':<5}{'responses':>10}{'XDP drops':>11}")
        for dc in dcs:
            say(f"{dc:<6}{up.get(dc, 0):<5.0f}{served.get(dc, 0):>10.0f}"
                f"{drops.get(dc, 0):>11.0f}")
        self.expect(all(up.get(d) == 1 for d in dcs), f"not every DC is up: {up}")
        self.expect(drops.get("iad", 0) >= 1, "no drop at iad reached Prometheus")

        deadline, mine, records = time.monotonic() + 15, [], []
        while not mine and time.monotonic() < deadline:
            _, records = zone_logs(lab, "www", "zones/www")
            mine = [r for r in records if r["path"].startswith("/static/demo-")]
            time.sleep(0.5)
        say()
        say(f"www's logs, read with www's own certificate: {len(records)} record(s) today")
        if mine:
            r = mine[-1]
            say(f"  e.g. {r['method']} {r['path']} {r['status']} {r['cache_status']} "
                f"from {r['client_ip']} via {r['dc']}")
        refused = zone_logs(lab, "www", "zones/shop-eu")[0]
        say(f"the same read with shop-eu's certificate: HTTP {refused}")
        self.expect(bool(mine), "Katerina's requests are not in www's logs")
        self.expect(refused == 403, f"shop-eu's certificate read www's logs (HTTP {refused})")
        data = lab.state_dir / "core" / "data"
        plain = [f for f in data.rglob("*") if f.is_file() and b"/static/demo-" in f.read_bytes()]
        row("store files holding a path", str(len(plain)))
        self.expect(not plain, f"plaintext in the store: {plain[:3]}")
        return ("every DC scraped over mTLS; www's logs reached the core, encrypted, "
                "readable by www alone")

    # -- 8

    def control_plane(self) -> str:
        import yaml

        lab = self.lab
        path = "/closed-for-maintenance"

        def net(*args: str) -> tuple[int, dict, str]:
            argv = [lab.python, "-m", "control.netcli", "--pki", str(lab.state_dir / "netpki"),
                    "--operator", "lab-admin", "--store", str(lab.control_store),
                    "--audit", str(lab.state_dir / "control-audit.jsonl"), "--json", *args]
            r = lab.exec("core", argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
            return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {}, r.stderr

        def statuses() -> list[int]:
            codes = []
            for dc in self.topo.dc_names():
                lab.move("client", dc)
                r = lab.exec("client", [*curl_to(lab, WWW, WWW4), "-o", "/dev/null", "-w",
                                        "%{http_code}", f"https://{WWW}{path}"],
                             capture_output=True, text=True, timeout=CURL_TIMEOUT + 10)
                codes.append(int(r.stdout or 0))
            lab.move("client", "dus")
            return codes

        def show(results: dict) -> None:
            for dc, r in results.items():
                row(f"{dc}", f"generation {r.get('generation')} in {r['seconds'] * 1000:.0f} ms"
                    if r["ok"] else f"FAILED {r.get('error')}")

        doc = yaml.safe_load(lab.network_file.read_text())
        www = next(z for z in doc["zones"] if z["name"] == "www")
        www["firewall"].append({"expression": f'http.request.uri.path eq "{path}"',
                                "action": "block"})
        changed = self.tmp / "network-maintenance.yaml"
        changed.write_text(yaml.safe_dump(doc, sort_keys=False))
        before = statuses()
        say(f"privedge-net apply {changed.name} (www: a firewall rule blocks {path})")
        code, results, err = net("apply", str(changed))
        show(results)
        after = statuses()
        via = ", ".join(self.topo.dc_names())
        row(f"its status via {via}", f"{before} before, {after} after")
        self.expect(code == 0 and all(r["ok"] for r in results.values()),
                    f"the apply did not reach every DC: {err.strip()}")
        self.expect(after == [403] * len(after), f"the block is not enforced everywhere: {after}")
        bad = self.tmp / "network-mistake.yaml"
        doc["deny"]["prefixes"].append("198.51.100.300/32")
        bad.write_text(yaml.safe_dump(doc, sort_keys=False))
        code, results, err = net("apply", str(bad))
        say(f"privedge-net apply {bad.name} (a prefix that does not parse)")
        row("refused", err.strip().splitlines()[0] if err.strip() else "(nothing said)")
        self.expect(code == 1 and not results, "the file with a mistake was sent")
        say("privedge-net apply network.yaml (the lab's own)")
        code, results, err = net("apply", str(lab.network_file))
        show(results)
        restored = statuses()
        row(f"its status via {via}", f"{restored}")
        self.expect(code == 0 and restored == before,
                    f"the lab's own network did not take the block away: {restored}")
        gens = {r.get("generation") for r in results.values()}
        return (f"one file, every DC at generation {gens.pop() if len(gens) == 1 else gens}; "
                "the mistake changed nothing anywhere")

    def summary(self, seconds: float) -> bool:
        ok = all(r for _, _, r in self.results)
        print("\n== summary")
        say(f"{'step':<52}result")
        for n, short, passed in self.results:
            say(f"{n}  {short:<49}{'PASS' if passed else 'FAIL'}")
        failed = [str(n) for n, _, passed in self.results if not passed]
        print()
        if ok:
            print(f"RESULT: PASS, all {len(self.results)} steps in {seconds:.1f} s: the EU zone "
                  "was served only in the EU,\n        the backbone carried no plaintext, "
                  "the denylisted attacker was dropped at the edge,\n        the L7 "
                  "pipeline cached, blocked and challenged as configured, and the core\n"
                  "        got metrics by closed labels and www's logs, encrypted; one file\n"
                  "        changed every DC, and a mistake in it none")
        else:
            print(f"RESULT: FAIL, step {', '.join(failed)} of {len(self.results)} failed "
                  f"({seconds:.1f} s): see above;\n        to look around afterwards, run the "
                  "demo with --keep")
        return ok


def _addrs(link) -> str:
    if link is None:
        return "-"
    return "  ".join(str(a) for a in (link.v4, link.v6) if a is not None)


# -- running it ---------------------------------------------------------------


def filter_demo_leftovers(prefix: str) -> list[str]:
    """Namespaces of the single-link demo (`--filter-only --keep`): it names
    them <prefix>client (with tx0) and <prefix>dus (with rx0), as the lab does."""
    out = []
    for name, ifname in ((f"{prefix}client", "tx0"), (f"{prefix}dus", "rx0")):
        if netns.exists(name):
            with NetNS(name) as ns:
                if ns.link_lookup(ifname=ifname):
                    out.append(name)
    return out


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Cleanup runs to its end, even if Ctrl-C is pressed again."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _down(lab: Lab) -> bool:
    try:
        removed = lab.down()["removed"]
    except LabError as e:
        print(f"could not remove everything: {e}\n"
              f"try again with: sudo .venv/bin/python -m lab.demo --clean")
        return False
    spaces = sum(1 for r in removed if r.startswith("namespace "))
    agents = sum(1 for r in removed if r.startswith("agent of "))
    print(f"removed lab {lab.prefix}: {agents} agents stopped, {spaces} namespaces, "
          "pins and state")
    return True


def keep_hints(lab: Lab) -> None:
    p = "" if lab.prefix == "el-" else f" --prefix {lab.prefix}"
    py = ".venv/bin/python"
    ca = lab.state_dir / "pki" / "ca.crt"
    print(f"\nlab {lab.prefix} kept up (client is in Frankfurt now). Look around:")
    for cmd in (f"sudo {py} -m lab{p} status",
                f"sudo {py} -m lab{p} exec client -- curl -s --cacert {ca} \\\n"
                f"        --resolve {SHOP}:443:{EU4} https://{SHOP}/",
                f"sudo {py} -m lab{p} exec iad -- {py} -m control.cli --iface inet0 \\\n"
                f"        --bpffs {lab.bpffs('iad')} --run-dir {lab.dc_dir('iad') / 'run'} "
                "status",
                f"sudo {py} -m lab{p} down          (or: sudo {py} -m lab.demo --clean)"):
        print(f"  {cmd}")


def tell(prefix: str = "el-", keep: bool = False, topology: Topology | None = None) -> int:
    """Bring the lab up, tell the story, take the lab down (unless `keep`).
    0 when every step passed."""
    t0 = time.monotonic()
    try:
        lab = Lab(topology or load_topology(), prefix=prefix)
    except (LabError, TopologyError) as e:
        print(f"demo: {e}")
        return 1
    left = filter_demo_leftovers(prefix)
    if left:
        print(f"demo: {', '.join(left)} belong to the single-link demo "
              f"(--filter-only --keep); remove them first: "
              f"sudo .venv/bin/python -m lab.demo --clean")
        return 1
    print(f"privedge demo: Regional Services on a {len(lab.topology.dcs)}-DC lab "
          f"(namespaces {prefix}*)")
    if lab.state_dir.exists() or any(netns.exists(n) for n in lab.namespaces):
        print("an earlier run left the lab up: removing it first")
        if not _down(lab):
            return 1
    tmp = Path(tempfile.mkdtemp(prefix=f"privedge-demo-{prefix}"))
    story = Story(lab, tmp)
    ok, interrupted = False, False
    try:
        story.run()
    except KeyboardInterrupt:
        interrupted = True
        print("\n\ninterrupted")
    finally:
        with _no_interrupt():
            while Capture.running:
                Capture.running.pop().stop(linger=0)
            shutil.rmtree(tmp, ignore_errors=True)
            if not interrupted:
                ok = story.summary(time.monotonic() - t0)
            print()
            if keep:
                keep_hints(lab)
            else:
                ok = _down(lab) and ok
    if interrupted:
        return 130
    return 0 if ok else 1
