"""The Regional Services guard: never inspect a regional zone outside its region.

Pure decisions over a ServeConfig, no sockets, so every case is a unit test.
The server asks three questions, each before it would learn more:

  by_address(local_ip)   at accept, before any TLS byte is read: is the
                         address the client dialled a dedicated IP of a zone
                         of another region? (XDP should have steered it
                         away; if it did not, e.g. it was detached, refuse.)
  by_sni(sni)            in the ClientHello, before a certificate is chosen:
                         which zone, and may this DC terminate TLS for it?
  by_host(host, zone)    after the request head: does the Host header name
                         the zone whose certificate was presented? Otherwise
                         a client could say SNI www and Host shop.example.eu
                         and have a foreign regional zone's request read here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.l7.config import REFUSE, ServeConfig, Zone, normalise_ip


class Action(enum.StrEnum):
    SERVE = "serve"
    REFUSE = "refuse"


class Reason(enum.StrEnum):
    """Why a decision was taken. Refusal values match counters.Refusal."""

    ADDRESS = "address"            # admitted at accept: not a foreign zone's address
    SNI = "sni"                    # served: the SNI names a zone this DC may inspect
    DEFAULT = "default"            # served: unknown or missing SNI, default zone
    HOST = "host"                  # served: Host names the zone of the TLS session
    REGION_ADDRESS = "region_address"
    REGION_SNI = "region_sni"
    UNKNOWN_SNI = "unknown_sni"
    MISDIRECTED = "misdirected"    # Host names another zone than the TLS session's


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    zone: str | None
    reason: Reason

    @property
    def serve(self) -> bool:
        return self.action is Action.SERVE


def _refuse(reason: Reason, zone: str | None = None) -> Decision:
    return Decision(Action.REFUSE, zone, reason)


class Guard:
    """Answers serve/refuse for one DC's region and one immutable config.

    A new config means a new Guard, swapped by reference: nothing here
    changes after construction, so it is safe to share between threads.
    """

    def __init__(self, cfg: ServeConfig) -> None:
        self.dc = cfg.dc
        self.region = cfg.region
        self._by_addr: dict[str, Zone] = {a: z for z in cfg.zones for a in z.addresses}
        self._exact: dict[str, Zone] = {}
        self._wild: dict[str, Zone] = {}   # "example.com" for "*.example.com"
        for z in cfg.zones:
            for h in z.hostnames:
                if h.startswith("*."):
                    self._wild[h[2:]] = z
                else:
                    self._exact[h] = z
        self._default = None if cfg.unknown_sni == REFUSE else cfg.zone(cfg.unknown_sni)
        self.servable: tuple[str, ...] = tuple(z.name for z in cfg.zones if self.local(z))
        # Decisions are immutable: the serving ones are made once, not per connection.
        self._host_ok = {z.name: Decision(Action.SERVE, z.name, Reason.HOST) for z in cfg.zones}
        self._served = {(z.name, r): Decision(Action.SERVE, z.name, r)
                        for z in cfg.zones for r in (Reason.SNI, Reason.DEFAULT, Reason.ADDRESS)}
        self._no_address_zone = Decision(Action.SERVE, None, Reason.ADDRESS)

    def local(self, zone: Zone) -> bool:
        """May this DC inspect `zone`? Global zones: yes; regional: only in region."""
        return zone.region is None or zone.region == self.region

    def lookup(self, hostname: str | None) -> Zone | None:
        """The zone a hostname belongs to: exact names first, then '*.' one label."""
        if not hostname:
            return None
        host = hostname.strip().lower().removesuffix(".")
        zone = self._exact.get(host)
        if zone is None and "." in host:
            zone = self._wild.get(host.split(".", 1)[1])
        return zone

    @property
    def checks_addresses(self) -> bool:
        """Can by_address refuse anything? Only when a zone has dedicated addresses."""
        return bool(self._by_addr)

    def by_address(self, local_ip: str) -> Decision:
        """Accept-time check on the local address the client connected to.

        Raises ValueError if `local_ip` is not an address (a caller bug) and
        some zone has dedicated addresses to compare it with.
        """
        if not self._by_addr:  # no zone has dedicated addresses: nothing to refuse
            return self._no_address_zone
        zone = self._by_addr.get(normalise_ip(local_ip))
        if zone is None:
            return self._no_address_zone
        if not self.local(zone):
            return _refuse(Reason.REGION_ADDRESS, zone.name)
        return self._served[zone.name, Reason.ADDRESS]

    def by_sni(self, sni: str | None) -> Decision:
        """ClientHello-time check: which zone's certificate, or refuse."""
        zone = self.lookup(sni)
        reason = Reason.SNI
        if zone is None:
            if self._default is None:
                return _refuse(Reason.UNKNOWN_SNI)
            zone, reason = self._default, Reason.DEFAULT
        if not self.local(zone):
            # Also when the default zone is a foreign regional one: the same
            # config goes to every DC, so only the guard can say no here.
            return _refuse(Reason.REGION_SNI, zone.name)
        return self._served[zone.name, reason]

    def by_host(self, host: str | None, tls_zone: str) -> Decision:
        """Request-time check: the Host header must resolve to the TLS zone.

        `host` may carry a port ("shop.example.eu:443") or be a bracketed
        IPv6 literal. A Host naming no zone resolves like an unknown SNI.
        """
        exact = self._exact.get(host) if host else None  # as sent: "www.example.com"
        if exact is not None and exact.name == tls_zone:
            return self._host_ok[tls_zone]
        name = host_name(host)
        zone = self.lookup(name) or self._default
        if zone is None or zone.name != tls_zone:
            return _refuse(Reason.MISDIRECTED, tls_zone)
        return Decision(Action.SERVE, tls_zone, Reason.HOST)


def host_name(host: str | None) -> str | None:
    """The name part of a Host header value (no port, no IPv6 brackets)."""
    if not host:
        return None
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
