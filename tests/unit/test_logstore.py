"""core/: the log store over real mTLS on loopback, with certificates from
control/pki.py: ingest per core/PROTOCOL.md, encryption at rest, who may
read what, duplicates across restarts, strict records, retention, regions,
config and CLI."""

from __future__ import annotations

import errno
import gzip
import http.client
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from control import pki
from core import cli
from core import server as core_server
from core import store as core_store
from core.batch import BatchId
from core.config import ConfigError, core_config_dict, load_config, parse_config
from core.crypto import init_master_key, load_master_key
from core.records import LOG_KEYS, SAMPLE_KEYS, day_of
from core.server import CoreServer
from core.store import Store, StoreUnavailable

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 5.0
LOOPBACK = ipaddress.ip_address("127.0.0.1")
ZONES = ("www", "shop-eu", "shop-us", "blog")
MARKER = "zebra-7f3a9c-marker"
BOOT = "0123456789abcdef"
DAY = 86400.0


class Clock:
    """An injectable clock: tests move time by days without sleeping."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- PKI and config


@pytest.fixture(scope="module")
def net_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.run(d, pki.plan({"dus": [LOOPBACK], "fra": [LOOPBACK]}, [LOOPBACK],
                        {"olga": "viewer", "ada": "admin"}, ZONES))
    return d


def base_config(tmp: Path, net: Path, **over: object) -> dict:
    key = tmp / "secrets" / "master.key"
    if not key.exists():
        init_master_key(key)
    data = {
        "listen": "127.0.0.1", "port": 0,
        "cert": str(net / "core" / "core.crt"), "key": str(net / "core" / "core.key"),
        "ca": str(net / "ca.crt"), "data_dir": str(tmp / "data"), "master_key": str(key),
        "region": "eu", "sweep_interval": 3600,
        "zones": {"www": {"retention_days": 2}, "shop-eu": {"log_region": "eu"},
                  "shop-us": {"log_region": "us"}, "blog": {}},
    }
    data.update(over)
    return data


@pytest.fixture()
def start_core(tmp_path: Path, net_pki: Path) -> Iterator[Callable[..., CoreServer]]:
    """start_core(clock=..., **config overrides) → a started CoreServer; all
    are stopped at the end."""
    started: list[CoreServer] = []

    def start(clock: Callable[[], float] = time.time, **over: object) -> CoreServer:
        cfg = parse_config(base_config(tmp_path, net_pki, **over))
        server = CoreServer(cfg, clock=clock).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


# --------------------------------------------------------------------------- HTTP


def request(port: int, net: Path, who: str | None, method: str, path: str,
            body: bytes | None = None, headers: dict[str, str] | None = None
            ) -> tuple[int, bytes]:
    """One request over mTLS as `who` (a PKI stem like agents/dus, or None)."""
    ctx = ssl.create_default_context(cafile=net / "ca.crt")
    if who is not None:
        ctx.load_cert_chain(net / f"{who}.crt", net / f"{who}.key")
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def log_record(zone: str = "www", t: float | None = None, dc: str = "dus", i: int = 0,
               **over: object) -> dict:
    rec = {"time": round(time.time() if t is None else t, 3), "zone": zone, "dc": dc,
           "method": "GET", "host": "www.example.com", "path": f"/p/{i}?q={MARKER}",
           "status": 200, "bytes": 1234 + i, "cache_status": "hit", "action": "",
           "client_ip": f"203.0.113.{i % 250}", "user_agent": f"curl/8 {MARKER}"}
    rec.update(over)
    return rec


def sample_record(t: float | None = None, dc: str = "dus", **over: object) -> dict:
    t = time.time() if t is None else t
    rec = {"time": round(t, 3), "dc": dc, "zone": "www", "method": "GET", "status": 200,
           "bytes": 10, "cache_status": "miss", "action": "waf_scored", "latency_ms": 12.5,
           "tls_version": "TLSv1.3", "client": "0f" * 16, "period": day_of(t)}
    rec.update(over)
    return rec


def ndjson(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


_seq = iter(range(1, 10**6))


def post(port: int, net: Path, records: list[dict] | bytes, stream: str = "logs",
         dc: str = "dus", batch: str | None = None, who: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    raw = records if isinstance(records, bytes) else ndjson(records)
    h = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip",
         "X-Privedge-Batch": batch or f"{dc}:{stream}:{BOOT}:{next(_seq)}"}
    h.update(headers or {})
    status, body = request(port, net, who or f"agents/{dc}", "POST", f"/v1/ingest/{stream}",
                           gzip.compress(raw), h)
    return status, json.loads(body) if body else {}


def read_logs(port: int, net: Path, zone: str, day: str, who: str | None = None
              ) -> tuple[int, list[dict]]:
    status, body = request(port, net, who or f"zones/{zone}", "GET",
                           f"/v1/zones/{zone}/logs?day={day}")
    if status != 200:
        return status, []
    return status, [json.loads(line) for line in body.splitlines()]


# --------------------------------------------------------------------------- ingest and read


def test_ingest_splits_by_zone_and_day_and_reads_back(start_core, net_pki: Path) -> None:
    core = start_core()
    now = time.time()
    today, yesterday = day_of(now), day_of(now - DAY)
    records = [log_record("www", now, i=i) for i in range(13)] + \
        [log_record("shop-eu", now, i=i) for i in range(7)] + \
        [log_record("www", now - DAY, i=i) for i in range(3)]
    status, answer = post(core.port, net_pki, records)
    assert (status, answer) == (200, {"stored": 23, "duplicate": False})
    assert read_logs(core.port, net_pki, "www", today) == (200, records[:13])
    assert read_logs(core.port, net_pki, "www", yesterday) == (200, records[20:])
    assert read_logs(core.port, net_pki, "shop-eu", today) == (200, records[13:20])
    assert read_logs(core.port, net_pki, "blog", today) == (200, [])
    data = core.config.data_dir
    assert len(list((data / "logs" / "www").glob("*/*.pec"))) == 2
    assert (data / "keys" / "logs" / "www" / f"{yesterday}.key").is_file()
    stats = json.loads(request(core.port, net_pki, "operators/olga", "GET", "/v1/stats")[1])
    assert stats["stored"]["logs"]["www"][today] == {
        "batches": 1, "records": 13, "bytes": stats["stored"]["logs"]["www"][today]["bytes"]}
    assert stats["received"]["logs"]["www"] == {"records": 16, "batches": 1}


def test_stored_files_hold_no_plaintext(start_core, net_pki: Path) -> None:
    core = start_core()
    assert post(core.port, net_pki, [log_record(i=i) for i in range(50)])[0] == 200
    assert post(core.port, net_pki, [sample_record(method=MARKER[:20])], "sample")[0] == 200
    files = [p for p in core.config.data_dir.rglob("*") if p.is_file()]
    assert len(files) > 4
    for p in files:
        data = p.read_bytes()
        for needle in (MARKER.encode(), MARKER[:20].encode(), b"203.0.113.", b"curl/8",
                       b"client_ip", b"user_agent"):
            assert needle not in data, f"{p} holds {needle!r}"
    for p in core.config.data_dir.rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


def test_who_may_send_and_read(start_core, net_pki: Path) -> None:
    core = start_core()
    day = day_of(time.time())
    assert post(core.port, net_pki, [log_record()])[0] == 200
    path = f"/v1/zones/www/logs?day={day}"
    for who in ("zones/shop-eu", "agents/dus", "operators/ada", None):
        assert request(core.port, net_pki, who, "GET", path)[0] == 403, who
    assert request(core.port, net_pki, "zones/www", "GET", path)[0] == 200
    for endpoint in (f"/v1/sample?day={day}", "/v1/stats"):
        for who in ("zones/www", "agents/dus", None):
            assert request(core.port, net_pki, who, "GET", endpoint)[0] == 403, (who, endpoint)
        assert request(core.port, net_pki, "operators/olga", "GET", endpoint)[0] == 200
    for who in ("zones/www", "operators/ada", "prometheus"):
        assert post(core.port, net_pki, [log_record()], who=who)[0] == 403, who
    # No certificate at all: the handshake completes, the answer is 403.
    assert request(core.port, net_pki, None, "POST", "/v1/ingest/logs", b"x",
                   {"X-Privedge-Batch": f"dus:logs:{BOOT}:99"})[0] == 403
    # The batch id names another DC than the certificate's.
    status, answer = post(core.port, net_pki, [log_record()], dc="dus",
                          batch=f"fra:logs:{BOOT}:1")
    assert status == 403 and "fra" in answer["error"]


def test_a_certificate_from_another_ca_fails_the_handshake(start_core, net_pki: Path,
                                                           tmp_path: Path) -> None:
    core = start_core()
    other = tmp_path / "other"
    pki.run(other, pki.plan({"dus": []}, [], {}, ["www"]))
    ctx = ssl.create_default_context(cafile=net_pki / "ca.crt")
    ctx.load_cert_chain(other / "zones" / "www.crt", other / "zones" / "www.key")
    conn = http.client.HTTPSConnection("127.0.0.1", core.port, context=ctx, timeout=TIMEOUT)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", "/v1/zones/www/logs?day=2024-01-01")
        conn.getresponse().read()
    conn.close()


def test_a_batch_id_is_stored_once_also_after_a_restart(start_core, net_pki: Path) -> None:
    core = start_core()
    records = [log_record(i=i) for i in range(5)]
    batch = f"dus:logs:{BOOT}:7"
    assert post(core.port, net_pki, records, batch=batch) == (
        200, {"stored": 5, "duplicate": False})
    assert post(core.port, net_pki, records, batch=batch) == (
        200, {"stored": 0, "duplicate": True})
    core.stop()
    core = start_core()
    assert post(core.port, net_pki, records, batch=batch) == (
        200, {"stored": 0, "duplicate": True})
    # Another boot of the same DC with the same seq is another batch.
    assert post(core.port, net_pki, records, batch=f"dus:logs:{'f' * 16}:7")[1]["stored"] == 5
    assert len(read_logs(core.port, net_pki, "www", day_of(time.time()))[1]) == 10
    stats = json.loads(request(core.port, net_pki, "operators/olga", "GET", "/v1/stats")[1])
    assert stats["duplicates"]["logs"] == 1   # since this start


def test_an_uncommitted_chunk_is_dropped_at_start(start_core, net_pki: Path) -> None:
    """A crash between writing a chunk and its journal line: the next start
    removes the chunk, and the edge's retry stores the batch once."""
    core = start_core()
    assert post(core.port, net_pki, [log_record()])[0] == 200
    data = core.config.data_dir
    core.stop()
    day_dir = next((data / "logs" / "www").iterdir())
    stored = next(day_dir.glob("*.pec"))
    orphan = day_dir / re.sub(r"^\d{12}", f"{999:012d}", stored.name)
    shutil.copy(stored, orphan)
    (day_dir / ".tmp.deadbeef").write_bytes(b"half")
    core = start_core()
    assert sorted(p.name for p in day_dir.iterdir()) == [stored.name]
    assert len(read_logs(core.port, net_pki, "www", day_dir.name)[1]) == 1


