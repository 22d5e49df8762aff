"""The one check the root tiers make before running: root, bcc, headers, bpffs.

tests/bpf and tests/integration need the real kernel. When something is
missing they fail once, with one message naming it and the fix; they never
skip, so CI cannot go green without them.
"""

from __future__ import annotations

import pytest

from agent.preflight import missing


def require_kernel_tier() -> None:
    problems = missing()
    if problems:
        pytest.fail("this tier needs the real kernel: " + "; ".join(problems), pytrace=False)
