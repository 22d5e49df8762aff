"""Credential-stuffing protection for a zone's login endpoints: pure logic, no I/O.

For each configured login endpoint (method and path) the guard does three
things, in this order:

  per client    at most `client_failures` failed logins per `client_period`
                seconds from one client (an IPv4 address, an IPv6 /64, since
                one host has a /64 to rotate through); the attempt after
                them is answered 429 and starts a `block` of that client on
                the zone's login endpoints
  per username  at most `username_failures` per `username_period` for one
                username, from whichever clients: a distributed attack on
                one account stops at the edge (429) for `block` seconds,
                while other usernames go on
  leaked        the password is looked up by k-anonymity (agent/l7/leaked.py,
                only a 5-character hash prefix is asked); a hit adds
                `Exposed-Credential-Check: 1` toward the origin, as Cloudflare
                does, so the origin can force a reset or a second factor
                (leaked_action "header"), or is answered 403 ("block"), or
                is not looked for ("off")

The server calls it around the origin request:

    check = guard.before(method, path, headers, body, client, now)
    if check.response: answer with it; nothing reaches the origin
    else: forward with forward_headers(check, headers), then
          guard.after(check, origin_status or None)

Counting. An attempt counts as a failure as soon as it is forwarded, and
after() takes it back when the origin answers anything but a failure (or
nothing, or 5xx: the origin failed, not the credentials). So parallel
attempts cannot slip past a limit while their answers are in flight, and a
check whose after() never comes stays counted, the safe side. A leaked
password answered 403 at the edge is a failed login. Windows slide as in
ratelimit.py: the previous fixed window weighs by how much of it still
overlaps the last period.

What matches. The path is compared loosely (percent-decoded, path
parameters, dot segments and repeated slashes removed, no trailing slash,
case folded), so spelling it differently does not dodge the counters while
the origin still routes it to the login. Every request to a login endpoint
counts against its client, even with a body we cannot read (multipart, a
wrong Content-Type, broken JSON): credentials hidden from us still cost
attempts. The username limit and the leaked check need the fields read from
an application/x-www-form-urlencoded or JSON body; in JSON a dotted name
reaches into nested objects ("user.email").

Privacy. Usernames and addresses are kept only as counter keys: HMAC-SHA256
under a random key of this guard (memory only, never logged), truncated to
16 bytes, of the normalised username (NFKC, trimmed, case-folded) and of
the client's address or /64. A password is hashed for the lookup and
dropped with the request. Nothing is logged; stats() are counts. State is
in memory, bounded per kind (least recently seen evicted, and counted),
owned by the front end's event loop thread (no lock), and starts empty on
restart or reload (a new guard), like the rate limiter's.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import posixpath
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal
from urllib.parse import parse_qs, unquote

from pydantic import Field, field_validator, model_validator

from agent.config import Frozen
from agent.l7.http1 import Response
from agent.l7.leaked import LeakedPasswords
from agent.l7.ratelimit import Window, Windows

EXPOSED_HEADER = "Exposed-Credential-Check"
KEY_BYTES = 16         # of an HMAC-SHA256 counter key: collisions are out of reach
MAX_FIELDS = 100       # form fields read at most; a login form has a handful
METHOD_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")   # an HTTP token
STATS = ("checks", "unparsed", "failures", "leaked", "blocked_client", "blocked_username",
         "blocked_leaked")


def normalise_path(path: str) -> str:
    """A path as the endpoints are matched: loose on purpose (see the top)."""
    path = unquote(path.partition("?")[0].partition("#")[0]).replace("\\", "/")
    path = re.sub(r";[^/]*", "", path)   # path parameters: /login;jsessionid=...
    return posixpath.normpath(re.sub(r"/+", "/", "/" + path)).casefold()


def normalise_username(name: str) -> str:
    return unicodedata.normalize("NFKC", name).strip().casefold()


def client_key(client: str) -> str:
    """The address a client is counted by: IPv4 itself, IPv6 its /64."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


# -- settings -----------------------------------------------------------------------------