BAD_LOGS = [
    ("missing key", {"drop": "user_agent"}, "user_agent", "missing"),
    ("extra key", {"set": ("referer", "x")}, "referer", "not a key"),
    ("time as string", {"set": ("time", "now")}, "time", "not a number"),
    ("time in the future", {"set": ("time", time.time() + 7200)}, "time", "future"),
    ("status as bool", {"set": ("status", True)}, "status", "not an integer"),
    ("negative bytes", {"set": ("bytes", -1)}, "bytes", "not an integer"),
    ("cache status", {"set": ("cache_status", "HIT")}, "cache_status", "not one of"),
    ("client ip", {"set": ("client_ip", "not-an-ip")}, "client_ip", "not an IP"),
    ("another dc", {"set": ("dc", "fra")}, "dc", "not the sender"),
    ("unknown zone", {"set": ("zone", "nowhere")}, "zone", "not a zone"),
    ("method as number", {"set": ("method", 5)}, "method", "not a string"),
]


@pytest.mark.parametrize(("name", "change", "field", "why"), BAD_LOGS,
                         ids=[c[0] for c in BAD_LOGS])
def test_a_bad_record_is_refused_naming_line_and_field_and_nothing_is_stored(
        start_core, net_pki: Path, name: str, change: dict, field: str, why: str) -> None:
    core = start_core()
    records = [log_record(i=i) for i in range(5)]
    if "drop" in change:
        del records[2][change["drop"]]
    else:
        records[2][change["set"][0]] = change["set"][1]
    status, answer = post(core.port, net_pki, records)
    assert status == 400
    assert (answer["line"], answer["field"]) == (3, field)
    assert answer["error"].startswith(f"line 3: {field}:") and why in answer["error"]
    if "set" in change:   # the field is named, its value never shown
        assert repr(change["set"][1]) not in answer["error"]
        assert str(change["set"][1]) not in answer["error"].split(":", 2)[2]
    assert not [p for p in core.config.data_dir.glob("logs/**/*") if p.is_file()]


