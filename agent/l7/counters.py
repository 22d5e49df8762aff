"""The L7 front end's counters: the only thing it keeps about connections.

Labels come from closed sets (enums, TLS versions, the config's zone
names), never from what a client sent, so a counter cannot carry an
address, a hostname typed by a user, or a URL. A value outside the set is
a programming error (Refusal, RequestError) or folds into "other" (TLS
version). One lock: increments come from the event loop thread, snapshots
from the status socket or another thread (the daemon's metrics). The
per-response counts skip it: the loop thread is their only writer, so no
increment is lost, and a snapshot taken mid-update is at most one response
behind in one series.
"""

from __future__ import annotations

import enum
import threading
from bisect import bisect_left
from collections.abc import Iterable

TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
OTHER = "other"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# The cache's statuses (agent/l7/cache/store.py Status) as labels; "none":
# the request was answered before the cache stage (a rule, the WAF, the trace).
CACHE_STATUSES = ("hit", "miss", "expired", "revalidated", "bypass", "dynamic", "none")
_CACHE_INDEX = {**{s.upper(): i for i, s in enumerate(CACHE_STATUSES)},
                "": CACHE_STATUSES.index("none")}
# Upper bounds (seconds) of the response time histogram: a cache hit is
# sub-millisecond, an origin fetch tens of milliseconds, a timeout seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class Refusal(enum.StrEnum):
    """Why a connection was refused; values shared with guard.Reason."""

    REGION_ADDRESS = "region_address"   # accept: dedicated IP of a foreign-region zone
    REGION_SNI = "region_sni"           # ClientHello: SNI of a foreign-region zone
    UNKNOWN_SNI = "unknown_sni"         # ClientHello: no zone and no default zone
    HANDSHAKE_ERROR = "handshake_error"  # TLS failed or timed out for another reason
    MISDIRECTED = "misdirected"         # Host header names another zone than the SNI


class RequestError(enum.StrEnum):
    """Why a request head was not answered with 200."""

    TIMEOUT = "timeout"          # no complete head within the idle timeout
    TOO_LARGE = "too_large"      # head over the size bound
    MALFORMED = "malformed"      # not a strict HTTP/1.x request head
    CLOSED = "closed"            # client closed before a complete head


class RuleAction(enum.StrEnum):
    """What a zone's rules did with a request (agent/l7/pipeline.py)."""

    PAGE_REDIRECT = "page_redirect"     # a page rule's forwarding URL
    HTTPS_REDIRECT = "https_redirect"   # always-HTTPS on plain HTTP
    FW_BLOCK = "fw_block"
    FW_CHALLENGE = "fw_challenge"
    FW_ALLOW = "fw_allow"
    FW_LOG = "fw_log"
    FW_SKIP = "fw_skip"
    RATE_LIMITED = "rate_limited"
    CHALLENGE_ISSUED = "challenge_issued"   # firewall or bots: the cookie challenge sent
    CHALLENGE_PASSED = "challenge_passed"   # came back with a valid cookie
    BOT_BLOCK = "bot_block"                 # a known attack tool, or bots mode block
    WAF_BLOCK = "waf_block"
    WAF_SCORED = "waf_scored"               # some rule matched, under the threshold
    LOGIN_BLOCK = "login_block"             # credential stuffing: over a failure rate
    LOGIN_LEAKED = "login_leaked"           # a leaked password was submitted
    LOOP = "loop"                           # the request came through privedge already
    ORIGIN_ERROR = "origin_error"           # 502 to the client
    ORIGIN_TIMEOUT = "origin_timeout"       # 504 to the client


class Counters:
    """Monotonic counters with closed label sets; thread-safe."""

    def __init__(self, zones: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._accepted = 0
        self._refused = dict.fromkeys(Refusal, 0)
        self._request_errors = dict.fromkeys(RequestError, 0)
        self._handshakes = dict.fromkeys((*TLS_VERSIONS, OTHER), 0)
        self._requests: dict[str, int] = {}
        self._actions: dict[str, dict[RuleAction, int]] = {}
        # zone -> [status class][cache status] counts
        self._responses: dict[str, list[list[int]]] = {}
        # zone -> per-bucket counts (the last: over the largest bound), and sums
        self._latency: dict[str, list[int]] = {}
        self._latency_sum: dict[str, float] = {}
        self.add_zones(zones)

    def add_zones(self, zones: Iterable[str]) -> None:
        """Count these zones too, from zero (a new config that adds zones
        keeps the counts of the others; a zone that goes keeps its own)."""
        with self._lock:
            for z in zones:
                if z in self._requests:
                    continue
                self._actions[z] = dict.fromkeys(RuleAction, 0)
                self._responses[z] = [[0] * len(CACHE_STATUSES) for _ in STATUS_CLASSES]
                self._latency[z] = [0] * (len(LATENCY_BUCKETS) + 1)
                self._latency_sum[z] = 0.0
                self._requests[z] = 0     # last: a zone is known once all its rows are

    def accepted(self) -> None:
        """A TCP connection was accepted (refused ones included)."""
        with self._lock:
            self._accepted += 1

    def refused(self, reason: Refusal | str) -> None:
        key = Refusal(reason)  # ValueError for a reason outside the set
        with self._lock:
            self._refused[key] += 1

    def handshake(self, version: str | None) -> None:
        """A TLS handshake completed with `version` (ssl.SSLObject.version())."""
        key = version if version in TLS_VERSIONS else OTHER
        with self._lock:
            self._handshakes[key] += 1

    def served(self, zone: str) -> None:
        """A request of `zone` was answered; zone names come from the config."""
        with self._lock:
            if zone not in self._requests:
                raise KeyError(f"{zone!r} is not a zone of this config")
            self._requests[zone] += 1

    def action(self, zone: str, action: RuleAction | str) -> None:
        """A zone's rule acted (labels: config zone names and RuleAction)."""
        key = RuleAction(action)
        with self._lock:
            self._actions[zone][key] += 1

    def response(self, zone: str, status: int, cache: str, seconds: float) -> None:
        """A response of `zone` went out: its status class, the cache's
        status (a Status value or ""), and its time in seconds."""
        by_class = self._responses[zone]   # KeyError: not a zone of this config
        row = min(max(status // 100, 1), 5) - 1
        column = _CACHE_INDEX[cache]       # KeyError: not a cache status
        by_class[row][column] += 1
        self._latency[zone][bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum[zone] += seconds

    def request_error(self, error: RequestError | str) -> None:
        key = RequestError(error)
        with self._lock:
            self._request_errors[key] += 1

    def snapshot(self) -> dict[str, object]:
        """A consistent copy, zeros included, ready for json.dumps."""
        with self._lock:
            return {
                "connections_accepted": self._accepted,
                "refused": {str(k): v for k, v in self._refused.items()},
                "handshakes": dict(self._handshakes),
                "requests": dict(self._requests),
                "request_errors": {str(k): v for k, v in self._request_errors.items()},
                "actions": {z: {str(k): v for k, v in a.items()} for z, a in self._actions.items()},
                "responses": {z: {cls: dict(zip(CACHE_STATUSES, row, strict=True))
                                  for cls, row in zip(STATUS_CLASSES, rows, strict=True)}
                              for z, rows in self._responses.items()},
                "latency": {z: {"buckets": list(counts), "sum": self._latency_sum[z]}
                            for z, counts in self._latency.items()},
            }
