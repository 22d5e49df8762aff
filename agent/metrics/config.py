"""Where the agent serves /metrics, and with which certificates.

    listen: 198.18.0.1          # the backbone address: core's Prometheus scrapes it
    port: 9443
    cert: /etc/privedge/pki/agents/dus.crt   # from privedge-pki (control/pki.py)
    key: /etc/privedge/pki/agents/dus.key
    ca: /etc/privedge/pki/ca.crt             # clients must hold a certificate it issued
    rtt:                        # optional: probe each peer DC (agent/metrics/rtt.py)
      interval: 5               # seconds between rounds
      peers: {fra: 198.18.0.2, iad: 198.18.0.3}   # DC name -> backbone address
      port: 9443                # the peers' metrics port
"""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from agent.config import ConfigError, Frozen, _format_errors, read_yaml_mapping
from agent.metrics.server import TlsFiles


class RttConfig(Frozen):
    interval: float = Field(default=5.0, gt=0, le=3600)
    timeout: float = Field(default=2.0, gt=0, le=60)
    port: int = Field(default=9443, ge=1, le=65535)
    peers: dict[str, str] = Field(min_length=1)

    @field_validator("peers")
    @classmethod
    def _addresses(cls, value: dict[str, str]) -> dict[str, str]:
        return {dc: str(ip_address(a)) for dc, a in value.items()}


class MetricsConfig(Frozen):
    listen: str
    port: int = Field(default=9443, ge=0, le=65535)  # 0: a free port (tests)
    cert: Path
    key: Path
    ca: Path
    rtt: RttConfig | None = None

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        return str(ip_address(value))  # ValueError names the bad text

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.cert, self.key, self.ca)


def load_metrics_config(path: str | Path) -> MetricsConfig:
    """Read and validate a metrics config; ConfigError lists every problem."""
    data = read_yaml_mapping(path)
    try:
        return MetricsConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e, data)) from None
