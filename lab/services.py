"""The lab's long-running servers other than agents: one process each, in a
host's namespace, started once, found again by PID file, stopped by PID.

    origin       lab/origin.py in <p>origin
    prometheus   Debian's prometheus in <p>core, scraping every DC
    logstore     the core log store (core/) in <p>core

A recorded PID is trusted only while /proc/PID/cmdline still names the
service's marker (PIDs are reused), so `down` never stops a stranger.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab import netns


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    argv: tuple[str, ...]
    state_dir: Path
    ready: str              # a line the process logs once it serves
    marker: str             # a word of its command line (with the state dir: ours)
    timeout: float = 30.0   # seconds to become ready

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.state_dir / f"{self.name}.log"


def running(service: Service, cmdline: Callable[[int], str], alive: Callable[[int], bool]
            ) -> int | None:
    """The service's recorded PID, if that process is still the service."""
    try:
        pid = int(service.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    cmd = cmdline(pid)
    ours = alive(pid) and service.marker in cmd and str(service.state_dir) in cmd
    return pid if ours else None


def start(service: Service, env: dict[str, str], cwd: Path,
          wait_for_line: Callable[..., tuple[bool, str]]) -> int:
    """Start it in its namespace and wait for its ready line; RuntimeError
    with the log's tail if it does not get there."""
    with open(service.log, "a") as f:
        offset = f.tell()
        p = subprocess.Popen(netns.nsenter(service.namespace, list(service.argv)), stdout=f,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                             env=env, start_new_session=True)
    # nsenter execs the service: this PID is the service's.
    service.pid_file.write_text(f"{p.pid}\n")
    ok, text = wait_for_line(service.log, offset, p, service.ready,
                             time.monotonic() + service.timeout)
    if not ok:
        raise RuntimeError(f"{service.name} did not start (log {service.log}):\n    "
                           + "\n    ".join(text.strip().splitlines()[-10:]))
    return p.pid
