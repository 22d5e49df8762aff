"""A zone's business logic, in DESIGN.md's order, before anything is answered.

    page rules   a forwarding URL answers with its redirect; always-HTTPS
                 answers plain HTTP with one
    firewall     block (403), challenge (the bot challenge decides, later),
                 allow (the rest of the security stages are skipped), log,
                 skip (the rest of the firewall rules are skipped)
    rate limits  over the rate: 429 with Retry-After

`ZonePipeline.run` returns the response that ends a request here, or
None with the page rule settings and the split request-target for the next
stages (WAF, cache, origin).
Built from the zone's config once; a reload builds new ones and swaps
them in by reference. Nothing about a request outlives `run`, except the
rate limiter's per-client counters (in memory, bounded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.l7.config import Zone
from agent.l7.counters import Counters, RuleAction
from agent.l7.firewall import Firewall, RequestView, Rule
from agent.l7.geo import CountryTable
from agent.l7.guard import host_name
from agent.l7.http1 import Request, Response
from agent.l7.pagerules import NO_SETTINGS, Forward, PageRule, PageRules, Settings
from agent.l7.ratelimit import RateLimiter, RateRule

FW_ACTIONS = {"block": RuleAction.FW_BLOCK, "challenge": RuleAction.FW_CHALLENGE,
              "allow": RuleAction.FW_ALLOW, "skip": RuleAction.FW_SKIP}


@dataclass(slots=True)  # per request: frozen ones cost more to build
class Outcome:
    response: Response | None       # set: the request ends here
    settings: Settings              # the page rule settings for what follows
    allowed: bool = False           # a firewall allow rule matched
    challenge: bool = False         # a firewall challenge rule matched: the bot
                                    # challenge decides (agent/l7/proxy.py)
    # The request-target split once, for the stages after (set when the
    # request goes on): origin-form target, path, query.
    target: str = ""
    path: str = ""
    query: str = ""


def _cookie_names(header: str) -> frozenset[str]:
    return frozenset(part.split("=", 1)[0].strip() for part in header.split(";") if part.strip())


class ZonePipeline:
    def __init__(self, zone: Zone, counters: Counters,
                 countries: CountryTable | None = None) -> None:
        self.zone = zone.name
        self.counters = counters
        self.countries = countries or CountryTable({})
        self.page_rules = PageRules([
            PageRule(r.pattern, Settings(
                cache_level=r.cache_level, edge_ttl=r.edge_ttl, always_https=r.always_https,
                forwarding_url=(Forward(r.forwarding_url.status, r.forwarding_url.url)
                                if r.forwarding_url else None),
                disable_waf=r.disable_waf))
            for r in zone.page_rules])
        self.firewall = Firewall([Rule(r.expression, r.action, r.description)
                                  for r in zone.firewall])
        # The country table is consulted only by rules that ask for it.
        self.uses_country = any("ip.geoip.country" in r.expression for r in zone.firewall)
        self.rate_limiter = RateLimiter([
            RateRule(r.name, r.requests, r.period, r.block, r.key, r.header, r.path_prefix)
            for r in zone.rate_limits])
        # A zone without page rules, firewall rules and rate limits (a cache
        # in front of a site) has nothing to decide here.
        self.no_rules = not (zone.page_rules or zone.firewall or zone.rate_limits)

    def run(self, request: Request, client: str, tls: bool,
            now: float | None = None) -> Outcome:
        # An absolute-form target (already checked to name the Host) counts
        # by its path, like an origin-form one.
        target = request.target
        if "://" in target:
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path, _, query = target.partition("?")
        if self.no_rules:
            return Outcome(None, NO_SETTINGS, False, False, target, path, query)
        now = time.monotonic() if now is None else now
        host = host_name(request.host) or ""
        match = self.page_rules.match(host, path, query)
        settings = match.settings
        if match.redirect is not None:
            self.counters.action(self.zone, RuleAction.PAGE_REDIRECT)
            return Outcome(Response(match.redirect[0], b"", [("Location", match.redirect[1])],
                                    action=RuleAction.PAGE_REDIRECT), settings)
        if settings.always_https and not tls:
            self.counters.action(self.zone, RuleAction.HTTPS_REDIRECT)
            return Outcome(Response(301, b"", [("Location", f"https://{host}{target}")],
                                    action=RuleAction.HTTPS_REDIRECT), settings)

        challenge = False
        if not self.firewall.rules and not self.rate_limiter.rules:
            return Outcome(None, settings, False, challenge, target, path, query)
        headers = dict(request.headers)
        if self.firewall.rules:
            view = RequestView(src=client, method=request.method, host=host, path=path,
                               query=query, headers=headers,
                               cookies=_cookie_names(headers.get("cookie", "")),
                               country=self.countries.country(client) if self.uses_country
                               else "")
            verdict = self.firewall.evaluate(view)
            for _ in verdict.logged:
                self.counters.action(self.zone, RuleAction.FW_LOG)
            if verdict.action is not None:
                self.counters.action(self.zone, FW_ACTIONS[verdict.action])
            if verdict.action == "block":
                return Outcome(Response(403, b"403 Forbidden: blocked by a firewall rule\n",
                                        action=RuleAction.FW_BLOCK), settings)
            if verdict.action == "allow":
                return Outcome(None, settings, allowed=True, target=target, path=path,
                               query=query)
            challenge = verdict.action == "challenge"

        if not self.rate_limiter.rules:
            return Outcome(None, settings, False, challenge, target, path, query)
        limited = self.rate_limiter.check(client, path, headers, now)
        if not limited.allowed:
            self.counters.action(self.zone, RuleAction.RATE_LIMITED)
            return Outcome(Response(429, b"429 Too Many Requests\n",
                                    [("Retry-After", str(limited.retry_after))],
                                    action=RuleAction.RATE_LIMITED), settings)
        return Outcome(None, settings, False, challenge, target, path, query)
