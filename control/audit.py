"""The control plane's audit log: every change, chained by hash.

    python -m control.audit verify FILE [--head HASH]   is the chain intact? (exit 0 / 1)
    python -m control.audit show FILE [--last N] [--json]   entries, and the head hash

In code:

    log = AuditLog(Path("/var/lib/privedge/audit.jsonl"))
    log.append("alice", fingerprint(peer_cert_der), "deny add",
               {"add": ["192.0.2.0/24"]},
               {"dus": {"ok": True, "generation": 7, "seconds": 0.41},
                "iad": {"ok": False, "error": "connection refused"}})
    report = verify(log.path)               # report.ok, report.reason, report.head

One JSON object a line (JSON Lines, UTF-8). An entry holds `seq` (1, 2, ...),
`time` (UTC, ISO 8601) and `unix` (seconds), `who` (the operator's name),
`certificate` (the SHA-256 fingerprint of the client certificate the change
came with), `action` (a short verb: "apply", "deny add", "purge"), `diff`
(what changed, as the operator sent it), `results` (per DC: {"ok": bool, ...}),
`prev` (the previous entry's hash; 64 zeros for the first) and `hash`: the
SHA-256 of the entry without `hash`, encoded canonically (json.dumps with
sort_keys, separators (",", ":"), ensure_ascii=False, in UTF-8).

What the chain detects, and what it cannot:
  - an edited entry: its hash no longer matches its content;
  - a removed, inserted or reordered entry: seq jumps, or prev does not match;
  - a torn last line (a crash mid-write): reported by `verify`, and `append`
    refuses to chain onto it until an operator has looked and cut it off.
  - Removing the LAST entries leaves a shorter chain that is still valid: it
    cannot be detected from the file alone. Keep the head hash that `verify`
    and `show` print somewhere else (a ticket, a chat message, another host);
    `verify FILE --head HASH` then fails if that entry is gone. A log that has
    grown since still passes: the anchor only has to be an entry of the chain.
  - Someone who can rewrite the whole file can recompute every hash; only an
    anchor kept elsewhere catches that too.

Appends are safe across processes: an exclusive flock is held around reading
the last entry and writing the new one (so two writers never both take the
same seq), the line goes out with O_APPEND and is fsynced before append
returns. `append` checks only the last line (cheap); `verify` checks all.

No personal data: an entry names operators and their certificates, never an
end user. `diff` holds what the operator sent (prefixes, zone names, rule
ids), so callers must not put request data, client addresses seen in
traffic, or log excerpts into it; summarise instead ("purged 3 URLs of zone
www"). Results per DC hold status, generation and timings, nothing else.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control.pki import fsync_dir, write_all

ZERO_HASH = "0" * 64
MODE = 0o640               # operators' names: not for every local user
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TAIL_CHUNK = 65536
# field → accepted types; `hash` is checked apart (it is not part of what is hashed)
_FIELDS: dict[str, tuple[type, ...]] = {
    "seq": (int,), "time": (str,), "unix": (int, float), "who": (str,),
    "certificate": (str,), "action": (str,), "diff": (dict,), "results": (dict,),
    "prev": (str,),
}


class AuditError(RuntimeError):
    """The audit log cannot be read or appended to; the message names the file and why."""


# --------------------------------------------------------------------------- entries


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The bytes an entry's hash covers: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of an entry without its `hash` field."""
    return hashlib.sha256(canonical({k: v for k, v in fields.items() if k != "hash"})).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One change, as written to the log."""

    seq: int
    time: str                       # UTC, ISO 8601, e.g. 2024-05-01T10:00:00.000000Z
    unix: float
    who: str                        # the operator (the certificate's CN)
    certificate: str                # SHA-256 fingerprint of the client certificate, hex
    action: str
    diff: dict[str, Any]
    results: dict[str, dict[str, Any]]
    prev: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        # seq first: a line read with `tail` starts with what matters
        return {"seq": self.seq, "time": self.time, "unix": self.unix, "who": self.who,
                "certificate": self.certificate, "action": self.action, "diff": self.diff,
                "results": self.results, "prev": self.prev, "hash": self.hash}

    def line(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8") + b"\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Entry:
        return cls(**{k: d[k] for k in (*_FIELDS, "hash")})


def _shape_error(d: object) -> str | None:
    """Why `d` is not an entry, or None."""
    if not isinstance(d, dict):
        return f"not a JSON object but {type(d).__name__}"
    for name, types in _FIELDS.items():
        if name not in d:
            return f"field {name!r} is missing"
        if not isinstance(d[name], types) or isinstance(d[name], bool):
            return f"field {name!r} is {type(d[name]).__name__}, not {types[0].__name__}"
    for name in ("prev", "hash"):
        if not isinstance(d.get(name), str) or not _HEX64.match(d[name]):
            return f"field {name!r} is not a SHA-256 hash (64 lowercase hex digits)"
    return None


def _parse_line(raw: bytes) -> tuple[Entry | None, str | None]:
    """(entry, None) for a line holding a well-formed entry whose hash
    recomputes; (None, why) otherwise."""
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason} at byte {e.start})"
    except ValueError as e:
        return None, f"not JSON ({e})"
    if (why := _shape_error(d)) is not None:
        return None, why
    try:
        if entry_hash(d) != d["hash"]:
            return None, "hash does not match its content (edited?)"
    except ValueError as e:  # e.g. NaN edited in: not encodable canonically
        return None, f"content cannot be encoded canonically ({e})"
    return Entry.from_dict(d), None


def _utc_iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="microseconds"
                                                             ).replace("+00:00", "Z")


def _jsonable(name: str, value: object) -> Any:
    """`value` as it will read back from the file (tuples become lists, ...),
    so the Entry returned by append equals the one verify reads."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise AuditError(f"{name}: not JSON-able ({e})") from None