@pytest.mark.parametrize(("body", "why"), [
    (b'{"time": 1}\nnot json\n', "line 1"),
    (b"[1, 2]\n", "line 1: (record): not a JSON object"),
    (b"\n", "line 1: (line): not JSON"),
    (b'{"time": NaN}\n', "line 1: (line): not JSON"),
])
def test_lines_that_are_not_records_are_refused(start_core, net_pki: Path, body: bytes,
                                                why: str) -> None:
    core = start_core()
    status, answer = post(core.port, net_pki, body)
    assert status == 400 and answer["error"].startswith(why), answer


def test_the_sample_refuses_addresses_and_extra_keys(start_core, net_pki: Path) -> None:
    core = start_core()
    good = [sample_record() for _ in range(3)]
    assert post(core.port, net_pki, good, "sample") == (200, {"stored": 3, "duplicate": False})
    for field, value in (("method", "192.0.2.7"), ("zone", "2001:db8::1"),
                         ("action", "::ffff:198.51.100.1")):
        status, answer = post(core.port, net_pki, [sample_record(), sample_record(
            **{field: value})], "sample")
        assert status == 400, field
        assert (answer["line"], answer["field"]) == (2, field)
        assert "IP address" in answer["error"]
    bad = sample_record()
    bad["client_ip"] = "192.0.2.7"
    status, answer = post(core.port, net_pki, [bad], "sample")
    assert (status, answer["field"]) == (400, "client_ip")
    status, answer = post(core.port, net_pki, [sample_record(client="192.0.2.7")], "sample")
    assert status == 400 and answer["field"] == "client"
    status, body = request(core.port, net_pki, "operators/olga", "GET",
                           f"/v1/sample?day={day_of(time.time())}")
    assert status == 200 and [json.loads(x) for x in body.splitlines()] == good
    assert set(good[0]) == set(SAMPLE_KEYS)


def test_region_and_zone_must_be_this_cores(start_core, net_pki: Path) -> None:
    core = start_core()   # region eu
    status, answer = post(core.port, net_pki, [log_record("shop-eu"), log_record("shop-us")])
    assert status == 400 and answer["line"] == 2 and answer["field"] == "zone"
    assert "the zone logs in region us" in answer["error"]
    status, answer = post(core.port, net_pki, [log_record("nowhere")])
    assert status == 400 and answer["error"] == "line 1: zone: not a zone of this core's config"
    assert post(core.port, net_pki, [log_record("shop-eu"), log_record("blog")])[0] == 200


def test_a_core_without_region_takes_only_zones_without_one(start_core, net_pki: Path) -> None:
    core = start_core(region=None)
    status, answer = post(core.port, net_pki, [log_record("shop-eu")])
    assert status == 400 and "this core serves no region" in answer["error"]
    assert post(core.port, net_pki, [log_record("www")])[0] == 200


def test_body_limits_and_headers(start_core, net_pki: Path) -> None:
    core = start_core(max_body_bytes=4096, max_expanded_bytes=65536)
    h = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip",
         "X-Privedge-Batch": f"dus:logs:{BOOT}:1"}
    big = os.urandom(8192)
    assert request(core.port, net_pki, "agents/dus", "POST", "/v1/ingest/logs", big, h
                   )[0] == 413
    bomb = gzip.compress(b" " * 200_000)   # small compressed, large expanded
    assert len(bomb) < 4096
    assert request(core.port, net_pki, "agents/dus", "POST", "/v1/ingest/logs", bomb, h
                   )[0] == 413
    assert request(core.port, net_pki, "agents/dus", "POST", "/v1/ingest/logs",
                   b"plain text", h)[0] == 400
    status, answer = post(core.port, net_pki, [log_record()], batch="dus:logs:xyz:1")
    assert status == 400 and "X-Privedge-Batch" in answer["error"]
    status, answer = post(core.port, net_pki, [log_record()], batch=f"dus:sample:{BOOT}:1")
    assert status == 400 and "stream" in answer["error"]
    status, answer = post(core.port, net_pki, [log_record()],
                          headers={"Content-Encoding": "identity"})
    assert status == 400 and "gzip" in answer["error"]
    stats = json.loads(request(core.port, net_pki, "operators/olga", "GET", "/v1/stats")[1])
    assert stats["rejected"]["logs"] == {"413": 2, "400": 4}


