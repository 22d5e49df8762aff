"""The two record kinds of core/PROTOCOL.md: field order, and NDJSON encoding.

The L7 front end builds one plain tuple per finished request, its values in
the order of LOG_FIELDS (or SAMPLE_FIELDS): that is the only per-request cost
on the event loop. The shipper's thread turns tuples into JSON lines with
ENCODERS[stream], checking each value's type first, because the core answers
400 to a whole batch for one bad record: a record that would not pass is
refused here, alone, and counted as rejected.

Checked here, beyond types, are the closed sets and shapes PROTOCOL.md
names (cache_status, action, tls_version, an address in client_ip, none in
any sample string, the pseudonym's 32 hex digits, the period's day).
Normalised here (off the event loop): `time` and `latency_ms` rounded to
milliseconds, `host` and `cache_status` lowercased (cache Status is
upper-case), StrEnum values written as their text. Error messages name the
field and what was expected, never the value (it may be personal data).

Every string sent is valid Unicode, so its UTF-8 is valid: the core stores
UTF-8 and refuses a record it cannot encode, with the whole batch. A string
holding lone surrogates (text decoded with 'surrogateescape' carries each
undecodable byte as U+DC80..U+DCFF) is repaired before encoding: such a raw
byte becomes %XX (upper-case hex; lowercased in `host`, with the rest of
it), as a URL would escape it, so a customer reads the path, host or user
agent byte for byte as it arrived (a literal "%C3" and a raw byte 0xC3
then read alike); any other lone surrogate becomes U+FFFD. A string that
is ASCII (nearly all) costs one isascii() call. Numbers keep to the core's
bounds (core/records.py): an integer from 2**63 on is refused, and so is a
number that is not finite (or, for `time` and `latency_ms`, 2**63 or more).
"""

from __future__ import annotations

import json
import math
import re
import socket
from collections.abc import Callable
from ipaddress import ip_address

from agent.l7.cache.store import Status
from agent.l7.counters import RuleAction

LOGS = "logs"
SAMPLE = "sample"
STREAMS = (LOGS, SAMPLE)

# A log record, in the order the tuple carries it (PROTOCOL.md "Log record").
LOG_FIELDS = ("time", "zone", "dc", "method", "host", "path", "status", "bytes",
              "cache_status", "action", "client_ip", "user_agent")
# A sample record (PROTOCOL.md "Sample record"): metadata only, no address.
SAMPLE_FIELDS = ("time", "dc", "zone", "method", "status", "bytes", "cache_status", "action",
                 "latency_ms", "tls_version", "client", "period")
FIELDS = {LOGS: LOG_FIELDS, SAMPLE: SAMPLE_FIELDS}

# One encoder for every line: compact separators, ASCII only (non-ASCII text
# as \uXXXX escapes; _str has already replaced every lone surrogate).
_dumps = json.JSONEncoder(separators=(",", ":")).encode
MAX_INT = 2**63 - 1   # the core's bound for a record's numbers (core/records.py)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class RecordError(ValueError):
    """A record that does not match its stream's fields; names the field."""


def _number(value: object) -> float:
    if type(value) is int:  # (bool is not a number; isfinite overflows on huge ints)
        value = float(value) if value <= 1 << 53 else math.inf
    if type(value) is not float or not 0 <= value <= MAX_INT:  # NaN and inf fail too
        raise RecordError("expected a finite number >= 0 and < 2**63")
    return round(value, 3)


def _int(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise RecordError("expected an integer from 0 to 2**63 - 1")
    return value


def _status(value: object) -> int:
    if type(value) is not int or not 0 <= value <= 999:
        raise RecordError("expected an HTTP status (0 if none was sent)")
    return value


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"%{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"


def valid_text(text: str) -> str:
    """`text` with each lone surrogate replaced (see the module docstring):
    the raw byte of 'surrogateescape' as %XX, any other as U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, text)
    return text


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise RecordError("expected a string")
    return valid_text(value)


def _lower(value: object) -> str:
    return _str(value).lower()


def _one_of(allowed: frozenset[str], lower: bool = False) -> Callable[[object], str]:
    """A value from a closed set that PROTOCOL.md lists (compared lowercased
    if `lower`: cache Status members are upper-case)."""
    def check(value: object) -> str:
        text = _lower(value) if lower else _str(value)
        if text not in allowed:
            raise RecordError(f"expected one of {', '.join(sorted(allowed - {''}))} or \"\"")
        return text
    return check


def _address(value: object) -> str:
    """The log's client_ip: an address, as the front end normalised it."""
    text = _str(value)
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)  # C, strict: ~0.2 µs against ipaddress's ~2
        except OSError:
            continue
        return text
    raise RecordError("expected an IPv4 or IPv6 address")


def _not_address(value: object) -> str:
    """A sample string; the core refuses any that parses as an IP address,
    and so does this (invariant 4: no address in the sample)."""
    text = _str(value)
    if "." in text or ":" in text:  # every address has one; most metadata has neither
        try:
            ip_address(text)
        except ValueError:
            return text
        raise RecordError("a sample value must not be an IP address")
    return text


def _pattern(regex: str, what: str) -> Callable[[object], str]:
    match = re.compile(regex).fullmatch

    def check(value: object) -> str:
        text = _str(value)
        if not match(text):
            raise RecordError(f"expected {what}")
        return text
    return check


CACHE_STATUSES = frozenset(s.value.lower() for s in Status) | {""}
ACTIONS = frozenset(a.value for a in RuleAction) | {""}
TLS_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3", ""})

Check = Callable[[object], object]
_cache_status = _one_of(CACHE_STATUSES, lower=True)
_action = _one_of(ACTIONS)
_LOG_CHECKS: tuple[Check, ...] = (
    _number, _str, _str, _str, _lower, _str, _status, _int, _cache_status, _action, _address,
    _str)
_SAMPLE_CHECKS: tuple[Check, ...] = (
    _number, _not_address, _not_address, _not_address, _status, _int, _cache_status, _action,
    _number, _one_of(TLS_VERSIONS), _pattern(r"[0-9a-f]{32}", "32 lowercase hex digits"),
    _pattern(r"\d{4}-\d{2}-\d{2}", "a UTC day, YYYY-MM-DD"))


def _encoder(fields: tuple[str, ...], checks: tuple[Check, ...]) -> Callable[[tuple], str]:
    n = len(fields)
    assert len(checks) == n
    rows = tuple(zip(fields, checks, strict=True))

    def encode(record: tuple) -> str:
        """One JSON object (no newline); RecordError names what is wrong."""
        if type(record) is not tuple or len(record) != n:
            raise RecordError(f"expected a tuple of {n} fields ({', '.join(fields)})")
        try:
            return _dumps({name: check(value)
                           for (name, check), value in zip(rows, record, strict=True)})
        except RecordError:
            pass
        for (name, check), value in zip(rows, record, strict=True):  # rare: find the field
            try:
                check(value)
            except RecordError as e:
                raise RecordError(f"field {name!r}: {e} (got {type(value).__name__})") from None
        raise AssertionError("unreachable")

    return encode


ENCODERS: dict[str, Callable[[tuple], str]] = {
    LOGS: _encoder(LOG_FIELDS, _LOG_CHECKS),
    SAMPLE: _encoder(SAMPLE_FIELDS, _SAMPLE_CHECKS),
}
