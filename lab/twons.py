"""Two namespaces joined by a veth, a real agent attached to the edge end.

    <prefix>-tx  tx0 (no addresses)  ------  rx0 203.0.113.1/24     <prefix>-rx
                 raw frames, any source          2001:db8:113::1/64   (agent, XDP)

Used by the demo (prefix "el") and the integration tests (a prefix unique
to the run). `down()` removes the namespaces, pins and state whatever
happened; frames come from lab/send.py and are counted by lab/recv.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from lab import netns

# The lab's bogons: production's list without the documentation and
# benchmarking ranges the lab itself uses (DESIGN.md section 5).
LAB_BOGONS = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
              "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
              "::/8", "fc00::/7", "fe80::/10", "ff00::/8"]


class TwoNamespaces:
    def __init__(self, prefix: str, tx: str = "tx", rx: str = "rx") -> None:
        self.prefix = prefix
        self.tx, self.rx = f"{prefix}-{tx}", f"{prefix}-{rx}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.bpffs = f"/sys/fs/bpf/{self.prefix}"
        self.run_dir = str(self.tmp / "run")
        self.agent: subprocess.Popen | None = None
        self.rx_mac = self.tx_mac = ""
        self.log = self.tmp / "agent.log"

    def up(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        netns.create(self.tx)
        netns.create(self.rx)
        # tx0 gets no address and no IPv6: nothing but the frames we send
        # leaves it (link-local router solicitations would be bogons).
        netns.disable_ipv6(self.tx)
        netns.veth(self.tx, "tx0", self.rx, "rx0")
        netns.address(self.rx, "rx0", "203.0.113.1/24")
        netns.address(self.rx, "rx0", "2001:db8:113::1/64")
        self.rx_mac = netns.mac(self.rx, "rx0")
        self.tx_mac = netns.mac(self.tx, "tx0")

    def config(self, **extra) -> Path:
        cfg = {"interface": "rx0", "netns": self.rx, "role": "public",
               "bpffs": self.bpffs, "run_dir": self.run_dir, "bogons": LAB_BOGONS,
               **extra}
        path = self.tmp / "node.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start_agent(self, timeout: float = 90) -> None:
        with open(self.log, "a") as log:
            self.agent = subprocess.Popen(
                netns.python("agent.daemon", "run", "--config", str(self.tmp / "node.yaml")),
                stdout=log, stderr=subprocess.STDOUT, cwd=netns.ROOT,
                env={**os.environ, "PYTHONPATH": str(netns.ROOT)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "[ready]" in self.log.read_text():
                return
            if self.agent.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"agent did not get ready:\n{self.log.read_text()}")

    def stop_agent(self) -> None:
        if self.agent and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(timeout=30)
        assert self.agent is None or self.agent.returncode == 0, self.log.read_text()
        self.agent = None

    def cli(self, *args: str, inside: bool = False) -> dict | list:
        """`privedge --json ...` on the edge; `inside` runs it in the edge namespace."""
        argv = netns.python("control.cli", "--iface", "rx0", "--bpffs", self.bpffs,
                            "--run-dir", self.run_dir, "--json", *args)
        out = subprocess.run(netns.nsenter(self.rx, argv) if inside else argv,
                             capture_output=True, text=True, cwd=netns.ROOT, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(netns.ROOT)})
        if out.returncode != 0:
            raise RuntimeError(f"privedge {' '.join(args)} failed: {out.stderr}")
        return json.loads(out.stdout)

    def receiver(self, duration: float) -> tuple[subprocess.Popen, Path]:
        ready = self.tmp / f"recv{time.monotonic_ns()}.ready"
        p = netns.popen(self.rx, netns.python("lab.recv", "--iface", "rx0", "--duration",
                                              str(duration), "--ready", str(ready)),
                        stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline and p.poll() is None, "receiver did not start"
            time.sleep(0.05)
        return p, ready

    def send(self, pcap: Path, loops: int = 1, pps: float = 0, timeout: float = 60) -> int:
        out = subprocess.run(
            netns.nsenter(self.tx, netns.python("lab.send", "--iface", "tx0", "--pcap",
                                                str(pcap), "--loops", str(loops), "--pps",
                                                str(pps), "--timeout", str(timeout))),
            capture_output=True, text=True, timeout=timeout + 30, check=True,
            env={**os.environ, "PYTHONPATH": str(netns.ROOT)})
        return json.loads(out.stdout)["sent"]

    def down(self) -> None:
        try:
            self.stop_agent()
        finally:
            subprocess.run(netns.python("agent.daemon", "detach", "rx0", "--netns", self.rx,
                                        "--bpffs", self.bpffs, "--run-dir", self.run_dir),
                           capture_output=True, timeout=60, cwd=netns.ROOT,
                           env={**os.environ, "PYTHONPATH": str(netns.ROOT)})
            netns.delete(self.tx)
            netns.delete(self.rx)
            shutil.rmtree(self.bpffs, ignore_errors=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