class LoginEndpoint(Frozen):
    """One login form or API: where, which fields, and what a failure looks like."""

    path: str = Field(min_length=1, max_length=1024)
    method: str = "POST"
    username_field: str = Field(default="username", min_length=1, max_length=128)
    password_field: str = Field(default="password", min_length=1, max_length=128)
    failure_statuses: tuple[int, ...] = (401, 403)
    # For origins that answer a failure 200 and a success 302: every other
    # status is then a failure. Give this or failure_statuses, not both.
    success_statuses: tuple[int, ...] = ()

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or "?" in v or "#" in v:
            raise ValueError(f"{v!r} is not a path (it starts with / and has no query)")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if not METHOD_RE.match(v):
            raise ValueError(f"{v!r} is not an HTTP method")
        return v.upper()

    @field_validator("failure_statuses", "success_statuses")
    @classmethod
    def _statuses(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        for status in v:
            if not 100 <= status <= 499:
                raise ValueError(f"{status} is not a status a login answers with (100-499; "
                                 "a 5xx is the origin failing, never a failed login)")
        if len(set(v)) != len(v):
            raise ValueError(f"{list(v)} lists a status twice")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LoginEndpoint:
        if self.success_statuses and "failure_statuses" in self.model_fields_set:
            raise ValueError("give failure_statuses or success_statuses, not both")
        if not self.success_statuses and not self.failure_statuses:
            raise ValueError("failure_statuses is empty, so no login could ever fail")
        if self.username_field == self.password_field:
            raise ValueError(f"username_field and password_field are both "
                             f"{self.username_field!r}")
        return self

    def failed(self, status: int) -> bool:
        if status >= 500:
            return False
        if self.success_statuses:
            return status not in self.success_statuses
        return status in self.failure_statuses


class LoginSettings(Frozen):
    """A zone's credential-stuffing protection; no endpoints, no protection."""

    endpoints: tuple[LoginEndpoint, ...] = ()
    client_failures: int = Field(default=10, ge=1, le=1_000_000)
    client_period: float = Field(default=300, gt=0, le=86400)
    username_failures: int = Field(default=5, ge=1, le=1_000_000)
    username_period: float = Field(default=300, gt=0, le=86400)
    block: float = Field(default=600, gt=0, le=86400)
    leaked_action: Literal["header", "block", "off"] = "header"

    @model_validator(mode="after")
    def _distinct_endpoints(self) -> LoginSettings:
        seen: dict[tuple[str, str], int] = {}
        for i, ep in enumerate(self.endpoints):
            key = (ep.method, normalise_path(ep.path))
            if key in seen:
                raise ValueError(f"endpoints[{i}]: {ep.method} {ep.path} is endpoints[{seen[key]}]"
                                 " again (paths match case- and slash-insensitively)")
            seen[key] = i
        return self


# -- counters -----------------------------------------------------------------------------


class _Tallies:
    """Failed logins per key of one kind (clients or usernames): sliding
    windows in a bounded LRU (agent/l7/ratelimit.py's Windows)."""

    def __init__(self, limit: int, period: float, max_keys: int) -> None:
        self.limit, self.period = limit, period
        self._windows = Windows(max_keys)

    def __len__(self) -> int:
        return len(self._windows)

    @property
    def evicted(self) -> int:
        return self._windows.evicted

    def get(self, key: bytes, now: float) -> Window:
        return self._windows.get(key, self.period, now)

    def refusal(self, t: Window, now: float, block: float) -> int:
        """Seconds this key must wait before another attempt, 0 if it may try now.
        The attempt that would go over the limit starts the block."""
        if t.blocked_until > now:
            return max(1, math.ceil(t.blocked_until - now))
        overlap = 1 - (now - t.start) / self.period
        if t.previous * overlap + t.current + 1 > self.limit:
            t.blocked_until = now + block
            return max(1, math.ceil(block))
        return 0

    def refund(self, key: bytes, start: float) -> None:
        """Take back an attempt counted in the window that began at `start`."""
        t = self._windows.peek(key)
        if t is None:
            return                              # evicted: nothing left to take back
        if abs(t.start - start) < self.period / 2:
            t.current = max(0, t.current - 1)
        elif abs(t.start - self.period - start) < self.period / 2:
            t.previous = max(0, t.previous - 1)  # the window has rolled once since


# -- the guard ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginCheck:
    """What before() decided for one request; handed back to after()."""

    endpoint: LoginEndpoint | None = None    # None: not a login request
    response: Response | None = None         # set: answer with this, do not forward
    origin_headers: tuple[tuple[str, str], ...] = ()   # add toward the origin
    leaked: bool = False
    # (tallies, key, window start) of each counted attempt; after() empties it.
    _counted: list[tuple[_Tallies, bytes, float]] = field(
        default_factory=list, repr=False, compare=False)

    none: ClassVar[LoginCheck]

    @property
    def is_login(self) -> bool:
        return self.endpoint is not None


LoginCheck.none = LoginCheck()


def _too_many(wait: int) -> Response:
    return Response(429, b"429 Too Many Requests: too many failed logins, try again later\n",
                    [("Retry-After", str(wait)), ("Cache-Control", "no-store")])


def _leaked_refusal() -> Response:
    return Response(403, b"403 Forbidden: this password is known to be leaked; "
                         b"please choose another\n", [("Cache-Control", "no-store")])


def _json_field(doc: object, name: str) -> object:
    """doc[name], or for a dotted name its path through nested objects."""
    if isinstance(doc, dict) and name in doc:
        return doc[name]
    for part in name.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)
    return doc