# --------------------------------------------------------------------------- retention


def test_the_sweep_deletes_expired_days_and_their_keys(start_core, net_pki: Path,
                                                       tmp_path: Path) -> None:
    clock = Clock()
    core = start_core(clock=clock, sample_retention_days=1)
    now = clock.now
    d0, d1 = day_of(now), day_of(now + DAY)
    assert post(core.port, net_pki, [log_record("www", now, i=i) for i in range(4)] +
                [log_record("blog", now)])[0] == 200
    assert post(core.port, net_pki, [sample_record(now)], "sample")[0] == 200
    data = core.config.data_dir
    copy = tmp_path / "stolen"
    shutil.copytree(data, copy)   # someone copies the data directory before the sweep
    # www keeps 2 days, blog 7, the sample 1: a day later only the sample goes.
    clock.now = now + DAY
    report = core.sweep()
    assert [("/".join(p.parts)) for p in report.removed] == [f"sample/{d0}"]
    assert post(core.port, net_pki, [log_record("www", clock.now)])[0] == 200
    clock.now = now + 2 * DAY
    report = core.sweep()
    assert ["/".join(p.parts) for p in report.removed] == [f"logs/www/{d0}"]
    assert not (data / "logs" / "www" / d0).exists()
    assert not (data / "keys" / "logs" / "www" / f"{d0}.key").exists()
    assert (data / "keys" / "logs" / "www" / f"{d1}.key").exists()
    assert (data / "logs" / "blog" / d0).is_dir()
    assert read_logs(core.port, net_pki, "www", d0) == (200, [])
    assert len(read_logs(core.port, net_pki, "www", d1)[1]) == 1
    # The copied files, put back in place, no longer decrypt: the key is gone.
    shutil.copytree(copy / "logs" / "www" / d0, data / "logs" / "www" / d0)
    assert read_logs(core.port, net_pki, "www", d0) == (200, [])
    # Nor does a copied chunk moved into a day whose key exists.
    chunk = next((copy / "logs" / "www" / d0).glob("*.pec"))
    shutil.copy(chunk, data / "logs" / "www" / d1 / chunk.name)
    assert len(read_logs(core.port, net_pki, "www", d1)[1]) == 1
    stats = json.loads(request(core.port, net_pki, "operators/olga", "GET", "/v1/stats")[1])
    assert stats["unreadable_chunks"] == 1


def test_records_already_past_retention_are_not_stored(start_core, net_pki: Path) -> None:
    clock = Clock()
    core = start_core(clock=clock)
    old = clock.now - 3 * DAY   # www keeps 2 days
    status, answer = post(core.port, net_pki, [log_record("www", old), log_record("www"),
                                               log_record("blog", old)])
    assert (status, answer["stored"]) == (200, 2)
    assert not (core.config.data_dir / "logs" / "www" / day_of(old)).exists()
    stats = json.loads(request(core.port, net_pki, "operators/olga", "GET", "/v1/stats")[1])
    assert stats["expired_on_arrival"]["logs"] == 1


def test_the_sweep_runs_by_itself_every_interval(start_core, net_pki: Path) -> None:
    clock = Clock()
    core = start_core(clock=clock, sweep_interval=0.05)
    assert post(core.port, net_pki, [log_record("www", clock.now)])[0] == 200
    day_dir = core.config.data_dir / "logs" / "www" / day_of(clock.now)
    assert day_dir.is_dir()
    clock.now += 3 * DAY
    deadline = time.monotonic() + TIMEOUT
    while day_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not day_dir.exists()


# --------------------------------------------------------------------------- config


def test_config_refusals_name_path_value_and_why(tmp_path: Path, net_pki: Path) -> None:
    def refused(match: str, **over: object) -> None:
        with pytest.raises(ConfigError, match=match):
            parse_config(base_config(tmp_path, net_pki, **over), "core.yaml")

    refused(r"master_key .* is inside data_dir", master_key=str(tmp_path / "data" / "k"))
    refused(r"master_key .* is inside data_dir", master_key=str(tmp_path / "data"))
    refused(r"core.yaml: zones.www.retention_days: 8: must be at most 7",
            zones={"www": {"retention_days": 8}})
    job = {"name": "siem", "url": "https://logs.example.net/in"}
    refused(r"zones.www.logpush\[0\].url: 'http://x.example': not an https",
            zones={"www": {"logpush": [{**job, "url": "http://x.example"}]}})
    refused(r"'referer' not a log record key",
            zones={"www": {"logpush": [{**job, "fields": ["time", "referer"]}]}})
    refused(r"sample_rate: 0: Input should be greater than 0",
            zones={"www": {"logpush": [{**job, "sample_rate": 0}]}})
    refused(r"is set by the pusher itself",
            zones={"www": {"logpush": [{**job, "headers": {"Content-Encoding": "br"}}]}})
    refused(r"zones.Www.\[key\]: 'Www': 'Www' is not a name", zones={"Www": {}})
    refused(r"listen: 'core': not an IPv4", listen="core")
    refused(r"job names must be unique", zones={"www": {"logpush": [job, job]}})
    # A URL with a password is refused without showing it (nor the URL).
    for url in ("https://siem:hunter2-pw@logs.example.net/in", "http://u:hunter2-pw@x.example",
                "https://u:hunter2-pw@[::1/in"):
        with pytest.raises(ConfigError) as err:
            parse_config(base_config(tmp_path, net_pki, zones={"www": {"logpush": [
                {**job, "url": url}]}}), "core.yaml")
        assert "hunter2" not in str(err.value), str(err.value)
        assert re.search(r"zones.www.logpush\[0\]: url: credentials", str(err.value))
    ok = parse_config(base_config(tmp_path, net_pki, zones={"www": {"logpush": [job]}}))
    assert ok.zones["www"].logpush[0].fields == LOG_KEYS
    assert ok.zones["www"].retention_days == 7


