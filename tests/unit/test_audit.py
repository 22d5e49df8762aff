"""control/audit.py: the hash-chained audit log; tampering is found at its line."""

from __future__ import annotations

import fcntl
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from control import audit, pki
from control.audit import AuditError, AuditLog

REPO = Path(__file__).resolve().parents[2]
FP_ALICE = "a1" * 32
FP_BOB = "b2" * 32
TEST_SECONDS = 60  # no test may take longer; a hung lock or child fails instead of hanging


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"test took longer than {TEST_SECONDS}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _fill(path: Path, n: int) -> list[audit.Entry]:
    log = AuditLog(path)
    return [log.append("alice", FP_ALICE, "deny add", {"add": [f"192.0.2.{i}/32"]},
                       {"dus": {"ok": True, "generation": i, "seconds": 0.41},
                        "iad": {"ok": False, "error": "connection refused"}},
                       when=1_700_000_000 + i)
            for i in range(1, n + 1)]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


# --------------------------------------------------------------------------- append, verify


def test_append_chains_entries_and_verify_passes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    entries = _fill(path, 5)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev == audit.ZERO_HASH
    assert all(b.prev == a.hash for a, b in itertools.pairwise(entries))
    assert entries[0].time == "2023-11-14T22:13:21.000000Z" and entries[0].unix == 1700000001
    # the hash is SHA-256 of the canonical encoding of everything but `hash`
    line = json.loads(_lines(path)[2])
    assert line["hash"] == entries[2].hash == audit.entry_hash(line)
    # what append returns is exactly what the file holds
    assert audit.Entry.from_dict(line) == entries[2]
    assert AuditLog(path).last() == entries[-1]

    report = audit.verify(path)
    assert report.ok and report.entries == 5 and report.head == entries[-1].hash
    assert report.reason is None and str(report) == f"{path}: intact, 5 entries"


def test_empty_or_missing_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert AuditLog(path).last() is None
    with pytest.raises(AuditError, match="cannot read"):
        audit.verify(path)
    path.touch()
    report = audit.verify(path)
    assert report.ok and report.entries == 0 and report.head == audit.ZERO_HASH


def test_unicode_values_survive_and_hash_over_utf8(tmp_path: Path) -> None:
    # ensure_ascii=False: names stay readable; U+2028 must not split a line
    path = tmp_path / "audit.jsonl"
    e = AuditLog(path).append("jürgen", FP_ALICE, "apply", {"zone": "bäckerei\u2028x"},
                              {"dus": {"ok": True}})
    assert "jürgen".encode() in path.read_bytes()
    assert audit.verify(path).ok and AuditLog(path).last() == e


@pytest.mark.parametrize("kwargs, match", [
    ({"who": ""}, "who: '' is not an operator name"),
    ({"certificate": "nope"}, "certificate: 'nope' is not a SHA-256 fingerprint"),
    ({"action": " "}, "action"),
    ({"diff": ["x"]}, "diff: a JSON object"),
    ({"diff": {"x": float("nan")}}, "diff: not JSON-able"),
    ({"diff": {"x": object()}}, "diff: not JSON-able"),
    ({"when": float("nan")}, "when: nan is not a unix time"),
    ({"results": {"dus": {"generation": 3}}}, r"results\['dus'\]: expected a dict with 'ok'"),
])
def test_append_refuses_bad_arguments_and_writes_nothing(tmp_path: Path, kwargs: dict,
                                                         match: str) -> None:
    path = tmp_path / "audit.jsonl"
    args = {"who": "alice", "certificate": FP_ALICE, "action": "apply", "diff": {},
            "results": {}} | kwargs
    with pytest.raises(AuditError, match=match):
        AuditLog(path).append(**args)
    assert not path.exists()


def test_openssl_style_fingerprint_is_normalised(tmp_path: Path) -> None:
    colons = ":".join(FP_ALICE[i:i + 2] for i in range(0, 64, 2)).upper()
    e = AuditLog(tmp_path / "a.jsonl").append("alice", colons, "purge", {}, {})
    assert e.certificate == FP_ALICE


# --------------------------------------------------------------------------- tampering


def test_edited_field_in_the_middle_is_found_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 8)
    lines = _lines(path)
    d = json.loads(lines[4])
    d["who"] = "mallory"
    lines[4] = json.dumps(d).encode()
    _write_lines(path, lines)
    report = audit.verify(path)
    assert not report.ok and report.line == 5 and report.entries == 4
    assert report.reason == "line 5: hash does not match its content (edited?)"


def test_edit_with_recomputed_hash_is_found_at_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 8)
    lines = _lines(path)
    d = json.loads(lines[4])
    d["diff"] = {"add": []}
    d["hash"] = audit.entry_hash(d)
    lines[4] = json.dumps(d).encode()
    _write_lines(path, lines)
    report = audit.verify(path)
    assert report.reason == ("line 6: prev does not match line 5's hash "
                             "(an entry removed or reordered?)")


