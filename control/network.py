"""The network config: one declarative file for every DC (DESIGN.md §4).

    python -m control.network validate network.yaml     every problem, or "ok"
    python -m control.network schema [--out FILE]        JSON Schema for editors
    python -m control.network diff OLD NEW               what each DC would change

Validated completely into typed, immutable objects before anything is sent
anywhere. What the edge already validates is reused, not restated: a zone
is the L7 front end's zone (agent/l7/config.py: hostnames, origin, page
rules, firewall expressions that must parse, rate limits, WAF, bots, login,
cache) plus its key policy and customer log settings (core/config.py's
retention and Logpush jobs); deny and allow lists and L4 rules are the
node config's (agent/config.py). Then the checks that span the file, each
reported as `file: path: value: why`:

  - a DC's region, a zone's region, its key policy's regions and its log
    region must be defined regions, with at least one DC;
  - zone names, hostnames and dedicated addresses belong to one zone each;
  - a regional zone's dedicated addresses are no DC's own address;
  - DC names, backbone and public addresses are unique;
  - a geo key policy of a regional zone includes the zone's region (else
    no DC allowed to inspect it could terminate its TLS);
  - a keyless zone names its key server; other modes name none;
  - deny and allow list files exist and parse, line by line.

An example is examples/network.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import Field, field_validator, model_validator

from agent.config import (
    DEFAULT_L4_RULES,
    ConfigError,
    Frozen,
    IPText,
    IPv4Text,
    L4Rule,
    Limits,
    PrefixText,
    check_l4_rules,
    parse_checked,
    read_yaml_mapping,
)
from agent.l7.config import Name, Zone, zone_problems
from agent.prefixes import PrefixError, parse_file
from core.config import ZoneCfg

Problem = tuple[str, object, str]


class Dc(Frozen):
    region: Name
    backbone: IPv4Text                     # steering's tunnels and the control plane
    public: tuple[IPText, ...] = Field(min_length=1)   # its internet-facing addresses
    kek: str | None = None                 # key-encryption public key, PEM (Geo Key Manager)

    @field_validator("kek")
    @classmethod
    def _public_key(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                load_pem_public_key(value.encode())
            except ValueError:
                raise ValueError("not a PEM public key") from None
        return value


class KeyPolicy(Frozen):
    """Where the zone's private key may be (DESIGN.md §3)."""

    mode: Literal["local", "geo", "keyless"] = "local"
    regions: tuple[Name, ...] = ()         # geo: only DCs of these regions get the key
    keyserver: str | None = None           # keyless: the customer's key server, https://

    @model_validator(mode="after")
    def _fits_mode(self) -> KeyPolicy:
        if self.mode == "geo" and not self.regions:
            raise ValueError("a geo key policy names the regions its key may be in")
        if self.mode != "geo" and self.regions:
            raise ValueError(f"regions are for a geo key policy, not {self.mode}")
        if self.mode == "keyless":
            if self.keyserver is None or urlsplit(self.keyserver).scheme != "https" \
                    or not urlsplit(self.keyserver).hostname:
                raise ValueError("a keyless zone names its key server as https://HOST[:PORT]")
        elif self.keyserver is not None:
            raise ValueError(f"keyserver is for a keyless key policy, not {self.mode}")
        return self


class ZoneLogs(ZoneCfg):
    """The zone's customer logs: kept by the core (retention, Logpush jobs)
    when enabled; `log_region` is the only region whose core may hold them."""

    enabled: bool = False


class NetworkZone(Zone):
    key_policy: KeyPolicy = KeyPolicy()
    logs: ZoneLogs = ZoneLogs()


class PrefixList(Frozen):
    prefixes: tuple[PrefixText, ...] = ()
    files: tuple[str, ...] = ()            # one prefix a line; # comments


class NetworkConfig(Frozen):
    regions: tuple[Name, ...] = Field(min_length=1)
    dcs: dict[Name, Dc] = Field(min_length=1)
    zones: tuple[NetworkZone, ...] = ()
    deny: PrefixList = PrefixList()
    allow: PrefixList = PrefixList()
    l4_rules: tuple[L4Rule, ...] = DEFAULT_L4_RULES
    limits: Limits = Limits()

    @field_validator("l4_rules")
    @classmethod
    def _l4(cls, value: tuple[L4Rule, ...]) -> tuple[L4Rule, ...]:
        return check_l4_rules(value)