def fingerprint(cert: bytes | str | x509.Certificate) -> str:
    """SHA-256 fingerprint (64 lowercase hex digits) of a certificate, given
    as DER bytes, PEM (bytes or str) or a cryptography Certificate: the hash
    of its DER encoding, as `openssl x509 -fingerprint -sha256` shows it
    (without colons). An ssl socket's `getpeercert(binary_form=True)` is DER."""
    try:
        if isinstance(cert, str):
            cert = cert.encode("ascii")
        if isinstance(cert, bytes):
            cert = (x509.load_pem_x509_certificate(cert) if cert.lstrip().startswith(b"-----")
                    else x509.load_der_x509_certificate(cert))
    except ValueError as e:
        raise AuditError(f"fingerprint: not a certificate in PEM or DER ({e})") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _hex64(text: object) -> str | None:
    """'AB:CD:...' (openssl's form) or 'abcd...' → 'abcd...'; None if not 64 hex digits."""
    if not isinstance(text, str):
        return None
    fp = text.replace(":", "").lower()
    return fp if _HEX64.match(fp) else None


# --------------------------------------------------------------------------- appending


class AuditLog:
    """An append-only, hash-chained JSON Lines file (created on first append)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, who: str, certificate: str, action: str, diff: dict,
               results: dict[str, dict], when: float | None = None) -> Entry:
        """Append one change and return it once it is on disk (fsynced).
        AuditError if an argument is wrong, the last line is torn or not an
        entry, or the file cannot be locked or written."""
        if not isinstance(who, str) or not who.strip():
            raise AuditError(f"who: {who!r} is not an operator name")
        if not isinstance(action, str) or not action.strip():
            raise AuditError(f"action: {action!r} is not a verb like 'apply' or 'deny add'")
        if not isinstance(diff, dict):
            raise AuditError(f"diff: a JSON object summarising the change, not "
                             f"{type(diff).__name__}")
        if not isinstance(results, dict):
            raise AuditError(f"results: a mapping DC → result, not {type(results).__name__}")
        for dc, result in results.items():
            if not isinstance(dc, str) or not isinstance(result, dict) \
                    or not isinstance(result.get("ok"), bool):
                raise AuditError(f"results[{dc!r}]: expected a dict with 'ok': true/false, "
                                 f"got {result!r}")
        fp = _hex64(certificate)
        if fp is None:
            raise AuditError(f"certificate: {certificate!r} is not a SHA-256 fingerprint (64 hex "
                             "digits); compute it with control.audit.fingerprint(cert)")
        diff, results = _jsonable("diff", diff), _jsonable("results", results)
        unix = time.time() if when is None else float(when)
        if not 0 <= unix < 253402300800:  # also rejects NaN; the ISO form ends at year 9999
            raise AuditError(f"when: {when!r} is not a unix time between 1970 and 9999")

        created = not self.path.exists()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, MODE)
        except OSError as e:
            raise AuditError(f"{self.path}: cannot open for appending: {e.strerror}") from None
        try:
            self._lock(fd, fcntl.LOCK_EX)
            # under the lock: nobody else can append between reading the last
            # entry and writing the one that chains onto it
            last, size = self._last(fd)
            fields: dict[str, Any] = {
                "seq": last.seq + 1 if last else 1, "time": _utc_iso(unix), "unix": unix,
                "who": who, "certificate": fp, "action": action, "diff": diff,
                "results": results, "prev": last.hash if last else ZERO_HASH}
            entry = Entry.from_dict({**fields, "hash": entry_hash(fields)})
            self._write(fd, entry.line(), size)
        finally:
            os.close(fd)  # also releases the lock
        if created:
            fsync_dir(self.path.parent)  # the new file's name survives a crash too
        return entry

    def last(self) -> Entry | None:
        """The last entry (None for an empty or missing log); AuditError if
        the last line is torn or not an entry. Its `hash` is the anchor to
        keep for `verify(path, expect_head=...)`."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise AuditError(f"{self.path}: cannot read: {e.strerror}") from None
        try:
            self._lock(fd, fcntl.LOCK_SH)
            return self._last(fd)[0]
        finally:
            os.close(fd)

    def _lock(self, fd: int, kind: int) -> None:
        # blocking: the kernel wakes waiters in turn, so two busy writers
        # interleave (a polled LOCK_NB lets one starve the other); a holder
        # keeps it only for one read, one write and one fsync
        try:
            fcntl.flock(fd, kind)
        except OSError as e:
            raise AuditError(f"{self.path}: cannot lock: {e.strerror}") from None

    def _last(self, fd: int) -> tuple[Entry | None, int]:
        """(last entry or None, file size); AuditError naming the line if the
        last line is torn or not a valid entry."""
        size = os.fstat(fd).st_size
        if size == 0:
            return None, 0
        if os.pread(fd, 1, size - 1) != b"\n":
            start = self._line_start(fd, size)
            raise AuditError(
                f"{self.path} line {self._line_number(fd, start)}: the last line is incomplete "
                f"(a crash mid-write?); refusing to chain onto it. Look at it, then cut it off "
                f"with `truncate -s {start} {self.path}` and run `python -m control.audit "
                f"verify {self.path}`")
        start = self._line_start(fd, size - 1)
        entry, why = _parse_line(os.pread(fd, size - start, start))
        if entry is None:
            raise AuditError(f"{self.path} line {self._line_number(fd, start)}: the last entry "
                             f"is damaged: {why}; refusing to chain onto it. Run `python -m "
                             f"control.audit verify {self.path}`")
        return entry, size

    @staticmethod
    def _line_start(fd: int, end: int) -> int:
        """Offset of the first byte after the last b'\\n' before `end` (0 if none)."""
        pos = end
        while pos > 0:
            lo = max(0, pos - _TAIL_CHUNK)
            nl = os.pread(fd, pos - lo, lo).rfind(b"\n")
            if nl >= 0:
                return lo + nl + 1
            pos = lo
        return 0

    @staticmethod
    def _line_number(fd: int, start: int) -> int:
        """1-based number of the line starting at `start` (error paths only: reads the file)."""
        count, pos = 0, 0
        while pos < start:
            chunk = os.pread(fd, min(_TAIL_CHUNK, start - pos), pos)
            count += chunk.count(b"\n")
            pos += len(chunk)
        return count + 1

    def _write(self, fd: int, line: bytes, size: int) -> None:
        try:
            write_all(fd, line)  # one write(2) in practice; O_APPEND puts it at the end
            os.fsync(fd)
        except OSError as e:
            # take a partial line back so the chain stays appendable; if even
            # that fails, the torn line is caught by the next append and verify
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
                undone = "nothing was appended"
            except OSError:
                undone = "a partial line may remain"
            raise AuditError(f"{self.path}: append failed: {e.strerror}; {undone}") from None


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found. `entries` and `head` describe the intact part
    (everything, when ok): keep `head` elsewhere as the next anchor."""

    path: Path
    ok: bool
    entries: int                    # entries intact from line 1
    head: str                       # hash of the last intact entry (ZERO_HASH if none)
    line: int | None = None         # the first bad line
    reason: str | None = None       # "line 5: hash does not match its content (edited?)"
    anchor_line: int | None = None  # where expect_head was found

    def __str__(self) -> str:
        if self.ok:
            text = f"{self.path}: intact, {self.entries} entries"
            if self.anchor_line is not None:
                text += (f"; anchor found at line {self.anchor_line}, "
                         f"{self.entries - self.anchor_line} entries after it")
            return text
        return f"{self.path}: NOT intact: {self.reason}"


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes with their b'\\n') of a file; split on b'\\n' only
    (str.splitlines would also split inside values at U+2028 and friends)."""
    try:
        with open(path, "rb") as f:
            yield from enumerate(f, start=1)
    except OSError as e:
        raise AuditError(f"{path}: cannot read: {e.strerror}") from None


