"""The core log store's config: YAML validated into typed, immutable objects.

    listen: 198.18.0.10                      # the core's backbone address
    port: 8443
    cert: /etc/privedge/pki/core/core.crt    # from privedge-pki (control/pki.py)
    key: /etc/privedge/pki/core/core.key
    ca: /etc/privedge/pki/ca.crt             # edges, zones, operators: certificates it issued
    data_dir: /var/lib/privedge/core         # encrypted batches, wrapped day keys, cursors
    master_key: /etc/privedge/core/master.key   # privedge-core init-key; NOT under data_dir
    region: eu                               # the log region this core serves (optional)
    sample_retention_days: 7
    max_body_bytes: 16777216                 # compressed; 413 above
    max_expanded_bytes: 67108864             # after gunzip; 413 above
    sweep_interval: 300                      # seconds between retention sweeps
    zones:
      www: {retention_days: 3}
      shop-eu:
        retention_days: 7                    # at most 7
        log_region: eu                       # only the eu core stores its logs
        logpush:
          - name: siem
            url: https://logs.example.eu/privedge
            ca_file: /etc/privedge/customers/shop-eu-ca.crt   # optional: system trust
            fields: [time, status, path]
            sample_rate: 0.5
            max_records: 1000
            max_seconds: 30
            headers: {Authorization: "Bearer ..."}

Used by core/cli.py (serve, check, sweep) and core/server.py. The lab builds
one with core_config_dict(). Errors name the file, the path inside it, the
value and why:
    core.yaml: zones.www.retention_days: 30: must be at most 7 (DESIGN.md §2)
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator

from agent.config import ConfigError, Frozen, _format_errors, read_yaml_mapping
from agent.l7.config import Name
from core.records import LOG_KEYS

MAX_RETENTION_DAYS = 7          # DESIGN.md §2: customer logs are kept at most 7 days
DEFAULT_MAX_BODY = 16 << 20     # PROTOCOL.md: 16 MiB compressed
DEFAULT_MAX_EXPANDED = 64 << 20  # and 64 MiB expanded
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")   # an HTTP header name
# Headers the pusher sets itself; a job may not override them.
RESERVED_HEADERS = frozenset({"host", "content-type", "content-encoding", "content-length",
                              "transfer-encoding", "connection"})


class LogpushJob(Frozen):
    """Push a zone's stored records on to the customer's HTTPS endpoint."""

    name: Name
    url: str
    ca_file: Path | None = None          # verify the endpoint with this CA; None: system trust
    fields: tuple[str, ...] = LOG_KEYS   # which record keys are sent, in this order
    sample_rate: float = Field(default=1.0, gt=0, le=1)
    max_records: int = Field(default=1000, ge=1, le=100_000)
    max_seconds: float = Field(default=30.0, gt=0, le=3600)
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=10.0, gt=0, le=300)       # per request
    retry_initial: float = Field(default=1.0, gt=0, le=60)   # seconds, doubled per failure
    retry_max: float = Field(default=60.0, gt=0, le=3600)    # the backoff's bound

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: object) -> object:
        # Before the url's own checks, and raised on the job rather than on
        # the url, so that the error (which shows a field's value) never
        # shows a password.
        url = data.get("url") if isinstance(data, dict) else None
        if isinstance(url, str):
            try:
                userinfo = "@" in urlsplit(url).netloc
            except ValueError:
                userinfo = "@" in url
            if userinfo:
                raise ValueError("url: credentials in the URL would be shown in errors and "
                                 "logs (so it is not shown here); put them in headers")
        return data

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("not an https:// URL with a host (logs leave the network only "
                             "over TLS)")
        if parts.fragment:
            raise ValueError("a URL fragment is never sent; remove it")
        try:
            parts.port  # noqa: B018 -- raises on a bad port
        except ValueError as e:
            raise ValueError(str(e)) from None
        return value

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one field")
        bad = [f for f in value if f not in LOG_KEYS]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))} not a log record key "
                             f"(keys: {', '.join(LOG_KEYS)})")
        if len(set(value)) != len(value):
            raise ValueError("a field is named twice")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for k, v in value.items():
            if not _TOKEN_RE.match(k):
                raise ValueError(f"{k!r} is not a header name")
            if k.lower() in RESERVED_HEADERS:
                raise ValueError(f"{k!r} is set by the pusher itself")
            if any(c in v for c in "\r\n\0"):
                raise ValueError(f"header {k}: a value may not hold CR, LF or NUL")
        return value

    @model_validator(mode="after")
    def _backoff(self) -> LogpushJob:
        if self.retry_initial > self.retry_max:
            raise ValueError("retry_initial is larger than retry_max")
        return self


class ZoneCfg(Frozen):
    retention_days: int = Field(default=MAX_RETENTION_DAYS, ge=1)
    log_region: Name | None = None       # None: any core stores its logs
    logpush: tuple[LogpushJob, ...] = ()

    @field_validator("retention_days")
    @classmethod
    def _at_most(cls, value: int) -> int:
        if value > MAX_RETENTION_DAYS:
            raise ValueError(f"must be at most {MAX_RETENTION_DAYS} (DESIGN.md §2: customer "
                             "logs are kept at most 7 days)")
        return value

    @field_validator("logpush")
    @classmethod
    def _unique_jobs(cls, value: tuple[LogpushJob, ...]) -> tuple[LogpushJob, ...]:
        names = [j.name for j in value]
        if len(set(names)) != len(names):
            raise ValueError(f"job names must be unique (got {', '.join(names)})")
        return value


class CoreConfig(Frozen):
    listen: str
    port: int = Field(default=8443, ge=0, le=65535)   # 0: a free port (tests)
    cert: Path
    key: Path
    ca: Path
    data_dir: Path
    master_key: Path
    region: Name | None = None
    sample_retention_days: int = Field(default=7, ge=1, le=366)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY, ge=1024)
    max_expanded_bytes: int = Field(default=DEFAULT_MAX_EXPANDED, ge=1024)
    sweep_interval: float = Field(default=300.0, gt=0, le=86400)
    zones: dict[Name, ZoneCfg] = Field(default_factory=dict)

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError("not an IPv4 or IPv6 address") from None

    @model_validator(mode="after")
    def _key_outside_data(self) -> CoreConfig:
        # The master key unwraps every day key: a copy of data_dir (a backup,
        # a stolen disk image) must not hold it, or encryption protects nothing.
        key, data = self.master_key.resolve(), self.data_dir.resolve()
        if key == data or key.is_relative_to(data):
            raise ValueError(f"master_key {self.master_key} is inside data_dir {self.data_dir}; "
                             "keep it elsewhere (a copy of the data must not carry its key)")
        if self.max_expanded_bytes < self.max_body_bytes:
            raise ValueError("max_expanded_bytes is smaller than max_body_bytes")
        return self


def parse_config(data: object, source: str = "<config>") -> CoreConfig:
    """Validate a mapping; ConfigError lists every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    try:
        return CoreConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e, data)) from None


