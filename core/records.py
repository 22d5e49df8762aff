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
_KEY_RE = re.compile(r"^[a-z_]{1,32}$")
MAX_INT = 2**63 - 1     # the largest integer (and integral number) a record may hold
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


def is_ip(text: str) -> bool:
    """True if `text` parses as an IPv4 or IPv6 address (strictly: ipaddress)."""
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
    if type(v) is int:   # bool is an int subclass: refused below
        # Before math.isfinite, which raises OverflowError on a huge integer.
        if not 0 <= v <= MAX_INT:
            raise RecordError(line, key, f"not a number in 0..{MAX_INT}")
        return v
    if type(v) is not float:
        raise RecordError(line, key, "not a number")
    if not math.isfinite(v) or v < 0:
        raise RecordError(line, key, "not a finite number >= 0")
    return v


def _integer(rec: dict, key: str, line: int, hi: int) -> None:
    v = rec[key]
    if type(v) is not int or not 0 <= v <= hi:
        raise RecordError(line, key, f"not an integer in 0..{hi}")


def _strings(rec: dict, keys: tuple[str, ...], line: int) -> None:
    for key in keys:
        v = rec[key]
        if type(v) is not str:
            raise RecordError(line, key, "not a string")
        if not v.isascii():
            # JSON's \ud800 escapes decode to lone surrogates, which are not
            # Unicode text and cannot be stored as UTF-8.
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise RecordError(line, key, "not valid Unicode (a lone surrogate)") from None


def _time(rec: dict, line: int, rules: Rules) -> float:
    t = _number(rec, "time", line)
    if t > rules.now + FUTURE_SLACK:
        raise RecordError(line, "time", f"more than {FUTURE_SLACK:.0f} s in the future (is "
                          "the edge's clock right?)")
    return t


def _keys(rec: object, expected: frozenset[str], order: tuple[str, ...], line: int) -> dict:
    if not isinstance(rec, dict):
        raise RecordError(line, "(record)", "not a JSON object")
    if rec.keys() != expected:
        extra = sorted(set(rec) - expected)
        if extra:
            # A key is the sender's text too: named only if it is plain.
            key = extra[0] if _KEY_RE.match(extra[0]) else "(key)"
            raise RecordError(line, key, "not a key of this record")
        missing = [k for k in order if k not in rec]
        raise RecordError(line, missing[0], "missing")
    return rec


_LOG_STRINGS = ("zone", "dc", "method", "host", "path", "cache_status", "action", "client_ip",
                "user_agent")
_SAMPLE_STRINGS = ("dc", "zone", "method", "cache_status", "action", "tls_version", "client",
                   "period")


def _check_log(rec: dict, line: int, rules: Rules) -> str:
    """Raise RecordError or return the record's zone. Messages name the
    field and what was expected, never the value (it may be personal data)."""
    _strings(rec, _LOG_STRINGS, line)
    zone = rec["zone"]
    if zone not in rules.zones:
        raise RecordError(line, "zone", "not a zone of this core's config")
    wanted = rules.log_region(zone)
    if wanted is not None and wanted != rules.region:
        raise RecordError(line, "zone", f"the zone logs in region {wanted}; this core serves "
                          f"{rules.region or 'no region'} (send it to {wanted}'s core)")
    if rec["dc"] != rules.dc:
        raise RecordError(line, "dc", f"not the sender ({rules.dc}, from its certificate)")
    _integer(rec, "status", line, 999)
    _integer(rec, "bytes", line, MAX_INT)
    if rec["cache_status"] not in CACHE_STATUSES:
        raise RecordError(line, "cache_status", f"not one of "
                          f"{', '.join(sorted(CACHE_STATUSES - {''}))} or \"\"")
    if not _ACTION_RE.match(rec["action"]):
        raise RecordError(line, "action", "not an action label (a-z 0-9 _, or \"\")")
    if not is_ip(rec["client_ip"]):
        raise RecordError(line, "client_ip", "not an IP address")
    return zone


def _check_sample(rec: dict, line: int, rules: Rules) -> None:
    _strings(rec, _SAMPLE_STRINGS, line)
    for key in _SAMPLE_STRINGS:
        # The sample carries no address, whatever the field (DESIGN.md §2).
        if is_ip(rec[key]):
            raise RecordError(line, key, "looks like an IP address; the sample carries none")
    if rec["dc"] != rules.dc:
        raise RecordError(line, "dc", f"not the sender ({rules.dc}, from its certificate)")
    _integer(rec, "status", line, 999)
    _integer(rec, "bytes", line, MAX_INT)
    _number(rec, "latency_ms", line)
    if rec["cache_status"] not in CACHE_STATUSES:
        raise RecordError(line, "cache_status", "not a cache status")
    if not _ACTION_RE.match(rec["action"]):
        raise RecordError(line, "action", "not an action label (a-z 0-9 _, or \"\")")
    if rec["tls_version"] not in TLS_VERSIONS:
        raise RecordError(line, "tls_version", "not TLSv1.2, TLSv1.3 or \"\"")
    if not _CLIENT_RE.match(rec["client"]):
        raise RecordError(line, "client", "not 32 lowercase hex digits (a pseudonym)")
    try:
        day_number(rec["period"])
    except ValueError:
        raise RecordError(line, "period", "not a day (YYYY-MM-DD)") from None


def _check_line(raw: str, n: int, is_log: bool, rules: Rules) -> tuple[dict, float, str | None]:
    try:
        rec = _DECODER.decode(raw)
    except ValueError as e:   # its message is a position, not the text
        raise RecordError(n, "(line)", f"not JSON ({e})") from None
    expected, order = (_LOG_SET, LOG_KEYS) if is_log else (_SAMPLE_SET, SAMPLE_KEYS)
    rec = _keys(rec, expected, order, n)
    t = _time(rec, n, rules)
    if is_log:
        return rec, t, _check_log(rec, n, rules)
    _check_sample(rec, n, rules)
    return rec, t, None


def parse_batch(stream: str, body: bytes, rules: Rules) -> Parsed:
    """Check every line of an NDJSON body; RecordError at the first bad one.
    Whatever else a line makes fail (nesting deeper than the decoder's
    recursion limit, a check that did not foresee some input) is a
    RecordError too, named by the exception's type only: a line that makes
    the core fail is the sender's problem, answered 400, never a 500."""
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
    today = int(rules.now // 86400)
    groups: dict[tuple[str | None, str], list[dict]] = {}
    expired = 0
    for n, raw in enumerate(lines, 1):
        try:
            rec, t, zone = _check_line(raw, n, is_log, rules)
        except RecordError:
            raise
        except Exception as e:   # any failure of one line refuses the batch (see above)
            raise RecordError(n, "(line)", f"cannot be checked ({type(e).__name__})") from None
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
