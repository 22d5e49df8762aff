"""Bot protection: known-bad clients, header heuristics, a cookie challenge.

  assess()     a score from what a request looks like: a user agent of a
               known attack tool or scanner (block outright), a browser's
               user agent without the headers every browser sends (Accept,
               Accept-Language, Accept-Encoding), Host not among the first
               headers (browsers put it first), no user agent at all
  Challenge    a JavaScript-free check: the edge answers 302 to the same
               URL with a signed cookie; a client that keeps cookies comes
               back with it and passes (browsers do, and curl with a
               cookie jar: `curl -b jar -c jar -L`). The cookie binds the
               client's address and user agent and expires; its key lives
               in memory only (a restart asks again, nothing to leak)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from urllib.parse import quote

from agent.l7.http1 import Request, Response

BAD_AGENTS = ("sqlmap", "nikto", "nmap", "masscan", "zgrab", "nuclei", "dirbuster",
              "gobuster", "wpscan", "acunetix", "nessus", "openvas", "w3af", "havij",
              "hydra", "fimap", "jaeles", "ffuf", "feroxbuster")
BROWSER_HEADERS = ("accept", "accept-language", "accept-encoding")
COOKIE = "__pe_bot"


@dataclass(slots=True)  # per request: frozen ones cost more to build
class Assessment:
    score: int                 # 0 clean .. 100 certainly a bot
    reasons: tuple[str, ...]   # enum-like labels, for counters


def assess(request: Request) -> Assessment:
    headers = dict(request.headers)
    ua = headers.get("user-agent", "")
    low = ua.lower()
    if any(tool in low for tool in BAD_AGENTS):
        return Assessment(100, ("bad_agent",))
    score, reasons = 0, []
    if not ua:
        score += 40
        reasons.append("no_agent")
    if "mozilla/" in low:
        missing = [h for h in BROWSER_HEADERS if h not in headers]
        if missing:
            score += 20 * len(missing)
            reasons.append("browser_missing_headers")
        names = [n for n, _ in request.headers]
        if "host" in names and names.index("host") > 1:
            score += 20
            reasons.append("header_order")
    return Assessment(min(score, 100), tuple(reasons))


class Challenge:
    """Signed-cookie challenge; one per front end (its key is process memory)."""

    def __init__(self, ttl: float = 3600, key: bytes | None = None) -> None:
        self.ttl = ttl
        self._key = key or os.urandom(32)

    def _mac(self, client: str, agent: str, expires: int) -> str:
        msg = f"{client}\n{agent}\n{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def passes(self, request: Request, client: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        headers = dict(request.headers)
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name != COOKIE:
                continue
            expires, _, mac = value.partition(".")
            if not expires.isdigit() or int(expires) < now:
                return False
            want = self._mac(client, headers.get("user-agent", ""), int(expires))
            return hmac.compare_digest(mac, want)
        return False

    def issue(self, request: Request, client: str, tls: bool,
              now: float | None = None, ttl: float | None = None) -> Response:
        """302 back to the same URL with the cookie that passes next time;
        `ttl` (a zone's challenge_ttl) overrides the default lifetime."""
        now = time.time() if now is None else now
        ttl = self.ttl if ttl is None else ttl
        expires = int(now + ttl)
        mac = self._mac(client, dict(request.headers).get("user-agent", ""), expires)
        secure = "; Secure" if tls else ""
        cookie = f"{COOKIE}={expires}.{mac}; Path=/; Max-Age={int(ttl)}; HttpOnly{secure}"
        location = quote(request.target, safe="/?&=%:@!$'()*+,;~-._")
        return Response(302, b"checking your browser, follow the redirect\n",
                        [("Location", location), ("Set-Cookie", cookie),
                         ("Cache-Control", "no-store")])
