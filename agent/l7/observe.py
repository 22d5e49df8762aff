"""What an answered request leaves behind, and nothing more.

Http1Protocol calls an observer once per response it finished writing
(agent/l7/http1.py Observe). The front end binds one per connection with
what the connection knows: the zone of its TLS session (plain HTTP: of
each request's Host), the client's address and the TLS version. Then:

  metrics    always: the zone's count by status class and cache status,
             and its response time histogram (agent/l7/counters.py), labels
             from closed sets only
  logs       for zones that keep customer logs: one record tuple in
             agent/logs/records.py LOG_FIELDS order, handed to the log
             router, which ships it to the zone's log region's core
  sample     for every request, a CSPRNG draw; a sampled one becomes a
             sample record (no path, host or user agent) whose client is a
             keyed HMAC pseudonym, never the address

Everything past the metrics is one tuple built and one deque append on the
event loop; encoding, compression and shipping run in the shippers' threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Protocol

from agent.l7.counters import Counters
from agent.l7.http1 import Request, Response


class LogSink(Protocol):
    def submit(self, zone: str, record: tuple) -> None: ...


class SampleSink(Protocol):
    def draw(self) -> bool: ...
    def pseudonym(self, address: str) -> tuple[str, str]: ...
    def submit(self, record: tuple) -> None: ...


def user_agent(headers: tuple[tuple[str, str], ...]) -> str:
    for name, value in headers:
        if name == "user-agent":
            return value
    return ""


class Observer:
    """One per front end; `bind` makes a connection's Observe callable."""

    def __init__(self, dc: str, counters: Counters, logs: LogSink | None = None,
                 log_zones: Collection[str] = (), sample: SampleSink | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.dc, self.counters, self.clock = dc, counters, clock
        self.logs = logs
        self.log_zones = frozenset(log_zones) if logs is not None else frozenset()
        self.sample = sample

    def bind(self, zone: str, client: str, tls_version: str
             ) -> Callable[[Request, Response, int, float], None]:
        """The observer of a TLS connection of `zone`."""
        def observe(request: Request, response: Response, sent: int, seconds: float) -> None:
            self.finished(zone, client, tls_version, request, response, sent, seconds)
        return observe

    def finished(self, zone: str, client: str, tls_version: str, request: Request,
                 response: Response, sent: int, seconds: float) -> None:
        self.counters.response(zone, response.status, response.cache, seconds)
        if zone in self.log_zones:
            self.logs.submit(zone, (  # type: ignore[union-attr]
                round(self.clock(), 3), zone, self.dc, request.method,
                (request.host or "").lower(), request.target, response.status, sent,
                response.cache.lower(), str(response.action), client,
                user_agent(request.headers)))
        sample = self.sample
        if sample is not None and sample.draw():
            pseudonym, period = sample.pseudonym(client)
            sample.submit((
                round(self.clock(), 3), self.dc, zone, request.method, response.status, sent,
                response.cache.lower(), str(response.action), round(seconds * 1000, 3),
                tls_version, pseudonym, period))
