"""The one check the root tiers make before running: root, bcc, headers, bpffs.

tests/bpf and tests/integration need the real kernel. When something is
missing they fail once, with one message naming it and the fix; they never
skip, so CI cannot go green without them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest


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


def require_kernel_tier() -> None:
    problems = missing()
    if problems:
        pytest.fail("this tier needs the real kernel: " + "; ".join(problems), pytrace=False)
