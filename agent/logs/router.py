"""Which core each record goes to: a zone's logs to its log region's core,
the operations sample to its one core. Used by the L7 front end (submit)
and the daemon (start, reload, stop, the metrics collector).

    cfg = load_logs_config("/etc/privedge/logs.yaml")
    router = LogRouter(cfg, zone_regions={z.name: z.region for z in serve.zones}).start()
    submit = router.submitter("www")   # None: the zone is not logged
    if submit is not None:
        submit((time.time(), "www", "dus", ...))       # records.LOG_FIELDS order
    router.sample(record)              # records.SAMPLE_FIELDS order
    router.reload(); router.stop(5.0)

Every route is resolved here, once: a zone's route is a dict lookup to a
bound Shipper.submit. A regional zone goes only to the core that lists its
region; if none does, construction fails (ConfigError) instead of falling
back to another core (DESIGN.md invariant 2).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.config import ConfigError
from agent.logs.config import LogsConfig, cross_problems
from agent.logs.records import LOGS, SAMPLE
from agent.logs.shipper import Shipper
from agent.metrics.server import TlsFiles
from agent.metrics.tls import client_context

AGENT_CN = "{dc}.dc.privedge.internal"  # control/pki.py plan(): the core reads the DC from it


class ShipperLike(Protocol):
    def submit(self, record: tuple) -> None: ...
    def start(self) -> object: ...
    def stop(self, timeout: float, flush_first: bool = True) -> None: ...
    def flush(self, timeout: float) -> bool: ...
    def reload(self, tls: TlsFiles | None = None) -> None: ...
    def stats(self) -> dict[str, int | str]: ...


Submit = Callable[[tuple], None]


def make_shipper(cfg: LogsConfig, stream: str, core: str) -> Shipper:
    """A real Shipper for (stream, core) with logs.yaml's settings."""
    c = cfg.cores[core]
    return Shipper(dc=cfg.dc, stream=stream, core=core, url=c.url, tls=cfg.tls,
                   tls_name=c.tls_name, batch_records=cfg.batch_records,
                   batch_seconds=cfg.batch_seconds, buffer_bytes=cfg.buffer_bytes,
                   max_pending_records=cfg.max_pending_records,
                   max_pending_bytes=cfg.max_pending_bytes, gzip_level=cfg.gzip_level,
                   timeout=cfg.timeout_seconds)


def check_identity(cfg: LogsConfig) -> None:
    """The certificate must name this DC: the core takes the DC from it and
    answers 403 to every batch whose id names another (retried forever)."""
    try:
        cert = x509.load_pem_x509_certificate(cfg.cert.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cert {cfg.cert}: cannot load ({e})") from None
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    want = AGENT_CN.format(dc=cfg.dc)
    if cns != [want]:
        raise ConfigError(f"cert {cfg.cert}: subject CN {', '.join(map(str, cns)) or 'none'}, "
                          f"but dc is {cfg.dc!r} (expected CN {want}): the core would refuse "
                          "every batch (403)")


def region_problems(cfg: LogsConfig, zone_regions: Mapping[str, str | None]
                    ) -> list[str]:
    """A zone restricted to a region by the serve config must log to that region."""
    out = []
    for zone, region in zone_regions.items():
        z = cfg.zones.get(zone)
        if region is None or z is None or not z.enabled or z.log_region == region:
            continue
        out.append(f"zones.{zone}.log_region: {z.log_region!r}: zone {zone} is restricted "
                   f"to region {region} by the serve config, so its logs must stay there "
                   f"(set log_region: {region})")
    return out


class LogRouter:
    """Zone → Shipper.submit, resolved once; the sample → its shipper."""

    def __init__(self, cfg: LogsConfig,
                 shipper_factory: Callable[[LogsConfig, str, str], ShipperLike] = make_shipper,
                 zone_regions: Mapping[str, str | None] | None = None) -> None:
        # cfg was validated on load; checked again because a LogsConfig can be
        # built without validation, and a wrong route here leaks a region's logs.
        problems = [f"{path}: {value!r}: {why}" for path, value, why in cross_problems(cfg)]
        problems += region_problems(cfg, zone_regions or {})
        if problems:
            raise ConfigError("logs config: " + "\n".join(problems))
        if shipper_factory is make_shipper:
            check_identity(cfg)
        self.cfg = cfg
        self.shippers: dict[tuple[str, str], ShipperLike] = {}  # (stream, core) → shipper

        def shipper(stream: str, core: str) -> ShipperLike:
            if (stream, core) not in self.shippers:
                self.shippers[stream, core] = shipper_factory(cfg, stream, core)
            return self.shippers[stream, core]

        routes: dict[str, Submit] = {}
        for zone, z in cfg.zones.items():
            core = cfg.log_core(zone)
            if core is None:
                continue
            if z.log_region is not None and z.log_region not in cfg.cores[core].regions:
                raise ConfigError(f"logs config: zones.{zone}: would go to core {core}, "
                                  f"outside region {z.log_region}")  # cannot happen: guard
            routes[zone] = shipper(LOGS, core).submit
        self._routes = routes
        sample_core = cfg.sample_core
        self._sample: Submit | None = None if sample_core is None \
            else shipper(SAMPLE, sample_core).submit

    def submitter(self, zone: str) -> Submit | None:
        """The zone's submit (one dict lookup), or None: its logs are off."""
        return self._routes.get(zone)

    def log(self, zone: str, record: tuple) -> bool:
        """Submit a log record for `zone`; False if the zone is not logged."""
        submit = self._routes.get(zone)
        if submit is None:
            return False
        submit(record)
        return True

    def sample(self, record: tuple) -> bool:
        """Submit a sample record; False if the sample is off (rate 0)."""
        if self._sample is None:
            return False
        self._sample(record)
        return True

    def start(self) -> LogRouter:
        for s in self.shippers.values():
            s.start()
        return self

    def reload(self, tls: TlsFiles | None = None) -> None:
        """Reissued certificates for every shipper's next connection; raises
        (before changing any shipper) if they do not load."""
        client_context(tls or self.cfg.tls)  # fail before touching any shipper
        for s in self.shippers.values():
            s.reload(tls)

    def flush(self, timeout: float) -> bool:
        """Every shipper flushed within one shared `timeout`."""
        deadline = time.monotonic() + timeout
        return all([s.flush(max(0.0, deadline - time.monotonic()))
                    for s in self.shippers.values()])

    def stop(self, timeout: float = 5.0) -> None:
        """Flush all for at most `timeout` together, then stop each without
        a flush of its own (a core that is down would cost it again)."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        for s in self.shippers.values():
            s.stop(max(0.1, deadline - time.monotonic()), flush_first=False)

    def stats(self) -> list[tuple[str, str, dict[str, int | str]]]:
        """(stream, core, Shipper.stats()) for each shipper."""
        return [(stream, core, s.stats()) for (stream, core), s in self.shippers.items()]