def _region_problems(cfg: NetworkConfig) -> list[Problem]:
    defined = set(cfg.regions)
    with_dc = {dc.region for dc in cfg.dcs.values()}
    out: list[Problem] = []

    def check(path: str, region: str | None, what: str) -> None:
        if region is None:
            return
        if region not in defined:
            out.append((path, region, f"not a defined region (defined: "
                                      f"{', '.join(cfg.regions)})"))
        elif region not in with_dc and what:
            out.append((path, region, f"no DC is in region {region}, so {what}"))

    seen = set()
    for i, region in enumerate(cfg.regions):
        if region in seen:
            out.append((f"regions[{i}]", region, "listed twice"))
        seen.add(region)
    for name, dc in cfg.dcs.items():
        check(f"dcs.{name}.region", dc.region, "")
    for i, z in enumerate(cfg.zones):
        check(f"zones[{i}].region", z.region, "no DC could serve the zone")
        for j, r in enumerate(z.key_policy.regions):
            check(f"zones[{i}].key_policy.regions[{j}]", r, "no DC could hold the key")
        check(f"zones[{i}].logs.log_region", z.logs.log_region,
              "no core of that region could hold its logs")
        if z.key_policy.mode == "geo" and z.region is not None \
                and z.region not in z.key_policy.regions:
            out.append((f"zones[{i}].key_policy.regions", list(z.key_policy.regions),
                        f"the zone is served only in {z.region}, which must be one of them "
                        "(no DC there could terminate its TLS)"))
    return out


def _address_problems(cfg: NetworkConfig) -> list[Problem]:
    out: list[Problem] = []
    owner: dict[str, str] = {}
    for name, dc in cfg.dcs.items():
        for path, addr in [(f"dcs.{name}.backbone", dc.backbone),
                           *((f"dcs.{name}.public[{j}]", a) for j, a in enumerate(dc.public))]:
            if addr in owner:
                out.append((path, addr, f"already {owner[addr]}"))
            owner.setdefault(addr, path)
    for i, z in enumerate(cfg.zones):
        for j, addr in enumerate(z.addresses):
            if addr in owner:
                out.append((f"zones[{i}].addresses[{j}]", addr,
                            f"a DC's own address ({owner[addr]})"))
    return out


def _list_problems(cfg: NetworkConfig, base: Path) -> list[Problem]:
    out: list[Problem] = []
    for name, lst in (("deny", cfg.deny), ("allow", cfg.allow)):
        for j, f in enumerate(lst.files):
            path = (base / f) if not Path(f).is_absolute() else Path(f)
            try:
                parse_file(str(path))     # an unreadable file is a PrefixError too
            except PrefixError as e:
                out.append((f"{name}.files[{j}]", f, str(e)))
    return out


def cross_problems(cfg: NetworkConfig, base: Path = Path(".")) -> list[Problem]:
    """Every check that spans the file; `base`: where relative list files are."""
    return (_region_problems(cfg) + zone_problems(cfg.zones) + _address_problems(cfg)
            + _list_problems(cfg, base))


def parse_network(data: object, source: str = "<network config>",
                  base: Path = Path(".")) -> NetworkConfig:
    """Validate a mapping; ConfigError lists every problem, one per line."""
    return parse_checked(NetworkConfig, data, source, lambda c: cross_problems(c, base))


def load_network(path: str | Path) -> NetworkConfig:
    p = Path(path)
    return parse_network(read_yaml_mapping(p), str(p), p.parent)


def json_schema() -> dict:
    schema = NetworkConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "privedge network config"
    return schema


def summary(cfg: NetworkConfig) -> str:
    regional = sum(1 for z in cfg.zones if z.region)
    return (f"{len(cfg.regions)} region(s), {len(cfg.dcs)} DC(s), {len(cfg.zones)} zone(s) "
            f"({regional} regional), {len(cfg.deny.prefixes)} deny prefix(es) inline and "
            f"{len(cfg.deny.files)} file(s), {len(cfg.l4_rules)} L4 rule(s)")


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m control.network",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check a network config; change nothing")
    v.add_argument("file", type=Path)
    s = sub.add_parser("schema", help="the JSON Schema of the network config")
    s.add_argument("--out", type=Path, help="write here (default: stdout)")
    d = sub.add_parser("diff", help="what applying NEW over OLD changes at each DC")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.cmd == "schema":
        text = json.dumps(json_schema(), indent=1) + "\n"
        if args.out is None:
            sys.stdout.write(text)
        else:
            args.out.write_text(text)
        return 0
    if args.cmd == "diff":
        return _diff(args.old, args.new)
    try:
        cfg = load_network(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.file}: ok: {summary(cfg)}")
    return 0


def _diff(old_path: Path, new_path: Path) -> int:
    from control.render import diff  # the renderer imports this module
    try:
        old, new = load_network(old_path), load_network(new_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    changes = diff(old, new, old_path.parent, new_path.parent)
    width = max(len(dc) for dc in changes)
    for dc, d in changes.items():
        print(f"{dc:<{width}}  {d.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