def test_removed_middle_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 6)
    lines = _lines(path)
    del lines[2]
    _write_lines(path, lines)
    report = audit.verify(path)
    assert not report.ok and report.line == 3
    assert report.reason == "line 3: seq 4 after seq 2 (an entry removed?)"


def test_removed_first_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 3)
    _write_lines(path, _lines(path)[1:])
    assert audit.verify(path).reason == ("line 1: seq 2 on the first line, expected 1 "
                                         "(entries removed from the start?)")


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 6)
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    _write_lines(path, lines)
    report = audit.verify(path)
    assert report.line == 3 and report.reason is not None
    assert report.reason.startswith("line 3: seq 4 after seq 2")


def test_renumbered_removal_is_found_by_prev(tmp_path: Path) -> None:
    # remove line 3 and fix up seq (and hashes) of what follows: prev still breaks
    path = tmp_path / "audit.jsonl"
    _fill(path, 5)
    lines = _lines(path)
    del lines[2]
    for i in range(2, len(lines)):
        d = json.loads(lines[i])
        d["seq"] = i + 1
        d["hash"] = audit.entry_hash(d)
        lines[i] = json.dumps(d).encode()
    _write_lines(path, lines)
    assert audit.verify(path).reason == ("line 3: prev does not match line 2's hash "
                                         "(an entry removed or reordered?)")


def test_duplicated_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 4)
    lines = _lines(path)
    _write_lines(path, [*lines[:3], lines[2], lines[3]])
    assert audit.verify(path).reason == ("line 4: seq 3 after seq 3 "
                                         "(an entry duplicated or reordered?)")


@pytest.mark.parametrize("line, why", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object but list"),
    (b'{"seq": 1}', "field 'time' is missing"),
    (b"\xff\xfe", "not UTF-8"),
    (b"", "empty line"),
])
def test_garbage_lines_are_named(tmp_path: Path, line: bytes, why: str) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 2)
    _write_lines(path, [*_lines(path), line])
    report = audit.verify(path)
    assert report.line == 3 and report.reason is not None
    assert report.reason.startswith(f"line 3: {why}")


# --------------------------------------------------------------------------- the tail


def test_truncated_tail_passes_without_anchor_and_fails_with_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    entries = _fill(path, 6)
    old_head = audit.verify(path).head
    assert old_head == entries[-1].hash
    _write_lines(path, _lines(path)[:4])

    assert audit.verify(path).ok  # a shorter chain is still a valid chain
    report = audit.verify(path, expect_head=old_head)
    assert not report.ok and report.line is None and report.reason is not None
    assert report.reason.startswith(f"the anchor {old_head} is not in the chain")
    assert "the last entries were removed" in report.reason

    assert audit.main(["verify", str(path)]) == 0
    assert audit.main(["verify", str(path), "--head", old_head]) == 1


def test_anchor_still_passes_after_the_log_grew(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 3)
    anchor = audit.verify(path).head
    AuditLog(path).append("bob", FP_BOB, "purge", {"zone": "www"}, {"dus": {"ok": True}})
    report = audit.verify(path, expect_head=anchor.upper())
    assert report.ok and report.anchor_line == 3 and report.entries == 4
    assert "anchor found at line 3, 1 entries after it" in str(report)


def test_torn_last_line_refuses_append_and_verify_says_so(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 3)
    intact = path.stat().st_size
    with path.open("ab") as f:  # a crash in the middle of writing entry 4
        f.write(b'{"seq":4,"time":"2023-11-14T22:13:')

    with pytest.raises(AuditError) as err:
        AuditLog(path).append("bob", FP_BOB, "apply", {}, {})
    msg = str(err.value)
    assert msg.startswith(f"{path} line 4: the last line is incomplete")
    assert f"truncate -s {intact} {path}" in msg
    with pytest.raises(AuditError, match="line 4: the last line is incomplete"):
        AuditLog(path).last()

    report = audit.verify(path)
    assert not report.ok and report.entries == 3
    assert report.reason == "line 4: the last line is incomplete (a crash mid-write?)"

    # the operator cuts it off as told: the chain goes on from entry 3
    with path.open("r+b") as f:
        f.truncate(intact)
    assert AuditLog(path).append("bob", FP_BOB, "apply", {}, {}).seq == 4
    assert audit.verify(path).ok


def test_damaged_last_entry_refuses_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 2)
    lines = _lines(path)
    lines[-1] = lines[-1].replace(b'"alice"', b'"eve"')
    _write_lines(path, lines)
    with pytest.raises(AuditError, match=r"line 2: the last entry is damaged: hash does not"):
        AuditLog(path).append("bob", FP_BOB, "apply", {}, {})


# --------------------------------------------------------------------------- concurrency

_WRITER = """
import sys, time
from pathlib import Path
from control.audit import AuditLog
path, who, go, n = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + 20
while not go.exists():          # start together, so the appends interleave
    if time.monotonic() > deadline:
        sys.exit("never told to start")
    time.sleep(0.001)
log = AuditLog(path)
for i in range(n):
    log.append(who, "%s" % ("ab" * 32), "apply", {"i": i}, {"dus": {"ok": True}})
"""