def verify(path: Path, expect_head: str | None = None) -> VerifyReport:
    """Check the whole chain: every line an entry, seq 1..n without gaps,
    each prev the previous hash, each hash recomputed. With `expect_head`
    (a hash kept from an earlier `verify`/`show`), also that this entry is
    still in the chain, which catches removal of the last entries.
    AuditError only if the file cannot be read."""
    path = Path(path)
    anchor = _hex64(expect_head) if expect_head is not None else None
    if expect_head is not None and anchor is None:
        raise AuditError(f"expect_head: {expect_head!r} is not a hash (64 hex digits)")
    prev, seq, count, anchor_line = ZERO_HASH, 0, 0, None
    if anchor == ZERO_HASH:
        anchor_line = 0  # the empty log's head is in every log

    def bad(line: int, why: str) -> VerifyReport:
        return VerifyReport(path, False, count, prev, line, f"line {line}: {why}", anchor_line)

    for n, raw in _lines(path):
        if not raw.endswith(b"\n"):
            return bad(n, "the last line is incomplete (a crash mid-write?)")
        if not raw.strip():
            return bad(n, "empty line")
        entry, why = _parse_line(raw)
        if entry is None:
            return bad(n, str(why))
        if entry.seq != seq + 1:
            if n == 1:
                hint = "entries removed from the start?"
            elif entry.seq > seq + 1:
                hint = "an entry removed?"
            else:
                hint = "an entry duplicated or reordered?"
            after = f"after seq {seq}" if n > 1 else "on the first line, expected 1"
            return bad(n, f"seq {entry.seq} {after} ({hint})")
        if entry.prev != prev:
            which = "the start (64 zeros)" if n == 1 else f"line {n - 1}'s hash"
            return bad(n, f"prev does not match {which} (an entry removed or reordered?)")
        prev, seq, count = entry.hash, entry.seq, count + 1
        if entry.hash == anchor:
            anchor_line = n
    if anchor is not None and anchor_line is None:
        return VerifyReport(path, False, count, prev, None,
                            f"the anchor {anchor} is not in the chain (head now {prev}, "
                            f"{count} entries): the last entries were removed, or the "
                            f"anchor is from another log", None)
    return VerifyReport(path, True, count, prev, None, None, anchor_line)