def test_core_config_dict_from_the_lab_topology(tmp_path: Path) -> None:
    topo = yaml.safe_load((ROOT / "lab" / "topology.yaml").read_text())
    data = core_config_dict(topo["zones"], listen="198.18.0.10", cert="/pki/core/core.crt",
                            key="/pki/core/core.key", ca="/pki/ca.crt",
                            data_dir=tmp_path / "data", master_key=tmp_path / "master.key",
                            region="eu", retention_days=3)
    assert data["zones"] == {"www": {"retention_days": 3},
                             "shop-eu": {"retention_days": 3, "log_region": "eu"}}
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).zones["shop-eu"].log_region == "eu"
    assert core_config_dict(["a", {"name": "b", "log_region": "us"}], listen="::1", cert="c",
                            key="k", ca="ca", data_dir="/d", master_key="/m"
                            )["zones"]["b"]["log_region"] == "us"
    with pytest.raises(ConfigError, match="must be at most 7"):
        core_config_dict(["a"], listen="::1", cert="c", key="k", ca="ca", data_dir="/d",
                         master_key="/m", retention_days=9)


def test_a_wrong_master_key_is_refused_before_anything_is_written(
        start_core, net_pki: Path, tmp_path: Path) -> None:
    core = start_core()
    assert post(core.port, net_pki, [log_record()])[0] == 200
    core.stop()
    other = tmp_path / "secrets" / "other.key"
    init_master_key(other)
    with pytest.raises(Exception, match="written with another master key"):
        start_core(master_key=str(other))


# --------------------------------------------------------------------------- CLI


def test_cli_init_key_check_sweep_and_usage(tmp_path: Path, net_pki: Path, capsys) -> None:
    key = tmp_path / "keys" / "master.key"
    assert cli.main(["init-key", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    assert cli.main(["init-key", str(key)]) == 1
    assert "never overwritten" in capsys.readouterr().err
    assert key.read_bytes() == before
    cfg = tmp_path / "core.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, net_pki, master_key=str(key))))
    assert cli.main(["check", str(cfg)]) == 0
    assert "ok: 4 zone(s)" in capsys.readouterr().out
    assert not (tmp_path / "data").exists(), "check wrote something"
    assert cli.main(["sweep", str(cfg)]) == 0
    assert "0 day(s) removed" in capsys.readouterr().out
    key.chmod(0o644)
    assert cli.main(["check", str(cfg)]) == 1
    assert "chmod 600" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, net_pki,
                                              zones={"www": {"retention_days": 30}})))
    assert cli.main(["check", str(cfg)]) == 1
    assert "zones.www.retention_days: 30: must be at most 7" in capsys.readouterr().err
    assert cli.main(["check", str(tmp_path / "none.yaml")]) == 1
    assert cli.main([]) == 2
    assert cli.main(["serve"]) == 2
    assert cli.main(["frobnicate", "x"]) == 2


def test_serve_names_phases_reloads_on_hup_and_stops_on_term(tmp_path: Path,
                                                             net_pki: Path) -> None:
    cfg = tmp_path / "core.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, net_pki)))
    proc = subprocess.Popen([sys.executable, "-m", "core", "serve", str(cfg)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 20
        port = None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"ready: https://127\.0\.0\.1:(\d+)", line):
                port = int(m[1])
        assert port, "".join(lines)
        phases = [re.sub(r"^privedge-core: (\w[\w ]*):.*\n", r"\1", x) for x in lines]
        assert phases == ["config", "master key", "store", "retention", "tls", "listen",
                          "logpush", "ready"]
        assert post(port, net_pki, [log_record()])[0] == 200
        proc.send_signal(signal.SIGHUP)
        assert "reload: certificates loaded again" in proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def test_a_failed_reload_keeps_the_current_certificates(start_core, net_pki: Path,
                                                        tmp_path: Path) -> None:
    pki_copy = tmp_path / "pki-copy"
    shutil.copytree(net_pki, pki_copy)
    core = start_core(cert=str(pki_copy / "core" / "core.crt"),
                      key=str(pki_copy / "core" / "core.key"))
    (pki_copy / "core" / "core.crt").write_text("not a certificate")
    with pytest.raises(ssl.SSLError):
        core.reload()
    assert post(core.port, net_pki, [log_record()])[0] == 200


def test_one_process_per_data_directory(start_core, net_pki: Path, tmp_path: Path,
                                        capsys) -> None:
    core = start_core()
    cfg = tmp_path / "core.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, net_pki)))
    assert cli.main(["sweep", str(cfg)]) == 1
    assert "another privedge-core has" in capsys.readouterr().err
    assert post(core.port, net_pki, [log_record()])[0] == 200


def test_a_torn_journal_line_is_cut_and_seqs_keep_growing(start_core, net_pki: Path) -> None:
    core = start_core()
    assert post(core.port, net_pki, [log_record()], batch=f"dus:logs:{BOOT}:1")[0] == 200
    data = core.config.data_dir
    core.stop()
    journal = next((data / "journal").glob("*.log"))
    with journal.open("ab") as f:
        f.write(b"2 dus:logs:")   # a crash in the middle of a commit
    core = start_core()
    assert post(core.port, net_pki, [log_record()], batch=f"dus:logs:{BOOT}:2")[1] == {
        "stored": 1, "duplicate": False}
    assert post(core.port, net_pki, [log_record()], batch=f"dus:logs:{BOOT}:1")[1] == {
        "stored": 0, "duplicate": True}
    lines = journal.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["1", f"dus:logs:{BOOT}:1"],
                                                    ["2", f"dus:logs:{BOOT}:2"]]