def test_two_processes_appending_at_once_still_chain(tmp_path: Path) -> None:
    path, go = tmp_path / "audit.jsonl", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), who, str(go), "200"],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
             for who in ("p1", "p2")]
    try:
        time.sleep(0.3)  # both interpreters up and polling
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=45)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    report = audit.verify(path)
    assert report.ok, report.reason
    assert report.entries == 400
    whos = [json.loads(line)["who"] for line in _lines(path)]
    assert whos.count("p1") == whos.count("p2") == 200
    # they really ran at once (one after the other would switch writer once)
    assert sum(a != b for a, b in itertools.pairwise(whos)) > 1


def test_append_waits_for_another_writers_lock(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 1)
    done: list[audit.Entry] = []
    with path.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another writer, between read-last and append
        t = threading.Thread(target=lambda: done.append(
            AuditLog(path).append("bob", FP_BOB, "apply", {}, {})), daemon=True)
        t.start()
        t.join(0.3)
        assert t.is_alive() and not done and len(_lines(path)) == 1
        fcntl.flock(held, fcntl.LOCK_UN)
        t.join(10)
    assert not t.is_alive() and done[0].seq == 2 and audit.verify(path).ok


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_matches_openssl_and_cryptography(tmp_path: Path) -> None:
    ca, ca_key = pki.load_or_make_ca(tmp_path / "pki")
    cert, key = pki.issue(ca, ca_key, "alice", server=False, client=True, unit="admin")
    pki.write_pair(tmp_path / "pki" / "operators" / "alice", cert, key)
    crt = tmp_path / "pki" / "operators" / "alice.crt"

    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in",
                          str(crt)], capture_output=True, text=True, timeout=30, check=True)
    from_openssl = out.stdout.strip().split("=", 1)[1].replace(":", "").lower()
    der = cert.public_bytes(serialization.Encoding.DER)

    assert audit.fingerprint(crt.read_bytes()) == from_openssl
    assert audit.fingerprint(crt.read_text()) == from_openssl
    assert audit.fingerprint(der) == from_openssl
    assert audit.fingerprint(cert) == cert.fingerprint(hashes.SHA256()).hex() == from_openssl
    assert audit.fingerprint(ca) != from_openssl
    # and it is what an entry records
    e = AuditLog(tmp_path / "a.jsonl").append("alice", audit.fingerprint(der), "apply", {}, {})
    assert e.certificate == from_openssl
    assert isinstance(x509.load_der_x509_certificate(der), x509.Certificate)


def test_fingerprint_of_something_else_is_refused() -> None:
    with pytest.raises(AuditError, match="fingerprint: not a certificate in PEM or DER"):
        audit.fingerprint(b"\x30\x03\x02\x01\x01")
    with pytest.raises(AuditError, match="not a certificate"):
        audit.fingerprint("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# --------------------------------------------------------------------------- CLI


def test_cli_verify_prints_the_head(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    entries = _fill(path, 3)
    assert audit.main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: intact, 3 entries" in out
    assert f"head: {entries[-1].hash}" in out
    assert audit.main(["verify", str(path), "--head", entries[0].hash]) == 0
    assert "anchor found at line 1, 2 entries after it" in capsys.readouterr().out


def test_cli_verify_names_the_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    _fill(path, 4)
    lines = _lines(path)
    _write_lines(path, [lines[0], lines[1], lines[3]])
    assert audit.main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert "line 3: seq 4 after seq 2 (an entry removed?)" in err
    assert "lines 1-2 are intact" in err


def test_cli_usage_and_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert audit.main(["verify", str(tmp_path / "a"), "--head", "xyz"]) == 2
    assert "is not a hash" in capsys.readouterr().err
    assert audit.main(["frobnicate"]) == 2
    assert audit.main(["show", str(tmp_path / "a"), "--last", "-1"]) == 2
    assert audit.main(["verify", str(tmp_path / "missing")]) == 1
    assert "missing: cannot read" in capsys.readouterr().err


def test_cli_show(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    entries = _fill(path, 5)
    assert audit.main(["show", str(path), "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert "#3 " not in out and "#4 2023-11-14T22:13:24.000000Z alice (a1a1a1a1a1a1a1a1...) " \
        "deny add" in out
    assert '    diff     {"add": ["192.0.2.5/32"]}' in out
    assert "    dus      ok generation=5 seconds=0.41" in out
    assert "    iad      FAILED error=connection refused" in out
    assert f"head: {entries[-1].hash} (seq 5)" in out

    assert audit.main(["show", str(path), "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["seq"] for d in shown] == [1, 2, 3, 4, 5]

    with path.open("ab") as f:
        f.write(b'{"seq":6')
    assert audit.main(["show", str(path), "--last", "1"]) == 1
    err = capsys.readouterr().err
    assert "line 6: cannot show" in err and "line 6: the last line is incomplete" in err