# --------------------------------------------------------------------------- CLI


def _result_text(dc: str, r: Mapping[str, Any]) -> str:
    status = "ok" if r.get("ok") else "FAILED"
    rest = " ".join(f"{k}={v}" for k, v in r.items() if k != "ok")
    return f"    {dc:<8} {status}" + (f" {rest}" if rest else "")


def render(entry: Entry) -> str:
    """An entry for people: one heading line, the diff, a line per DC."""
    lines = [f"#{entry.seq} {entry.time} {entry.who} ({entry.certificate[:16]}...) "
             f"{entry.action}",
             "    diff     " + json.dumps(entry.diff, ensure_ascii=False, sort_keys=True)]
    lines += [_result_text(dc, r) for dc, r in sorted(entry.results.items())]
    return "\n".join(lines)


def _hex_arg(text: str) -> str:
    if (fp := _hex64(text)) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hash (64 hex digits)")
    return fp


EXAMPLES = """examples:
  python -m control.audit verify /var/lib/privedge/audit.jsonl
  python -m control.audit verify audit.jsonl --head 3f2a...   (the head you kept earlier)
  python -m control.audit show audit.jsonl --last 20

exit status: 0 intact, 1 not intact or unreadable, 2 usage.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privedge-audit", description=__doc__.split("\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    v = sub.add_parser("verify", help="check the hash chain (changes nothing)")
    v.add_argument("file", type=Path)
    v.add_argument("--head", type=_hex_arg, metavar="HASH",
                   help="a head hash kept earlier: fail if that entry is gone (the tail cut off)")
    s = sub.add_parser("show", help="print entries and the head hash (changes nothing)")
    s.add_argument("file", type=Path)
    s.add_argument("--last", type=int, default=0, metavar="N",
                   help="only the last N entries (default: all)")
    s.add_argument("--json", action="store_true", help="entries as JSON Lines")
    return p


def _show(path: Path, last: int, as_json: bool) -> int:
    shown: collections.deque[tuple[int, Entry | None, str | None]] = collections.deque(
        maxlen=last if last > 0 else None)
    for n, raw in _lines(path):
        shown.append((n, *_parse_line(raw)))
    for n, entry, why in shown:
        if entry is None:
            print(f"line {n}: cannot show: {why}", file=sys.stderr)
        elif as_json:
            print(entry.line().decode("utf-8"), end="")
        else:
            print(render(entry))
    report = verify(path)
    if report.ok:
        print(f"head: {report.head} (seq {report.entries}); keep it elsewhere: "
              f"`verify {path} --head {report.head}` later detects removal of the last entries",
              file=sys.stderr if as_json else sys.stdout)
        return 0
    print(f"privedge-audit: {report}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # usage errors and --help, as a return value for in-process callers
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.cmd == "show":
            if args.last < 0:
                print("privedge-audit: --last N: N must be 0 (all) or more", file=sys.stderr)
                return 2
            return _show(args.file, args.last, args.json)
        report = verify(args.file, args.head)
    except AuditError as e:
        print(f"privedge-audit: {e}", file=sys.stderr)
        return 1
    if not report.ok:
        print(f"privedge-audit: {report}", file=sys.stderr)
        if report.entries:
            print(f"privedge-audit: lines 1-{report.entries} are intact; their head is "
                  f"{report.head}", file=sys.stderr)
        return 1
    print(report)
    print(f"head: {report.head} (keep it elsewhere; `verify {args.file} --head {report.head}` "
          f"later detects removal of the last entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
