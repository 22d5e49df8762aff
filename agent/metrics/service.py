"""The agent's metrics, assembled: the registry with its collectors, the
/metrics server over mTLS, and the RTT probes of peer DCs when configured.
The daemon (agent/daemon.py) starts, reloads (SIGHUP) and stops it."""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from prometheus_client.registry import Collector

from agent.config import ConfigError
from agent.metrics.config import MetricsConfig
from agent.metrics.registry import AllowlistRegistry
from agent.metrics.rtt import RttCollector, RttProber
from agent.metrics.server import MetricsServer


class MetricsService:
    def __init__(self, cfg: MetricsConfig, collectors: Iterable[Collector]) -> None:
        """ConfigError names what did not load or bind."""
        self.cfg = cfg
        registry = AllowlistRegistry()
        for collector in collectors:
            registry.register(collector)
        self.prober: RttProber | None = None
        try:
            if cfg.rtt is not None:
                r = cfg.rtt
                self.prober = RttProber(r.peers, r.port, cfg.tls, r.interval, r.timeout)
                registry.register(RttCollector(self.prober))
            self.server = MetricsServer(registry, cfg.listen, cfg.port, cfg.tls)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"metrics on [{cfg.listen}]:{cfg.port}: {e}") from None

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> MetricsService:
        try:
            self.server.start()
        except OSError as e:
            raise ConfigError(f"metrics on [{self.cfg.listen}]:{self.cfg.port}: {e}") from None
        if self.prober is not None:
            self.prober.start()
        return self

    def reload(self) -> None:
        """The reissued certificates; raises (keeping the old ones) if they do not load."""
        self.server.reload()
        if self.prober is not None:
            self.prober.reload()

    def stop(self) -> None:
        if self.prober is not None:
            self.prober.stop()
        self.server.stop()