def read_credentials(endpoint: LoginEndpoint, headers: Mapping[str, str],
                     body: bytes) -> tuple[str | None, str | None]:
    """(normalised username, password) from a login body; each None when absent
    or unreadable. `headers` has lower-case names, like dict(request.headers)."""
    ctype = headers.get("content-type", "").partition(";")[0].strip().lower()
    names = (endpoint.username_field, endpoint.password_field)
    try:
        if ctype == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True,
                            max_num_fields=MAX_FIELDS)
            values = [form.get(name, [None])[0] for name in names]
        elif ctype == "application/json" or (ctype.startswith("application/")
                                             and ctype.endswith("+json")):
            doc = json.loads(body)
            values = [_json_field(doc, name) for name in names]
        else:
            return None, None
    except (ValueError, RecursionError):   # bad UTF-8 or JSON, too many fields, too deep
        return None, None
    username, password = (v if isinstance(v, str) and v else None for v in values)
    return (normalise_username(username) or None) if username else None, password


def forward_headers(check: LoginCheck,
                    headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A request's headers for the origin: a client's own Exposed-Credential-Check
    dropped (only the edge may say it), the check's added. For every request."""
    drop = EXPOSED_HEADER.lower()
    return [(n, v) for n, v in headers if n.lower() != drop] + list(check.origin_headers)


class CredentialGuard:
    """One zone's login protection; built from its settings, swapped on reload."""

    def __init__(self, settings: LoginSettings, leaked: LeakedPasswords | None = None,
                 max_keys: int = 100_000) -> None:
        self.settings = settings
        self.leaked = leaked if leaked is not None else LeakedPasswords.default()
        self._key = os.urandom(32)   # the counter keys' HMAC key: memory only
        self._endpoints = {(ep.method, normalise_path(ep.path)): ep for ep in settings.endpoints}
        self._clients = _Tallies(settings.client_failures, settings.client_period, max_keys)
        self._usernames = _Tallies(settings.username_failures, settings.username_period,
                                   max_keys)
        self._stats = dict.fromkeys(STATS, 0)

    def _hash(self, kind: bytes, text: str) -> bytes:
        msg = kind + b"\0" + text.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:KEY_BYTES]

    def before(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               client: str, now: float) -> LoginCheck:
        """Check a request before it goes to the origin (see the top for the flow).
        `path` without the query is fine, `headers` has lower-case names, `now`
        is monotonic seconds."""
        endpoint = self._endpoints.get((method.upper(), normalise_path(path)))
        if endpoint is None:
            return LoginCheck.none
        s, stats = self.settings, self._stats
        stats["checks"] += 1
        username, password = read_credentials(endpoint, headers, body)
        if username is None and password is None:
            stats["unparsed"] += 1
        keyed = [(self._clients, self._hash(b"client", client_key(client)), "blocked_client")]
        if username is not None:
            keyed.append((self._usernames, self._hash(b"username", username),
                          "blocked_username"))
        tallies = []
        for table, key, refused in keyed:
            tally = table.get(key, now)
            wait = table.refusal(tally, now, s.block)
            if wait:
                stats[refused] += 1
                return LoginCheck(endpoint, _too_many(wait))
            tallies.append((table, key, tally))
        counted = []
        for table, key, tally in tallies:   # only once every key may try
            tally.current += 1
            counted.append((table, key, tally.start))

        if password is None or s.leaked_action == "off" or not self.leaked.is_leaked(password):
            return LoginCheck(endpoint, _counted=counted)
        stats["leaked"] += 1
        if s.leaked_action == "block":
            stats["blocked_leaked"] += 1
            return LoginCheck(endpoint, _leaked_refusal(), leaked=True)
        return LoginCheck(endpoint, origin_headers=((EXPOSED_HEADER, "1"),), leaked=True,
                          _counted=counted)

    def after(self, check: LoginCheck, status: int | None) -> None:
        """The origin's status for a forwarded check (None: it gave none). A failed
        login stays counted, anything else is taken back. Later calls do nothing."""
        counted = check._counted[:]
        check._counted.clear()
        if not counted:
            return
        if status is not None and check.endpoint is not None and check.endpoint.failed(status):
            self._stats["failures"] += 1
            return
        for table, key, start in counted:
            table.refund(key, start)

    def stats(self) -> dict[str, int]:
        """Counts only: login attempts seen (checks), bodies not read (unparsed),
        failed logins, leaked passwords, refusals by reason, evicted keys."""
        return dict(self._stats, evicted=self._clients.evicted + self._usernames.evicted,
                    tracked_clients=len(self._clients), tracked_usernames=len(self._usernames))
