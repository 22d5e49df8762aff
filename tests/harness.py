"""Test helpers over agent/standalone.py: the edge program under test."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

from agent.prefixes import PrefixTables, parse_prefix
from agent.standalone import StandaloneNode


class EdgeUnderTest(StandaloneNode):
    pass


def tables(*prefixes: str, expires: float = 0.0) -> PrefixTables:
    return PrefixTables.from_prefixes([parse_prefix(p) for p in prefixes], expires)


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run this thread in network namespace `name`, then come back.

    BPF_PROG_TEST_RUN judges an XDP frame as received by the loopback of
    the caller's namespace, so bpf_fib_lookup() sees that namespace's routes
    and neighbours: steering tests build a backbone there, never on the host.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's namespace failed")
    finally:
        os.close(target)
        os.close(home)


CLONE_NEWNET = 0x40000000
