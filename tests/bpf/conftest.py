from __future__ import annotations

import pytest

from agent.config import Capacity
from tests.harness import EdgeUnderTest
from tests.probe import require_kernel_tier


@pytest.fixture(scope="session", autouse=True)
def _kernel_tier() -> None:
    require_kernel_tier()


@pytest.fixture(scope="session")
def edge():
    """The shared node: its exact table has 64 buckets (capacity 512), small
    enough that tests can fill buckets and drive the overflow paths."""
    e = EdgeUnderTest("bpf", Capacity(deny4_exact=512))
    yield e
    e.close()


@pytest.fixture(scope="module")
def big_edge():
    """A node sized for a million exact denies."""
    e = EdgeUnderTest("bpfbig")
    yield e
    e.close()