def load_config(path: str | Path) -> CoreConfig:
    """Read and validate a core config file; ConfigError names file, path, value, why."""
    return parse_config(read_yaml_mapping(path), str(path))


def core_config_dict(zones: Iterable[str | Mapping[str, Any] | Any], *, listen: str,
                     cert: str | Path, key: str | Path, ca: str | Path,
                     data_dir: str | Path, master_key: str | Path, port: int = 8443,
                     region: str | None = None, retention_days: int = MAX_RETENTION_DAYS,
                     sample_retention_days: int = 7, sweep_interval: float = 300.0,
                     ) -> dict[str, Any]:
    """A core config (the mapping YAML holds) for these zones; it is validated
    before it is returned, so a bad one raises ConfigError here.

    A zone is a name, a mapping or an object with `name` (lab/topology.yaml's
    zones, or lab.topology.Zone). Of a zone's settings only these are read:
    `log_region` (else its `region`: a Regional Services zone logs in its
    region), `retention_days` (else the default given here) and `logpush`;
    the rest (hostnames, addresses, l7) belongs to the edge and is ignored.
    """
    out: dict[str, Any] = {}
    for z in zones:
        if isinstance(z, str):
            z = {"name": z}
        elif not isinstance(z, Mapping):
            z = {"name": z.name, "region": getattr(z, "region", None)}
        name = z.get("name")
        log_region = z.get("log_region", z.get("region"))
        entry: dict[str, Any] = {"retention_days": z.get("retention_days", retention_days)}
        if log_region is not None:
            entry["log_region"] = log_region
        if z.get("logpush"):
            entry["logpush"] = list(z["logpush"])
        if name in out:
            raise ConfigError(f"zones: {name!r} is named twice")
        out[name] = entry
    data: dict[str, Any] = {
        "listen": listen, "port": port, "cert": str(cert), "key": str(key), "ca": str(ca),
        "data_dir": str(data_dir), "master_key": str(master_key),
        "sample_retention_days": sample_retention_days, "sweep_interval": sweep_interval,
        "zones": out}
    if region is not None:
        data["region"] = region
    parse_config(data, "<core_config_dict>")
    return data
