"""Preflight: what the kernel side of privedge needs, checked in one place.

Used by the root test tiers (tests/probe.py) and the demo, which fail with
one message naming each missing piece and its fix.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def missing() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("not root: run `sudo make test`")
    try:
        import bcc  # noqa: F401
    except ImportError:
        problems.append("bcc does not import: `sudo make setup` installs python3-bpfcc")
    build = Path(f"/lib/modules/{platform.release()}/build/include")
    if not build.exists():
        problems.append(f"no kernel headers at {build}: `sudo make setup` links them")
    with open("/proc/self/mounts") as f:
        if not any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f):
            problems.append("no bpffs at /sys/fs/bpf: `sudo make setup` mounts it")
    return problems
