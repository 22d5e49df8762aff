"""The whole lab (lab/topology.yaml) for an integration module's fixture."""

from __future__ import annotations

import os
from collections.abc import Iterator

from agent.l7.status import read_status
from lab.cluster import Lab
from lab.topology import load_topology


def whole_lab(letter: str) -> Iterator[Lab]:
    """The lab with an agent per DC, under a prefix of this run's own
    (letter + PID), removed after whatever happened."""
    lab = Lab(load_topology(), prefix=f"{letter}{os.getpid() % 100000}-")
    try:
        lab.up(agents=True)
        yield lab
    finally:
        lab.down()


def front(lab: Lab, dc: str) -> dict:
    """A DC's TLS front end counters, from its status socket."""
    return read_status(str(lab.dc_dir(dc) / "l7.sock"))
