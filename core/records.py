"""What a batch holds: log and sample records, checked line by line.

core/store.py calls parse_batch() on a gunzipped body; the first bad line
stops it with a RecordError that names the line (1-based) and the field, and
nothing of the batch is stored. Good records come back grouped by where they
are stored: (zone, UTC day) for logs, (None, UTC day) for the sample. The
record schemas are core/PROTOCOL.md's; the per-record work is one json
decode and a few type checks, because the core must keep up with every edge.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

LOG_KEYS = ("time", "zone", "dc", "method", "host", "path", "status", "bytes",
            "cache_status", "action", "client_ip", "user_agent")
SAMPLE_KEYS = ("time", "dc", "zone", "method", "status", "bytes", "cache_status", "action",
               "latency_ms", "tls_version", "client", "period")
CACHE_STATUSES = frozenset({"hit", "miss", "expired", "revalidated", "bypass", "dynamic", ""})
TLS_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3", ""})
# agent/l7/counters.py RuleAction values are snake_case labels; checked by
# shape, not by list, so that an edge with a newer action is not refused.
_ACTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$|^$")
_CLIENT_RE = re.compile(r"^[0-9a-f]{32}$")
_PERIOD_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
FUTURE_SLACK = 3600.0   # seconds an edge's clock may run ahead of the core's
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_LOG_SET, _SAMPLE_SET = frozenset(LOG_KEYS), frozenset(SAMPLE_KEYS)


class RecordError(ValueError):
    """A line of a batch is not a valid record: 400, naming line and field."""

    def __init__(self, line: int, field: str, why: str) -> None:
        super().__init__(f"line {line}: {field}: {why}")
        self.line, self.field = line, field


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


# One decoder for all: NaN and Infinity are JSON extensions we refuse.
_DECODER = json.JSONDecoder(parse_constant=_no_constants)
_DAYS: dict[int, str] = {}


def day_of(t: float) -> str:
    """The UTC day (YYYY-MM-DD) of a Unix time; memoised, days repeat a lot."""
    n = int(t // 86400)
    day = _DAYS.get(n)
    if day is None:
        day = dt.date.fromordinal(_EPOCH_ORDINAL + n).isoformat()
        if len(_DAYS) > 4096:
            _DAYS.clear()
        _DAYS[n] = day
    return day


def day_number(day: str) -> int:
    """Days since 1970-01-01 of a YYYY-MM-DD text (ValueError if it is not one)."""
    if not _PERIOD_RE.match(day):
        raise ValueError(f"{day!r} is not a day (YYYY-MM-DD)")
    return dt.date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Rules:
    """What a record must agree with besides its own schema."""

    dc: str                                   # the sender's DC, from its certificate
    now: float                                # the core's clock
    zones: Mapping[str, object] = field(default_factory=dict)   # logs: the config's zones
    log_region: Callable[[str], str | None] = lambda zone: None
    region: str | None = None                 # this core's log region
    retention_days: Callable[[str | None], int] = lambda zone: 7


@dataclass
class Parsed:
    """A batch's good records by (zone or None, day), and those dropped as
    already past their retention when they arrived."""

    groups: dict[tuple[str | None, str], list[dict]]
    records: int
    expired: int


def _number(rec: dict, key: str, line: int) -> float:
    v = rec[key]
    if type(v) is not float and type(v) is not int:  # bool is an int subclass: refused
        raise RecordError(line, key, f"{v!r} is not a number")
    if not math.isfinite(v) or v < 0:
        raise RecordError(line, key, f"{v!r} is not a finite number >= 0")
    return v


def _integer(rec: dict, key: str, line: int, hi: int) -> None:
    v = rec[key]
    if type(v) is not int or not 0 <= v <= hi:
        raise RecordError(line, key, f"{v!r} is not an integer in 0..{hi}")


def _time(rec: dict, line: int, rules: Rules) -> float:
    t = _number(rec, "time", line)
    if t > rules.now + FUTURE_SLACK:
        raise RecordError(line, "time", f"{t!r} is more than {FUTURE_SLACK:.0f} s in the "
                          "future (is the edge's clock right?)")
    return t


def _keys(rec: object, expected: frozenset[str], order: tuple[str, ...], line: int) -> dict:
    if not isinstance(rec, dict):
        raise RecordError(line, "(record)", "not a JSON object")
    if rec.keys() != expected:
        extra = sorted(set(rec) - expected)
        if extra:
            raise RecordError(line, extra[0], "not a key of this record")
        missing = [k for k in order if k not in rec]
        raise RecordError(line, missing[0], "missing")
    return rec


def _check_log(rec: dict, line: int, rules: Rules) -> str:
    """Raise RecordError or return the record's zone."""
    for key in ("zone", "dc", "method", "host", "path", "cache_status", "action", "client_ip",
                "user_agent"):
        if type(rec[key]) is not str:
            raise RecordError(line, key, f"{rec[key]!r} is not a string")
    zone = rec["zone"]
    if zone not in rules.zones:
        raise RecordError(line, "zone", f"{zone!r} is not a zone of this core's config")
    wanted = rules.log_region(zone)
    if wanted is not None and wanted != rules.region:
        raise RecordError(line, "zone", f"{zone!r} logs in region {wanted}; this core serves "
                          f"{rules.region or 'no region'} (send it to {wanted}'s core)")
    if rec["dc"] != rules.dc:
        raise RecordError(line, "dc", f"{rec['dc']!r} is not the sender ({rules.dc}, from its "
                          "certificate)")
    _integer(rec, "status", line, 999)
    _integer(rec, "bytes", line, 2**63 - 1)
    if rec["cache_status"] not in CACHE_STATUSES:
        raise RecordError(line, "cache_status", f"{rec['cache_status']!r} is not one of "
                          f"{', '.join(sorted(CACHE_STATUSES))} or \"\"")
    if not _ACTION_RE.match(rec["action"]):
        raise RecordError(line, "action", f"{rec['action']!r} is not an action label")
    if not _is_ip(rec["client_ip"]):
        raise RecordError(line, "client_ip", f"{rec['client_ip']!r} is not an IP address")
    return zone