# --------------------------------------------------------------------------- review fixes


def stats_of(core: CoreServer, net: Path) -> dict:
    status, body = request(core.port, net, "operators/olga", "GET", "/v1/stats")
    assert status == 200
    return json.loads(body)


def journal_lines(data: Path) -> list[bytes]:
    return b"".join(p.read_bytes() for p in sorted((data / "journal").glob("*.log"))
                    ).splitlines(keepends=True)


def failing_journal_write(monkeypatch: pytest.MonkeyPatch, fd: int) -> list[bool]:
    """os.write on the journal's fd writes 7 bytes, then fails with ENOSPC,
    while armed[0] (once)."""
    real = os.write
    armed = [True]

    def write(f: int, data: bytes) -> int:
        if f == fd and armed[0]:
            armed[0] = False
            real(f, bytes(data[:7]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, data)

    monkeypatch.setattr(os, "write", write)
    return armed


def test_a_failed_journal_append_is_cut_back_and_acknowledged_batches_stay(
        start_core, net_pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC half way through a journal line: the half line is cut off, so
    the next commit's line is a line of its own, and after a restart every
    acknowledged batch is still stored and still a duplicate."""
    core = start_core()
    b1, b2, b3 = (f"dus:logs:{BOOT}:{n}" for n in (1, 2, 3))
    assert post(core.port, net_pki, [log_record(i=1)], batch=b1)[0] == 200
    failing_journal_write(monkeypatch, core.store._journal[1])
    status, answer = post(core.port, net_pki, [log_record(i=2)], batch=b2)
    assert status == 503 and "cannot commit" in answer["error"]
    assert post(core.port, net_pki, [log_record(i=3)], batch=b3)[0] == 200
    monkeypatch.undo()
    data = core.config.data_dir
    assert [line.split()[1] for line in journal_lines(data)] == [b1.encode(), b3.encode()]
    core.stop()
    core = start_core()
    assert post(core.port, net_pki, [log_record(i=1)], batch=b1)[1]["duplicate"] is True
    assert post(core.port, net_pki, [log_record(i=3)], batch=b3)[1]["duplicate"] is True
    assert post(core.port, net_pki, [log_record(i=2)], batch=b2)[1] == {
        "stored": 1, "duplicate": False}   # the edge's retry of the failed one
    got = read_logs(core.port, net_pki, "www", day_of(time.time()))[1]
    assert [r["bytes"] for r in got] == [1235, 1237, 1236]


def test_if_the_cut_back_fails_too_writes_are_refused_until_restart(
        start_core, net_pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    core = start_core()
    assert post(core.port, net_pki, [log_record(i=1)], batch=f"dus:logs:{BOOT}:1")[0] == 200
    failing_journal_write(monkeypatch, core.store._journal[1])

    def ftruncate(fd: int, size: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    assert post(core.port, net_pki, [log_record(i=2)], batch=f"dus:logs:{BOOT}:2")[0] == 503
    monkeypatch.undo()
    status, answer = post(core.port, net_pki, [log_record(i=3)], batch=f"dus:logs:{BOOT}:3")
    assert status == 503 and "until restart" in answer["error"]
    assert stats_of(core, net_pki)["writes_refused"] is True
    core.stop()
    core = start_core()   # the torn line is cut at open
    assert post(core.port, net_pki, [log_record(i=1)], batch=f"dus:logs:{BOOT}:1"
                )[1]["duplicate"] is True
    assert post(core.port, net_pki, [log_record(i=3)], batch=f"dus:logs:{BOOT}:3")[0] == 200
    assert stats_of(core, net_pki)["journal_errors"] == 0


@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_malformed_journal_line_is_reported_by_position(start_core, net_pki: Path, capfd,
                                                          where: str) -> None:
    """Not skipped silently: counted and reported by file and line, never by
    its content. One that was the last commit does not get its chunks
    deleted: they are kept, and their batch id is still a duplicate."""
    core = start_core()
    batches = [f"dus:logs:{BOOT}:{n}" for n in (1, 2, 3)]
    for n, b in enumerate(batches):
        assert post(core.port, net_pki, [log_record(i=n)], batch=b)[0] == 200
    data = core.config.data_dir
    core.stop()
    journal = next((data / "journal").glob("*.log"))
    lines = journal.read_bytes().splitlines(keepends=True)
    bad = 1 if where == "middle" else 2
    lines[bad] = b"garbage 203.0.113.77 " + MARKER.encode() + b"\n"
    journal.write_bytes(b"".join(lines))
    capfd.readouterr()
    core = start_core()
    err = capfd.readouterr().err
    assert f"journal/{journal.name} line {bad + 1}: malformed" in err
    assert MARKER not in err and "203.0.113.77" not in err
    assert stats_of(core, net_pki)["journal_errors"] == 1
    assert len(read_logs(core.port, net_pki, "www", day_of(time.time()))[1]) == 3
    for b in batches:
        assert post(core.port, net_pki, [log_record()], batch=b)[1]["duplicate"] is True, b
    assert post(core.port, net_pki, [log_record()], batch=f"dus:logs:{BOOT}:4")[0] == 200
    seqs = [int(line.split()[0]) for line in journal_lines(data) if b"garbage" not in line]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def _record_line(**raw: str) -> bytes:
    """A log record's JSON line with some values replaced by raw JSON text."""
    rec = log_record(**{k: f"@{k}@" for k in raw})
    text = json.dumps(rec)
    for k, v in raw.items():
        text = text.replace(f'"@{k}@"', v)
    return text.encode() + b"\n"


FAILING_LINES = [
    # A lone surrogate decodes, and cannot be encoded as UTF-8 to store it.
    ("lone surrogate", {"user_agent": f'"\\ud800 {MARKER}"'}, "user_agent"),
    # math.isfinite raises OverflowError on it.
    ("400-digit time", {"time": "1" + "0" * 400}, "time"),
    ("400-digit latency", None, "latency_ms"),
    # The decoder raises RecursionError.
    ("deep nesting", {"user_agent": "[" * 100_000 + "]" * 100_000}, "(line)"),
]


@pytest.mark.parametrize(("name", "raw", "field"), FAILING_LINES,
                         ids=[c[0] for c in FAILING_LINES])
def test_a_record_that_would_make_the_core_fail_is_a_400_and_never_printed(
        start_core, net_pki: Path, capfd, name: str, raw: dict | None, field: str) -> None:
    core = start_core()
    if raw is None:   # the sample's number
        rec = sample_record(latency_ms="@l@")
        body = json.dumps(rec).replace('"@l@"', "9" * 400).encode() + b"\n"
        stream = "sample"
    else:
        body, stream = _record_line(**raw), "logs"
    good = ndjson([log_record(i=1)]) if stream == "logs" else ndjson([sample_record()])
    status, answer = post(core.port, net_pki, good + body, stream)
    assert status == 400, answer
    assert (answer["line"], answer["field"]) == (2, field)
    assert not [p for p in core.config.data_dir.glob(f"{stream}/**/*") if p.is_file()]
    out = capfd.readouterr()
    for text in (out.out, out.err, answer["error"]):
        assert MARKER not in text and "203.0.113" not in text and "curl/8" not in text


def test_an_ingest_still_sealing_when_close_gives_up_writes_nothing(
        tmp_path: Path, net_pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(base_config(tmp_path, net_pki))
    store = Store(cfg, load_master_key(cfg.master_key)).open()
    monkeypatch.setattr(core_store, "CLOSE_WAIT", 0.05)
    sealed, release = threading.Event(), threading.Event()
    prepare = store._prepare

    def slow_prepare(*args: object) -> object:
        out = prepare(*args)   # the temporary files are written
        sealed.set()
        release.wait(TIMEOUT)
        return out

    monkeypatch.setattr(store, "_prepare", slow_prepare)
    failed: list[BaseException] = []

    def ingest() -> None:
        try:
            store.ingest(BatchId.parse(f"dus:logs:{BOOT}:1"), ndjson([log_record()]))
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=ingest)
    t.start()
    assert sealed.wait(TIMEOUT)
    store.close()   # gives up waiting after CLOSE_WAIT
    release.set()
    t.join(TIMEOUT)
    assert len(failed) == 1 and isinstance(failed[0], StoreUnavailable)
    assert store._journal is None, "the journal was opened again after close"
    assert not list((cfg.data_dir / "journal").glob("*.log"))
    assert not [p for p in (cfg.data_dir / "logs").rglob("*") if p.is_file()]
    with pytest.raises(StoreUnavailable):
        store.sweep()


def test_a_name_that_is_not_a_day_does_not_stop_retention(start_core, net_pki: Path,
                                                          capfd) -> None:
    clock = Clock()
    core = start_core(clock=clock)
    assert post(core.port, net_pki, [log_record("www", clock.now)])[0] == 200
    data = core.config.data_dir
    core.stop()
    strays = [data / "logs" / "www" / "2024-13-45", data / "sample" / "2024-02-30",
              data / "keys" / "logs" / "www" / "2024-13-45.key",
              data / "journal" / "2024-99-01.log"]
    strays[0].mkdir()
    strays[1].mkdir()
    strays[2].write_bytes(b"not a key")
    strays[3].write_bytes(b"")
    core = start_core(clock=clock)   # its first sweep meets them
    clock.now += 3 * DAY
    assert [p.day for p in core.sweep().removed] == [day_of(clock.now - 3 * DAY)]
    assert all(p.exists() for p in strays), "a stray was removed"
    stats = stats_of(core, net_pki)
    assert stats["stray_entries"] == 4
    assert stats["sweep_failures"] == 0 and stats["last_sweep"] == clock.now
    assert "logs/www/2024-13-45: not a day" in capfd.readouterr().err


def test_the_sweeper_survives_any_failure_and_counts_it(start_core, net_pki: Path,
                                                        capfd) -> None:
    clock = Clock()
    core = start_core(clock=clock, sweep_interval=0.02)
    calls: list[float] = []

    def broken() -> None:
        calls.append(clock.now)
        raise RuntimeError(f"secret {MARKER}")

    core.store.sweep = broken   # type: ignore[method-assign]
    deadline = time.monotonic() + TIMEOUT
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) >= 3, "the sweeper stopped after a failure"
    del core.store.sweep   # the real one again
    clock.now += 1
    while core.stats()["last_sweep"] != clock.now and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = stats_of(core, net_pki)
    assert stats["last_sweep"] == clock.now and stats["sweep_failures"] >= 3
    err = capfd.readouterr().err
    assert "retention sweep failed: RuntimeError at " in err and MARKER not in err


def test_a_renamed_chunk_does_not_decrypt(start_core, net_pki: Path) -> None:
    """Every part of a chunk's name is authenticated: its seq (the order
    logpush and readers see) and its record count too."""
    core = start_core()
    assert post(core.port, net_pki, [log_record(i=i) for i in range(3)])[0] == 200
    assert post(core.port, net_pki, [log_record(i=9)])[0] == 200
    day_dir = next((core.config.data_dir / "logs" / "www").iterdir())
    first, second = sorted(day_dir.glob("*.pec"))
    first.rename(first.with_name(re.sub(r"\.3\.pec$", ".2.pec", first.name)))   # the count
    second.rename(second.with_name(f"{0:012d}" + second.name[12:]))             # the order
    assert read_logs(core.port, net_pki, "www", day_dir.name) == (200, [])
    assert stats_of(core, net_pki)["unreadable_chunks"] == 2


def test_directories_are_0700_at_every_level(start_core, net_pki: Path,
                                             tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        key = tmp_path / "k1" / "k2" / "master.key"
        init_master_key(key)
        core = start_core(zones={"www": {"logpush": [
            {"name": "siem", "url": "https://127.0.0.1:9/", "retry_initial": 5}]}})
        assert post(core.port, net_pki, [log_record()])[0] == 200
        assert post(core.port, net_pki, [sample_record()], "sample")[0] == 200
    finally:
        os.umask(old)
    data = core.config.data_dir
    dirs = [data, *(p for p in data.rglob("*") if p.is_dir()), key.parent, key.parent.parent]
    for sub in ("logs/www", "keys/logs/www", "keys/sample", "logpush/www"):
        assert data / sub in dirs, sub
    for d in dirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_connections_over_the_limit_are_closed_and_slow_heads_cut(
        start_core, net_pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # raising=False: the test also runs (and fails) against a server without them
    monkeypatch.setattr(core_server._HTTPServer, "max_connections", 2, raising=False)
    monkeypatch.setattr(core_server._HTTPServer, "head_timeout", 0.5, raising=False)
    core = start_core()
    # Two clients that connect and say nothing hold both connections ...
    t0 = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", core.port)) for _ in range(2)]
    try:
        with pytest.raises(OSError):   # ... so a third is closed at once
            request(core.port, net_pki, "operators/olga", "GET", "/v1/stats")
        # ... until their handshake's deadline, whatever the per-read timeout.
        for s in idle:
            s.settimeout(TIMEOUT)
            assert s.recv(1) == b""
        assert time.monotonic() - t0 < 3
        # Served again once the cut connections' threads have let their slots go.
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                stats = stats_of(core, net_pki)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert stats["connections_refused"] >= 1 and stats["handler_errors"] == 0
    finally:
        for s in idle:
            s.close()
    # A client that trickles its request head is cut at the deadline too.
    ctx = ssl.create_default_context(cafile=net_pki / "ca.crt")
    ctx.load_cert_chain(net_pki / "agents/dus.crt", net_pki / "agents/dus.key")
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", core.port)),
                         server_hostname="127.0.0.1") as s:
        t0 = time.monotonic()
        s.sendall(b"GET /v1/stats HTTP/1.1\r\nHost: core\r\nX-Slow: ")
        closed = False
        while not closed and time.monotonic() - t0 < 5:
            try:
                s.sendall(b"x")
                if select.select([s], [], [], 0.05)[0]:
                    closed = s.recv(100) == b""
            except OSError:
                closed = True
        assert closed and time.monotonic() - t0 < 2


def test_ingests_at_once_are_bounded_and_others_answered_503(start_core,
                                                             net_pki: Path) -> None:
    core = start_core()
    for _ in range(core_server.MAX_INGESTS):
        assert core.ingest_slots.acquire(blocking=False)
    status, answer = post(core.port, net_pki, [log_record()], batch=f"dus:logs:{BOOT}:1")
    assert status == 503 and "retry" in answer["error"]
    for _ in range(core_server.MAX_INGESTS):
        core.ingest_slots.release()
    assert post(core.port, net_pki, [log_record()], batch=f"dus:logs:{BOOT}:1")[1] == {
        "stored": 1, "duplicate": False}
    assert stats_of(core, net_pki)["ingests_busy"] == 1


def test_a_bug_while_serving_is_counted_and_printed_without_its_message(
        start_core, net_pki: Path, capfd, monkeypatch: pytest.MonkeyPatch) -> None:
    core = start_core()

    def broken(*args: object) -> None:
        raise RuntimeError(f"secret {MARKER}")

    monkeypatch.setattr(core.store, "ingest", broken)
    status, answer = post(core.port, net_pki, [log_record()])
    assert status == 500 and MARKER not in answer["error"]
    monkeypatch.setattr(core.store, "read_day", broken)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        read_logs(core.port, net_pki, "www", day_of(time.time()))
    monkeypatch.undo()
    # Content-Length in digits that are not ASCII ones: a 400, not a bug.
    h = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip",
         "X-Privedge-Batch": f"dus:logs:{BOOT}:5", "Content-Length": "\u00b2"}
    status, body = request(core.port, net_pki, "agents/dus", "POST", "/v1/ingest/logs",
                           b"xx", h)
    assert status == 400 and b"Content-Length" in body
    assert stats_of(core, net_pki)["handler_errors"] == 2
    err = capfd.readouterr().err
    assert err.count("failed: RuntimeError at ") == 2, err
    assert MARKER not in err and "secret" not in err
