"""The agent's log path, assembled for the daemon (agent/daemon.py):
logs.yaml's router and shippers, the sampler, and this process's one
pseudonymizer (its key lives as long as the process, rotating daily, so a
reload never changes a day's pseudonyms).

    logs = LogService(load_logs_config("logs.yaml"), serve_cfg).start()
    run_in_thread(serve_cfg, logs=logs.submitters(serve_cfg), sample=logs.sampling())
    logs.reload()          # SIGHUP: reissued certificates
    logs.stop(5.0)         # flush what is pending, bounded
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.config import ConfigError
from agent.l7.config import ServeConfig
from agent.l7.observe import Sampling, Submit
from agent.logs.config import LogsConfig
from agent.logs.router import LogRouter, region_problems
from agent.logs.sampler import Pseudonymizer, Sampler


class LogService:
    def __init__(self, cfg: LogsConfig, serve: ServeConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """ConfigError if the routes or the certificate do not fit (router.py);
        a regional zone of the serve config must log to its own region.
        `clock` is the pseudonyms' (their key rotates each UTC day of it):
        tests move it past midnight."""
        self.cfg = cfg
        regions = {} if serve is None else {z.name: z.region for z in serve.zones}
        self.router = LogRouter(cfg, zone_regions=regions)
        self.sampler = Sampler(cfg.sample.rate)
        self.pseudonyms = Pseudonymizer(clock)

    def submitters(self, serve: ServeConfig) -> dict[str, Submit]:
        """Zone -> its shipper's submit, for the served zones that keep logs.
        ConfigError if a zone the serve config restricts to a region (a
        reloaded one, say) would log elsewhere than that region's core."""
        problems = region_problems(self.cfg, {z.name: z.region for z in serve.zones})
        if problems:
            raise ConfigError("logs config: " + "\n".join(problems))
        return {z.name: submit for z in serve.zones
                if (submit := self.router.submitter(z.name)) is not None}

    def sampling(self) -> Sampling | None:
        if self.cfg.sample_core is None:
            return None
        return Sampling(self.sampler.draw, self.pseudonyms.pseudonym, self.router.sample)

    def start(self) -> LogService:
        self.router.start()
        return self

    def reload(self) -> None:
        """Reissued certificates for the next connections; raises if they do not load."""
        self.router.reload()

    def stop(self, timeout: float = 5.0) -> None:
        self.router.stop(timeout)
