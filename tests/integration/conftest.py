"""Integration tier: a real agent on a veth between two namespaces (lab/twons.py)."""

from __future__ import annotations

import secrets

import pytest

from lab.twons import TwoNamespaces
from tests.probe import require_kernel_tier


@pytest.fixture(scope="session", autouse=True)
def _kernel_tier() -> None:
    require_kernel_tier()


@pytest.fixture()
def lab():
    lab = TwoNamespaces(f"pe{secrets.token_hex(3)}")
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