def _check_sample(rec: dict, line: int, rules: Rules) -> None:
    for key in ("dc", "zone", "method", "cache_status", "action", "tls_version", "client",
                "period"):
        v = rec[key]
        if type(v) is not str:
            raise RecordError(line, key, f"{v!r} is not a string")
        # The sample carries no address, whatever the field (DESIGN.md §2).
        if _is_ip(v):
            raise RecordError(line, key, "looks like an IP address; the sample carries none")
    if rec["dc"] != rules.dc:
        raise RecordError(line, "dc", f"{rec['dc']!r} is not the sender ({rules.dc}, from its "
                          "certificate)")
    _integer(rec, "status", line, 999)
    _integer(rec, "bytes", line, 2**63 - 1)
    _number(rec, "latency_ms", line)
    if rec["cache_status"] not in CACHE_STATUSES:
        raise RecordError(line, "cache_status", f"{rec['cache_status']!r} is not a cache status")
    if not _ACTION_RE.match(rec["action"]):
        raise RecordError(line, "action", f"{rec['action']!r} is not an action label")
    if rec["tls_version"] not in TLS_VERSIONS:
        raise RecordError(line, "tls_version", f"{rec['tls_version']!r} is not TLSv1.2, "
                          "TLSv1.3 or \"\"")
    if not _CLIENT_RE.match(rec["client"]):
        raise RecordError(line, "client", "not 32 lowercase hex digits (a pseudonym)")
    try:
        day_number(rec["period"])
    except ValueError:
        raise RecordError(line, "period", f"{rec['period']!r} is not a day (YYYY-MM-DD)"
                          ) from None


def parse_batch(stream: str, body: bytes, rules: Rules) -> Parsed:
    """Check every line of an NDJSON body; RecordError at the first bad one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        line = body.count(b"\n", 0, e.start) + 1
        raise RecordError(line, "(line)", "not UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the last record's newline
    if not lines:
        raise RecordError(1, "(batch)", "no records")
    is_log = stream == "logs"
    expected, order = (_LOG_SET, LOG_KEYS) if is_log else (_SAMPLE_SET, SAMPLE_KEYS)
    today = int(rules.now // 86400)
    groups: dict[tuple[str | None, str], list[dict]] = {}
    expired = 0
    for n, raw in enumerate(lines, 1):
        try:
            rec = _DECODER.decode(raw)
        except ValueError as e:
            raise RecordError(n, "(line)", f"not JSON ({e})") from None
        rec = _keys(rec, expected, order, n)
        t = _time(rec, n, rules)
        if is_log:
            zone: str | None = _check_log(rec, n, rules)
        else:
            _check_sample(rec, n, rules)
            zone = None
        # A record already past its retention is not stored (it would be
        # kept longer than allowed until the next sweep): dropped, counted.
        if int(t // 86400) <= today - rules.retention_days(zone):
            expired += 1
            continue
        groups.setdefault((zone, day_of(t)), []).append(rec)
    return Parsed(groups, len(lines), expired)


def dump_records(records: list[dict]) -> bytes:
    """NDJSON of records (each line ends with a newline)."""
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False).encode
    return ("\n".join(map(dumps, records)) + "\n").encode("utf-8")
