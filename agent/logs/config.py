"""logs.yaml: where this agent sends customer logs and the operations sample.

    dc: dus                                   # batch ids and records; must match cert's CN
    cert: /etc/privedge/pki/agents/dus.crt    # the agent's client certificate (control/pki.py)
    key: /etc/privedge/pki/agents/dus.key
    ca: /etc/privedge/pki/ca.crt              # the core is verified against it
    cores:
      core:                                   # names become the metrics' `core` label
        url: https://198.18.0.10:8443
        tls_name: core.privedge.internal      # optional: the name its certificate is checked
                                              # by (default: the URL's host)
      core-eu:
        url: https://198.18.0.11:8443
        regions: [eu]                         # zones whose log_region is eu go here, only here
    default_core: core                        # zones without a log_region
    zones:                                    # customer logs are opt-in: unlisted zones are
      www: {}                                 #   not logged; {} is enabled and global
      shop-eu: {log_region: eu}
      blog: {enabled: false}
    batch_records: 2000                       # a batch is sent at this many records, or
    batch_seconds: 2.0                        #   this long after the first one waited
    buffer_bytes: 67108864                    # gzip batches kept per core and stream (memory)
    max_pending_records: 50000                # records not yet encoded, per core and stream,
    max_pending_bytes: 67108864               #   and their estimated memory (the request
                                              #   heads' host, path and user agent, mostly)
    gzip_level: 6
    timeout_seconds: 20
    sample: {rate: 0.01, core: core}          # core defaults to default_core; rate 0: off

Zones are named here rather than taken from the front end's serve config,
because logging is a per-zone customer choice with its own region (the
metadata boundary). LogRouter can cross-check against the serve config's
zone regions (router.py). A zone whose log_region no core serves, or that
two cores serve, is an error here: logs never fall back to another core.
Errors name file, path, value and why, e.g.
    logs.yaml: zones.shop-eu.log_region: 'ap': no core serves region ap (core-eu: eu)
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agent.config import (
    DEFER_CROSS_CHECKS,
    Frozen,
    parse_checked,
    read_yaml_mapping,
)
from agent.l7.config import Name
from agent.logs import shipper
from agent.metrics.server import TlsFiles

_DEFER = DEFER_CROSS_CHECKS   # cross checks run after validation, each with its own path


class CoreCfg(Frozen):
    url: str
    tls_name: str | None = None
    regions: tuple[Name, ...] = ()   # empty: a core for global zones only

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port is not a number from 0 to 65535") from None
        if parts.scheme != "https" or not parts.hostname or parts.username or parts.query \
                or parts.fragment or parts.path not in ("", "/") or port == 0:
            raise ValueError("expected https://HOST[:PORT] (mutual TLS, no path)")
        return value

    @field_validator("tls_name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        labels = value.lower().removesuffix(".").split(".")
        if not all(0 < len(x) < 64 and x.replace("-", "").isalnum() for x in labels):
            raise ValueError(f"{value!r} is not a DNS name or an IP address")
        return ".".join(labels)


class ZoneLogs(Frozen):
    enabled: bool = True
    log_region: Name | None = None   # None: global, the default core


class SampleCfg(Frozen):
    rate: float = Field(default=0.01, ge=0, le=1)
    core: Name | None = None         # None: default_core


class LogsConfig(Frozen):
    dc: Name
    cert: Path
    key: Path
    ca: Path
    cores: dict[Name, CoreCfg] = Field(min_length=1)
    default_core: Name | None = None
    zones: dict[Name, ZoneLogs] = Field(default_factory=dict)
    batch_records: int = Field(default=2000, ge=1, le=100_000)
    batch_seconds: float = Field(default=2.0, gt=0, le=300)
    buffer_bytes: int = Field(default=64 << 20, ge=1024, le=1 << 32)
    max_pending_records: int = Field(default=50_000, ge=1, le=10_000_000)
    max_pending_bytes: int = Field(default=shipper.MAX_PENDING_BYTES, ge=1 << 20, le=1 << 34)
    gzip_level: int = Field(default=shipper.GZIP_LEVEL, ge=1, le=9)
    timeout_seconds: float = Field(default=shipper.TIMEOUT, gt=0, le=300)
    sample: SampleCfg = SampleCfg()

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> LogsConfig:
        if info.context and info.context.get(_DEFER):
            return self
        problems = cross_problems(self)
        if problems:
            raise ValueError("; ".join(f"{path}: {value!r}: {why}"
                                       for path, value, why in problems))
        return self

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.cert, self.key, self.ca)

    @property
    def sample_core(self) -> str | None:
        """The core the sample goes to (None: no sample, rate 0)."""
        return None if self.sample.rate == 0 else (self.sample.core or self.default_core)

    def cores_of_region(self, region: str) -> list[str]:
        return [name for name, core in self.cores.items() if region in core.regions]

    def log_core(self, zone: str) -> str | None:
        """The one core a zone's logs go to; None if the zone is not logged."""
        z = self.zones.get(zone)
        if z is None or not z.enabled:
            return None
        if z.log_region is None:
            return self.default_core
        (core,) = self.cores_of_region(z.log_region)  # one, by cross_problems
        return core


def cross_problems(cfg: LogsConfig) -> list[tuple[str, object, str]]:
    """(path, value, why) for each problem spanning sections."""
    problems: list[tuple[str, object, str]] = []
    names = ", ".join(cfg.cores)
    served = "; ".join(f"{n}: {', '.join(c.regions)}" for n, c in cfg.cores.items()
                       if c.regions) or "no core has regions"
    if cfg.default_core is not None and cfg.default_core not in cfg.cores:
        problems.append(("default_core", cfg.default_core, f"not a core (cores: {names})"))
    if cfg.sample.core is not None and cfg.sample.core not in cfg.cores:
        problems.append(("sample.core", cfg.sample.core, f"not a core (cores: {names})"))
    if cfg.sample.rate > 0 and cfg.sample.core is None and cfg.default_core is None:
        problems.append(("sample.core", None, "the sample needs a core, and there is no "
                         "default_core"))
    if cfg.batch_records > cfg.max_pending_records:
        problems.append(("batch_records", cfg.batch_records, "must not exceed "
                         f"max_pending_records ({cfg.max_pending_records}): a batch must fit"))
    for zone, z in cfg.zones.items():
        if not z.enabled:
            continue
        if z.log_region is None:
            if cfg.default_core is None:
                problems.append((f"zones.{zone}", zone, "a zone without log_region goes to "
                                 "default_core, which is not set"))
            continue
        cores = cfg.cores_of_region(z.log_region)
        if not cores:
            problems.append((f"zones.{zone}.log_region", z.log_region,
                             f"no core serves region {z.log_region} ({served}); a regional "
                             "zone's logs never go to another region's core"))
        elif len(cores) > 1:
            problems.append((f"zones.{zone}.log_region", z.log_region,
                             f"served by several cores ({', '.join(cores)}): one per region"))
    return problems


def parse_logs_config(data: object, source: str = "<logs config>") -> LogsConfig:
    """Validate a mapping; ConfigError lists every problem, one per line."""
    return parse_checked(LogsConfig, data, source, cross_problems)


def load_logs_config(path: str | Path) -> LogsConfig:
    """Read and validate logs.yaml; ConfigError says what and where."""
    return parse_logs_config(read_yaml_mapping(path), str(path))
