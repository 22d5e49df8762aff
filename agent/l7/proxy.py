"""One zone's request path after the guard: rules, protection, cache, origin.

    page rules → firewall → rate limits       agent/l7/pipeline.py
    WAF (unless a page rule disables it)       agent/l7/waf/
    bots: known attack tools are refused; a score over the zone's
          threshold (or a firewall "challenge") meets the cookie challenge
    credential stuffing on login paths         agent/l7/credstuff.py
    cache (GET/HEAD)                           agent/l7/cache.py
    origin (streamed)                          agent/l7/origin.py

A firewall "allow" skips the rest of the security stages (rate limits,
WAF, bots, login checks), not the cache. `ZoneProxy.handle` returns the
response; an origin body is streamed to the client as it arrives (and
copied into the cache when it may be stored and fits). Nothing about a
request is logged; what the stages decide is counted by enum.

A ZoneProxy is built once per zone and config; a reload builds new ones.
The cache store and the challenge key are the front end's, shared by zones
(the store is handed over when the front end starts).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable

from agent.l7.bots import Challenge, assess
from agent.l7.cache import CACHE_STATUS_HEADER, Cache, Lookup
from agent.l7.config import ServeConfig, Zone
from agent.l7.counters import Counters, RuleAction
from agent.l7.credstuff import CredentialGuard, LoginCheck, forward_headers
from agent.l7.forward import HOP_BY_HOP, looped, origin_headers
from agent.l7.geo import CountryTable
from agent.l7.http1 import Request, Response
from agent.l7.origin import Origin, OriginError, OriginStream
from agent.l7.pagerules import Settings
from agent.l7.pipeline import ZonePipeline
from agent.l7.waf import Waf

BAD_AGENT_SCORE = 100    # bots.assess: a known attack tool
# Answered by the edge itself in every zone: which DC and zone served the
# request (operators and the lab ask it; nothing about the client is in it).
TRACE_PATH = "/cdn-cgi/trace"
# What an origin's response head must not carry on to the client: its own
# connection's headers, and framing that the front end sets itself.
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


class ZoneProxy:
    def __init__(self, cfg: ServeConfig, zone: Zone, counters: Counters,
                 countries: CountryTable, challenge: Challenge) -> None:
        self.dc, self.region = cfg.dc, cfg.region
        self.zone = zone
        self.counters = counters
        self.client_ip_header = cfg.client_ip_header
        self.hsts = None if zone.hsts is None else ("Strict-Transport-Security",
                                                    zone.hsts.header)
        self.pipeline = ZonePipeline(zone, counters, countries)
        self.waf = Waf(zone.waf)
        self.challenge = challenge
        self.cache: Cache = None  # type: ignore[assignment]  # the front end's, set at start
        self.logins = CredentialGuard(zone.login) if zone.login.endpoints else None
        o = zone.origin
        self.origin = None if o is None else Origin(
            o.url, verify=o.verify, ca_file=o.ca_file, server_name=o.server_name,
            pool=o.pool, connect_timeout=o.connect_timeout, head_timeout=o.response_timeout,
            read_timeout=o.read_timeout)

    async def close(self) -> None:
        if self.origin is not None:
            await self.origin.close()

    def handle(self, request: Request, client: str, tls: bool
               ) -> Response | Awaitable[Response]:
        """The answer, at once when the edge has it (a refusal, a cache hit),
        else an awaitable of the origin's."""
        answer = self._route(request, client, tls)
        if self.hsts is None or not tls:
            return answer
        if isinstance(answer, Response):
            answer.headers.append(self.hsts)
            return answer
        return self._with_hsts(answer)

    async def _with_hsts(self, answer: Awaitable[Response]) -> Response:
        response = await answer
        response.headers.append(self.hsts)  # type: ignore[arg-type]
        return response

    def _route(self, request: Request, client: str, tls: bool
               ) -> Response | Awaitable[Response]:
        name = self.zone.name
        outcome = self.pipeline.run(request, client, tls)
        if outcome.response is not None:
            return outcome.response
        settings = outcome.settings
        target, path, query = outcome.target, outcome.path, outcome.query
        login = LoginCheck.none
        if not outcome.allowed:
            refused = self._protect(request, client, tls, settings, outcome.challenge)
            if refused is not None:
                return refused
            if self.logins is not None:
                login = self.logins.before(request.method, path, dict(request.headers),
                                           request.body, client, time.monotonic())
                if login.leaked:
                    self.counters.action(name, RuleAction.LOGIN_LEAKED)
                if login.response is not None:
                    if login.response.status == 429:
                        self.counters.action(name, RuleAction.LOGIN_BLOCK)
                        login.response.action = RuleAction.LOGIN_BLOCK
                    else:
                        login.response.action = RuleAction.LOGIN_LEAKED
                    return login.response
        if looped(request.headers):
            self.counters.action(name, RuleAction.LOOP)
            return Response(508, b"508 Loop Detected\n", action=RuleAction.LOOP)

        if path == TRACE_PATH or self.origin is None:
            self.counters.served(name)
            return self._edge_answer(request)
        host = (request.host or "").lower()
        lookup = self.cache.lookup(self.zone.cache, settings, name, request.method, host, path,
                                   query, request.headers)
        if lookup.entry is not None and lookup.fresh:
            return self._from_cache(request, lookup)
        return self._fetch(request, client, tls, target, lookup, login, outcome.allowed)

    async def _fetch(self, request: Request, client: str, tls: bool, target: str,
                     lookup: Lookup, login: LoginCheck, allowed: bool) -> Response:
        """Ask the origin; answer from a revalidated entry or stream its body."""
        name = self.zone.name
        # Every request, login or not: a client's own Exposed-Credential-Check
        # must not reach the origin.
        headers = origin_headers(forward_headers(login, request.headers), client, tls,
                                 request.request_id, self.client_ip_header)
        # The cache's conditionals replace the client's (a 304 must answer ours).
        headers = lookup.origin_headers(headers)
        try:
            stream = await self.origin.open(request.method, target, headers, request.body)
        except OriginError as e:
            if self.logins is not None:
                self.logins.after(login, None)
            action = RuleAction.ORIGIN_TIMEOUT if e.status == 504 else RuleAction.ORIGIN_ERROR
            self.counters.action(name, action)
            reason = "Gateway Timeout" if e.status == 504 else "Bad Gateway"
            return Response(e.status, f"{e.status} {reason}\n".encode(), action=action,
                             cache=lookup.status)
        if self.logins is not None:
            self.logins.after(login, stream.status)
        if stream.status == 304 and lookup.entry is not None and lookup.revalidating:
            await stream.aclose()
            entry = self.cache.revalidated(lookup, stream.headers)
            return self._from_cache(request, self.cache.lookup_entry(lookup, entry))
        self.counters.served(name)
        self.cache.invalidate(lookup, stream.status)  # an unsafe method changed the URL
        response = self._from_origin(request, stream, lookup)
        if allowed:
            response.action = RuleAction.FW_ALLOW
        return response

    # -- stages ---------------------------------------------------------------------

    def _protect(self, request: Request, client: str, tls: bool, settings: Settings,
                 challenged: bool) -> Response | None:
        """WAF, then bots and the challenge; a response refuses the request."""
        name = self.zone.name
        if not settings.disable_waf and self.zone.waf.enabled:
            verdict = self.waf.inspect(request.method, request.target, request.headers,
                                       request.body)
            if verdict.blocked:
                self.counters.action(name, RuleAction.WAF_BLOCK)
                return Response(403, b"403 Forbidden: blocked by the web application "
                                     b"firewall\n", action=RuleAction.WAF_BLOCK)
            if verdict.matches:
                self.counters.action(name, RuleAction.WAF_SCORED)
        bots = self.zone.bots
        if bots.mode == "off" and not challenged:
            return None
        score = assess(request).score if bots.mode != "off" else 0
        if score >= BAD_AGENT_SCORE or (bots.mode == "block" and score >= bots.threshold):
            self.counters.action(name, RuleAction.BOT_BLOCK)
            return Response(403, b"403 Forbidden: automated client\n",
                            action=RuleAction.BOT_BLOCK)
        if challenged or score >= bots.threshold:
            if self.challenge.passes(request, client):
                self.counters.action(name, RuleAction.CHALLENGE_PASSED)
                return None
            self.counters.action(name, RuleAction.CHALLENGE_ISSUED)
            response = self.challenge.issue(request, client, tls, ttl=bots.challenge_ttl)
            response.action = RuleAction.CHALLENGE_ISSUED
            return response
        return None

    def _from_cache(self, request: Request, lookup: Lookup) -> Response:
        self.counters.served(self.zone.name)
        entry = lookup.entry
        if self.cache.not_modified_for_client(entry, request.headers, lookup.plain):
            headers = entry.response_headers(not_modified=True)
            headers.append((CACHE_STATUS_HEADER, lookup.status))
            return Response(304, b"", headers, content_type=None, cache=lookup.status)
        headers = [("age", str(entry.age(lookup.requested_at))),
                   (CACHE_STATUS_HEADER, lookup.status)]
        return Response(entry.status, entry.body, headers, content_type=None,
                        header_block=entry.header_block, cache=lookup.status)

    def _from_origin(self, request: Request, stream: OriginStream,
                     lookup: Lookup) -> Response:
        verdict = self.cache.would_store(lookup, stream.status, stream.headers, stream.length)
        headers = [(n, v) for n, v in stream.headers if n not in RESPONSE_DROP]
        headers.append((CACHE_STATUS_HEADER, verdict.status))
        body: AsyncIterator[bytes] = stream
        if request.method == "GET" and verdict.stored:
            body = self._tee(stream, lookup)
        return Response(stream.status, headers=headers, content_type=None, stream=body,
                        length=stream.length, cache=verdict.status)

    async def _tee(self, stream: OriginStream, lookup: Lookup) -> AsyncIterator[bytes]:
        """Pass the body on and keep a copy; store it once it ended whole and
        small enough (a body over the limit is passed on, not kept)."""
        parts: list[bytes] | None = []
        size, limit = 0, self.cache.max_object_bytes(self.zone.cache)
        try:
            async for chunk in stream:
                if parts is not None:
                    size += len(chunk)
                    if size > limit:
                        parts = None
                    else:
                        parts.append(chunk)
                yield chunk
        finally:
            await stream.aclose()
        if parts is not None:
            self.cache.store(lookup, stream.status, stream.headers, b"".join(parts))

    def _edge_answer(self, request: Request) -> Response:
        """The trace path, or any path of a zone without an origin: the edge
        says who answered."""
        body = json.dumps({"dc": self.dc, "region": self.region, "zone": self.zone.name,
                           "request_id": request.request_id}).encode() + b"\n"
        return Response(200, body, [("X-Privedge-DC", self.dc),
                                    ("X-Privedge-Zone", self.zone.name)],
                        content_type="application/json")
