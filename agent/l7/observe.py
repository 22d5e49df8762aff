"""What an answered request leaves behind, and nothing more.

Http1Protocol calls an observer once per response it finished writing
(agent/l7/http1.py Observe). The front end binds one per connection with
what the connection knows: the zone of its TLS session (plain HTTP: of
each request's Host), the client's address and the TLS version. Then:

  metrics    always: the zone's count by status class and cache status,
             and its response time histogram (agent/l7/counters.py), labels
             from closed sets only
  logs       for zones that keep customer logs (agent/logs/config.py): one
             record tuple in agent/logs/records.py LOG_FIELDS order, handed
             to the shipper of the zone's log region's core
  sample     for every request, a CSPRNG draw (agent/logs/sampler.py); a
             sampled one becomes a sample record (SAMPLE_FIELDS: no path,
             host or user agent) whose client is a keyed HMAC pseudonym,
             never the address

Past the metrics, a request costs one tuple and one deque append on the
event loop; checking, encoding, compression and shipping run in the
shippers' threads (agent/logs/shipper.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from agent.l7.counters import Counters
from agent.l7.http1 import Request, Response

Submit = Callable[[tuple], None]


@dataclass(frozen=True)
class Sampling:
    """The operations sample: a draw per request, the pseudonym of a sampled
    one's client, and where its record goes."""

    draw: Callable[[], bool]
    pseudonym: Callable[[str], tuple[str, str]]    # address -> (pseudonym, key period)
    submit: Submit


def user_agent(headers: tuple[tuple[str, str], ...]) -> str:
    for name, value in headers:
        if name == "user-agent":
            return value
    return ""


class Observer:
    """One per front end; `bind` makes a connection's Observe callable.

    `logs`: zone -> the submit of its log shipper, for the zones that keep
    customer logs; `sample`: None when the sample is off."""

    def __init__(self, dc: str, counters: Counters, logs: Mapping[str, Submit] | None = None,
                 sample: Sampling | None = None, clock: Callable[[], float] = time.time) -> None:
        self.dc, self.counters, self.clock = dc, counters, clock
        self.logs = dict(logs or {})
        self.sample = sample

    def bind(self, zone: str, client: str, tls_version: str
             ) -> Callable[[Request, Response, int, float], None]:
        """The observer of a TLS connection of `zone` (a partial: one call less
        per request than a closure)."""
        return partial(self.finished, zone, client, tls_version)

    def finished(self, zone: str, client: str, tls_version: str, request: Request,
                 response: Response, sent: int, seconds: float) -> None:
        self.counters.response(zone, response.status, response.cache, seconds)
        submit = self.logs.get(zone)
        if submit is not None:
            submit((self.clock(), zone, self.dc, request.method, request.host or "",
                    request.target, response.status, sent, response.cache, response.action,
                    client, user_agent(request.headers)))
        sample = self.sample
        if sample is not None and sample.draw():
            pseudonym, period = sample.pseudonym(client)
            sample.submit((self.clock(), self.dc, zone, request.method, response.status, sent,
                           response.cache, response.action, seconds * 1000, tls_version,
                           pseudonym, period))
