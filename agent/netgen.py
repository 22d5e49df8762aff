"""The network generation this agent enforces: kept on disk, rendered into
each link's rules and the front end's zones (issue 6).

    state = NetworkState(Path("/var/lib/privedge/generations"))
    staged = state.stage(payload)                 # unpacked and validated
    r = render(staged, me, serve_local)           # this DC's share, checked
    ... apply r to the links and the front end ...
    state.commit(staged)                          # what a restart re-applies

On disk, one directory per generation kept (the current one and the one
before), each with the payload as received and its list files:

    <dir>/gen-7/payload.json  <dir>/gen-7/lists/deny-0.txt  <dir>/current -> gen-7

`current` is replaced by a rename, so a crash leaves the old generation or
the new one, never neither: an agent that restarts while a generation
exists starts with it, not with an empty rule set.

The network decides the deny and allow lists, L4 rules, limits, steering
tables and zones; the node and serve configs keep what is the machine's own
(interfaces, bogons, capacity, listeners, certificate directory).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.config import ConfigError, Service, SteeringDc
from agent.l7.config import ServeConfig, Zone, parse_serve_config
from agent.rules import NetworkShare
from control.genpack import Generation, unpack
from control.network import NetworkConfig, NetworkZone
from control.render import dc_view, key_here

PAYLOAD = "payload.json"
CURRENT = "current"


@dataclass(frozen=True)
class Identity:
    """Who this agent is, from its own configs: the generation must agree."""

    dc: str
    region: str
    backbone: str | None        # steering's backbone address; None: no steering


@dataclass(frozen=True)
class Staged:
    generation: Generation
    directory: Path             # where its list files are

    @property
    def number(self) -> int:
        return self.generation.number


class NetworkState:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def current(self) -> Staged | None:
        """The last generation committed here, validated again; None if none.
        ConfigError if it is there but unreadable: never silently empty."""
        link = self.directory / CURRENT
        if not os.path.lexists(link):
            return None
        target = link.resolve()
        if not target.is_dir():
            raise ConfigError(f"stored generation: {link} points at {target}, which is gone")
        try:
            payload = json.loads((target / PAYLOAD).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"stored generation {target}: {e}") from None
        return Staged(unpack(payload, target), target)

    def stage(self, payload: object) -> Staged:
        """Unpack into a fresh staging directory and validate whole; ConfigError
        lists every problem (the staging directory is then removed)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=self.directory))
        try:
            return Staged(unpack(payload, staging), staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def clean(self) -> None:
        """Staging left by an agent that stopped mid-apply (at start: one
        agent per directory)."""
        for p in self.directory.glob("staging-*"):
            shutil.rmtree(p, ignore_errors=True)

    def discard(self, staged: Staged) -> None:
        if staged.directory.name.startswith("staging-"):
            shutil.rmtree(staged.directory, ignore_errors=True)

    def commit(self, staged: Staged) -> Staged:
        """Keep a staged generation as the current one; every other but the
        one it replaces is removed."""
        link = self.directory / CURRENT
        previous = os.readlink(link) if os.path.islink(link) else None
        final = self.directory / f"gen-{staged.number}"
        if staged.directory != final:
            shutil.rmtree(final, ignore_errors=True)
            (staged.directory / PAYLOAD).write_text(json.dumps(staged.generation.payload))
            for path in [*staged.directory.rglob("*"), staged.directory]:
                _fsync(path)    # on disk before `current` names them
            os.rename(staged.directory, final)
        tmp = self.directory / f"{CURRENT}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(final.name)
        os.replace(tmp, self.directory / CURRENT)
        _fsync(self.directory)
        for p in self.directory.glob("gen-*"):
            if p.name not in (final.name, previous):
                shutil.rmtree(p, ignore_errors=True)
        return Staged(staged.generation, final)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Rendered:
    """One generation as this DC enforces it."""

    number: int
    sha256: str
    share: NetworkShare                  # every link's lists, rules and steering
    serve: ServeConfig | None            # the front end's config, zones from the network
    left_out: tuple[str, ...]            # zones this DC would serve but may not hold keys of


def _check_identity(net: NetworkConfig, me: Identity, number: int) -> None:
    dc = net.dcs.get(me.dc)
    if dc is None:
        raise ConfigError(f"generation {number} has no DC {me.dc!r} (it has "
                          f"{', '.join(net.dcs)}); this agent is {me.dc}")
    if dc.region != me.region:
        raise ConfigError(f"generation {number} puts {me.dc} in region {dc.region}; this "
                          f"agent's configs say {me.region}")
    if me.backbone is not None and dc.backbone != me.backbone:
        raise ConfigError(f"generation {number} gives {me.dc} the backbone address "
                          f"{dc.backbone}; this agent's is {me.backbone}")


def _front_zones(net: NetworkConfig, region: str) -> tuple[list[Zone], list[str]]:
    """The zones of the front end: every zone (its guard refuses another
    region's regional zones by name), except those this DC would serve but
    whose key policy keeps the key elsewhere (geo, keyless)."""
    fields = set(Zone.model_fields)
    zones, left_out = [], []
    for z in net.zones:
        if (z.region is None or z.region == region) and not key_here(z, region):
            left_out.append(z.name)
            continue
        zones.append(_as_zone(z, fields))
    return zones, left_out


def _as_zone(z: NetworkZone, fields: set[str]) -> Zone:
    return Zone.model_validate(z.model_dump(include=fields))


def render(staged: Staged, me: Identity, serve_local: ServeConfig | None) -> Rendered:
    """This DC's share of a generation; ConfigError when it does not fit
    this agent (another DC's identity, zones the front end refuses)."""
    gen, net = staged.generation, staged.generation.net
    _check_identity(net, me, gen.number)
    view = dc_view(net, me.dc, staged.directory)
    dcs, services = view.steering
    share = NetworkShare(
        deny=view.deny, allow=view.allow, l4_rules=net.l4_rules, limits=net.limits,
        dcs=tuple(SteeringDc(name=n, region=r, backbone=b) for n, r, b in dcs),
        services=tuple(Service(address=a, region=r, zone=z) for a, r, z in services))
    serve, left_out = None, []
    if serve_local is not None:
        zones, left_out = _front_zones(net, me.region)
        if not zones:
            raise ConfigError(f"generation {gen.number} leaves {me.dc}'s front end no zone")
        serve = parse_serve_config({**serve_local.model_dump(), "zones": zones},
                                   f"generation {gen.number} for {me.dc}")
    return Rendered(gen.number, gen.sha256, share, serve, tuple(left_out))
