from __future__ import annotations

import pytest

from tests.harness import EdgeUnderTest
from tests.probe import require_kernel_tier


@pytest.fixture(scope="session", autouse=True)
def _kernel_tier() -> None:
    require_kernel_tier()


@pytest.fixture(scope="session")
def edge():
    e = EdgeUnderTest("bpf")
    yield e
    e.close()
