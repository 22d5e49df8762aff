"""Test helpers over agent/standalone.py: the edge program under test."""

from __future__ import annotations

from agent.prefixes import PrefixTables, parse_prefix
from agent.standalone import StandaloneNode


class EdgeUnderTest(StandaloneNode):
    pass


def tables(*prefixes: str, expires: float = 0.0) -> PrefixTables:
    return PrefixTables.from_prefixes([parse_prefix(p) for p in prefixes], expires)

