"""`make bench-metadata`: the cost of an edge's metadata (issue 5 §8), in one run.

  1 scrape     the agent's /metrics as a DC serves it (bench/metricsrig.py:
               two real XDP nodes, a front end's counters of 10 zones, RTT
               to 2 peers, the log shippers' counts) over mTLS, scraped by a
               client with Prometheus's certificate and request headers, a new
               TLS connection per scrape; wall time and the server's CPU
               (/proc/<pid>/stat) per scrape, beside the same server with an
               empty registry (TLS and HTTP alone), in interleaved rounds
  2 log path   in the lab (lab/cluster.py, a prefix of this run's own): a
               driver in dus's namespace (bench/logdrive.py) runs the agent's
               log path with dus's logs.yaml to the core's log store:
               5,000 records/s for 20 s (the CPU fraction of one core, every
               record acked), then 200,000 records as fast as they are taken
               (records/s to all acked: the core acks after its commit); the
               core's /v1/stats must show every record stored. Baseline: the
               same records JSON-encoded and gzipped in the driver, nothing else
  3 outage     lab/outage.py on the same lab: 200 requests/s through dus for
               80 s, the core's log store stopped for 60 s of it; the records
               lost

    python -m bench.metadata [--quick] [--skip-lab]

Prints a table, writes bench/results/metadata.json, and prints its summary
JSON last. --quick: fewer scrapes, 5 s paced and 30,000 burst records, and
a 10 s outage at 50 requests/s (marked quick: not the bar's outage).
"""

from __future__ import annotations

import argparse
import gzip
import ipaddress
import json
import os
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "metadata.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Two cores: the metrics server on one, the scraping client on the other.
SERVER_CPU, CLIENT_CPU = ({1}, {0}) if (os.cpu_count() or 1) >= 2 else (None, None)
OPENSSL_CONF = ROOT / "agent" / "l7" / "openssl.cnf"   # what agent/__init__.py sets
SERVER_NAME = "dus.dc.privedge.internal"
# What Prometheus 2.42 (Debian 12's, the lab's) sends with every scrape.
PROMETHEUS_HEADERS = (
    "User-Agent: Prometheus/2.42.0\r\n"
    "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n"
    "Accept-Encoding: gzip\r\n"
    "X-Prometheus-Scrape-Timeout-Seconds: 10\r\n")
BARS = {"scrape_ms": 50.0, "log_records_per_s": 5000.0, "edge_log_cpu_fraction": 0.10,
        "records_lost_core_outage": 0}
DRIVER_TIMEOUT = 300        # seconds: one bench.logdrive run
RIG_TIMEOUT = 120.0         # seconds: bench.metricsrig to ready


def log(msg: str) -> None:
    print(f"bench-metadata: {msg}", file=sys.stderr, flush=True)


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OPENSSL_CONF": str(OPENSSL_CONF)}


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads, ended ones included), in ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_ns(pid: int) -> int:
    """The same from the process's CPU clock (clock_getcpuclockid), to the ns."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, SCHED)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


# ------------------------------------------------------------------------- 1 scrape


def make_pki(directory: Path) -> Path:
    """control/pki.py's certificates for DCs dus, fra, iad on loopback addresses."""
    from control import pki

    ip = ipaddress.ip_address
    pki.run(directory, pki.plan({"dus": [ip("127.0.0.1")], "fra": [ip("127.0.0.2")],
                                 "iad": [ip("127.0.0.3")]}, [ip("127.0.0.10")], {}))
    return directory


def client_context(pki: Path) -> ssl.SSLContext:
    """Prometheus's client certificate; the agent verified against the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.load_cert_chain(pki / "prometheus.crt", pki / "prometheus.key")
    return ctx


def scrape(port: int, ctx: ssl.SSLContext) -> tuple[float, bytes]:
    """One scrape on a new connection: (seconds to the last byte, the response)."""
    request = (f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{PROMETHEUS_HEADERS}"
               "\r\n").encode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
        tls.sendall(request)
        chunks = []
        while data := tls.recv(65536):  # HTTP/1.0: the server closes after the answer
            chunks.append(data)
    return time.perf_counter() - t0, b"".join(chunks)


def exposition(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    text = gzip.decompress(body) if b"content-encoding: gzip" in lower else body
    ctype = next((line.split(b":", 1)[1].strip().decode() for line in lower.split(b"\r\n")
                  if line.startswith(b"content-type:")), "")
    return {"status": status, "content_type": ctype, "wire_bytes": len(body),
            "bytes": len(text),
            "series": sum(1 for line in text.decode().splitlines()
                          if line and not line.startswith("#"))}


def scrape_round(pid: int, port: int, ctx: ssl.SSLContext, n: int) -> dict:
    t0, c0 = cpu_ticks(pid), cpu_ns(pid)
    walls = [scrape(port, ctx)[0] for _ in range(n)]
    t1, c1 = cpu_ticks(pid), cpu_ns(pid)
    return {"walls_ms": [w * 1e3 for w in walls], "cpu_ms_stat": (t1 - t0) / CLK_TCK * 1e3 / n,
            "cpu_ms_clock": (c1 - c0) / 1e6 / n}


def scrape_bench(work: Path, rounds: int, per_round: int) -> dict:
    pki = make_pki(work / "pki")
    ctx = client_context(pki)
    err = work / "metricsrig.log"
    with open(err, "w") as stderr:
        rig = subprocess.Popen([sys.executable, "-m", "bench.metricsrig", "--pki", str(pki)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                               cwd=ROOT, env=_env(), text=True, preexec_fn=_pin(SERVER_CPU))
    try:
        assert rig.stdout is not None
        ready, _, _ = select.select([rig.stdout], [], [], RIG_TIMEOUT)
        line = rig.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"bench.metricsrig did not start in {RIG_TIMEOUT:g} s:\n"
                               + err.read_text()[-3000:])
        info = json.loads(line)
        pid, ports = info["pid"], {"full": info["full"], "empty": info["empty"]}
        shapes = {name: exposition(scrape(port, ctx)[1]) for name, port in ports.items()}
        for name, s in shapes.items():
            if s["status"] != 200:
                raise RuntimeError(f"/metrics of the {name} server answered {s['status']}")
        for _ in range(10):  # warm-up, not measured
            for port in ports.values():
                scrape(port, ctx)
        samples: dict[str, list[dict]] = {"full": [], "empty": []}
        for r in range(rounds):
            order = ("full", "empty") if r % 2 == 0 else ("empty", "full")
            for name in order:
                samples[name].append(scrape_round(pid, ports[name], ctx, per_round))
            f, e = samples["full"][-1], samples["empty"][-1]
            log(f"scrape round {r + 1}/{rounds}: full {statistics.median(f['walls_ms']):.2f} "
                f"ms ({f['cpu_ms_clock']:.2f} ms CPU), empty "
                f"{statistics.median(e['walls_ms']):.2f} ms ({e['cpu_ms_clock']:.2f} ms CPU)")
    finally:
        if rig.stdin:
            rig.stdin.close()
        try:
            rig.wait(30)
        except subprocess.TimeoutExpired:
            rig.kill()
            rig.wait(10)
    if rig.returncode:
        log(f"bench.metricsrig exited {rig.returncode}: {err.read_text()[-1000:]}")

    def walls(name: str) -> list[float]:
        return [w for s in samples[name] for w in s["walls_ms"]]

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name])

    pairs = list(zip(samples["full"], samples["empty"], strict=True))
    return {
        "scrape_ms": round(statistics.median(walls("full")), 2),
        "scrape_p99_ms": round(_pct(walls("full"), 0.99), 2),
        "tls_only_ms": round(statistics.median(walls("empty")), 2),
        "tls_only_p99_ms": round(_pct(walls("empty"), 0.99), 2),
        "ratio_vs_tls_only": round(statistics.median(
            statistics.median(f["walls_ms"]) / statistics.median(e["walls_ms"])
            for f, e in pairs), 2),
        "server_cpu_ms": round(med("full", "cpu_ms_stat"), 2),
        "server_cpu_ms_tls_only": round(med("empty", "cpu_ms_stat"), 2),
        "server_cpu_ms_clock": round(med("full", "cpu_ms_clock"), 3),
        "server_cpu_ms_clock_tls_only": round(med("empty", "cpu_ms_clock"), 3),
        "cpu_ratio_vs_tls_only": round(statistics.median(
            f["cpu_ms_clock"] / e["cpu_ms_clock"] for f, e in pairs), 2),
        "exposition": shapes["full"], "exposition_tls_only": shapes["empty"],
        "rig": {k: v for k, v in info.items() if k not in ("pid", "full", "empty")},
        "rounds": rounds, "scrapes_per_round": per_round,
        "rounds_ms": [{"full": round(statistics.median(f["walls_ms"]), 3),
                       "empty": round(statistics.median(e["walls_ms"]), 3),
                       "full_cpu": round(f["cpu_ms_clock"], 3),
                       "empty_cpu": round(e["cpu_ms_clock"], 3)} for f, e in pairs],
    }


# ------------------------------------------------------------------------- 2 log path


def core_stats(lab) -> dict:
    from lab.coreapi import core_get

    status, body = core_get(lab, "/v1/stats", "operators/lab-admin")
    if status != 200:
        raise RuntimeError(f"GET /v1/stats as operators/lab-admin: HTTP {status}: {body[:300]}")
    return json.loads(body)


def _zone_counts(stats: dict, zone: str) -> tuple[int, int]:
    """(records received since the core started, records on disk) of a zone's logs."""
    received = stats["received"]["logs"].get(zone, {}).get("records", 0)
    on_disk = sum(d["records"] for d in stats["stored"]["logs"].get(zone, {}).values())
    return received, on_disk


def drive(lab, mode: list[str], zone: str) -> dict:
    """bench.logdrive in dus's namespace with dus's logs.yaml; the core's view beside it."""
    from lab import netns

    logs_yaml = lab.dc_dir("dus") / "logs.yaml"
    core_pid = lab.service_pid(lab.logstore_service())
    before = core_stats(lab)
    c0 = cpu_ns(core_pid) if core_pid else 0
    argv = [lab.python, "-m", "bench.logdrive", "--logs", str(logs_yaml), "--zone", zone, *mode]
    r = subprocess.run(netns.nsenter(lab.ns("dus"), argv), capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=DRIVER_TIMEOUT)
    c1 = cpu_ns(core_pid) if core_pid else 0
    if r.returncode != 0:
        raise RuntimeError(f"bench.logdrive {' '.join(mode)} failed ({r.returncode}):\n"
                           + (r.stderr or r.stdout)[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    after = core_stats(lab)
    (rec0, disk0), (rec1, disk1) = _zone_counts(before, zone), _zone_counts(after, zone)
    out["core"] = {"received": rec1 - rec0, "on_disk": disk1 - disk0,
                   "cpu_s": round((c1 - c0) / 1e9, 3),
                   "cpu_us_per_record": round((c1 - c0) / 1e3 / max(out["records"], 1), 2)}
    sent = out["sent"].get("logs/core", 0)
    out["all_stored"] = (sent == out["records"] and out["dropped"] == 0
                         and out["core"]["received"] == sent and out["core"]["on_disk"] == sent)
    return out


def log_path(lab, paced_s: float, burst_n: int, zone: str) -> dict:
    log(f"log path: 5,000 records/s for {paced_s:g} s from dus's namespace")
    paced = drive(lab, ["paced", "--rate", "5000", "--seconds", str(paced_s)], zone)
    log(f"  {paced['cpu_fraction'] * 100:.2f}% of a core ({paced['cpu_us_per_record']:.2f} "
        f"µs a record, {paced['ratio_vs_baseline']}x encode+gzip's "
        f"{paced['baseline_us_per_record']:.2f} µs); acked {paced['drain_s']} s after the "
        f"last; core stored {paced['core']['on_disk']:,} of {paced['records']:,}")
    log(f"log path: {burst_n:,} records as fast as they are taken")
    burst = drive(lab, ["burst", "--records", str(burst_n)], zone)
    log(f"  {burst['records_per_s']:,} records/s to all acked ({burst['cpu_us_per_record']:.2f} "
        f"µs a record on the edge, {burst['core']['cpu_us_per_record']:.2f} µs in the core); "
        f"core stored {burst['core']['on_disk']:,} of {burst['records']:,}")
    return {"paced": paced, "burst": burst}


# ------------------------------------------------------------------------- 3 outage


def core_outage(lab, rate: float, seconds: float, outage_s: float) -> dict:
    from lab import outage

    log(f"core outage: {rate:g} requests/s for {seconds:g} s, the core stopped for "
        f"{outage_s:g} s of it")
    r = outage.run(lab, rate=rate, seconds=seconds, outage=outage_s)
    log(f"  answered {r['answered']:,}, stored {r['records_stored']:,}, lost "
        f"{r['records_lost']}, dropped reported {r['dropped_reported']}")
    return r


def lab_parts(paced_s: float, burst_n: int, outage_args: tuple[float, float, float]) -> dict:
    from lab.cluster import Lab
    from lab.topology import load_topology

    lab = Lab(load_topology(), prefix=f"bm{os.getpid() % 100000}-")
    t0 = time.monotonic()
    try:
        log(f"lab up (prefix {lab.prefix})")
        lab.up(agents=True)
        up_s = time.monotonic() - t0
        lp = log_path(lab, paced_s, burst_n, "shop-eu")
        oo = core_outage(lab, *outage_args)
    finally:
        log("lab down")
        lab.down()
    return {"log_path": lp, "outage": oo, "lab_up_s": round(up_s, 1)}


# ------------------------------------------------------------------------- report


def summarise(sc: dict | None, lb: dict | None, quick: bool) -> dict:
    s: dict = {}
    if sc:
        s.update({"scrape_ms": sc["scrape_ms"], "scrape_p99_ms": sc["scrape_p99_ms"],
                  "scrape_ratio_vs_tls_only": sc["ratio_vs_tls_only"],
                  "scrape_server_cpu_ms": sc["server_cpu_ms_clock"],
                  "scrape_cpu_ratio_vs_tls_only": sc["cpu_ratio_vs_tls_only"],
                  "scrape_series": sc["exposition"]["series"],
                  "scrape_bytes": sc["exposition"]["bytes"]})
    if lb:
        paced, burst = lb["log_path"]["paced"], lb["log_path"]["burst"]
        o = lb["outage"]
        s.update({
            "log_records_per_s": burst["records_per_s"],
            "edge_log_cpu_fraction": round(paced["cpu_fraction"], 4),
            "edge_log_cpu_us_per_record": round(paced["cpu_us_per_record"], 2),
            "log_cpu_ratio_vs_encode_gzip": paced["ratio_vs_baseline"],
            "log_kept_up": bool(paced["all_stored"] and paced["drain_s"] is not None
                                and burst["all_stored"]),
            "records_lost_core_outage": o["records_lost"],
            "outage": {k: o[k] for k in ("rate", "outage_s", "answered", "records_stored",
                                         "dropped_reported")},
        })
    met = {}
    if "scrape_ms" in s:
        met["scrape_ms"] = s["scrape_ms"] < BARS["scrape_ms"]
    if "log_records_per_s" in s:
        met["log_records_per_s"] = (s["log_records_per_s"] or 0) >= BARS["log_records_per_s"]
        met["edge_log_cpu_fraction"] = s["edge_log_cpu_fraction"] < BARS["edge_log_cpu_fraction"] \
            and s["log_kept_up"]
        met["records_lost_core_outage"] = s["records_lost_core_outage"] == 0
    s["bars_met"] = met
    s["quick"] = quick
    return s


def print_table(sc: dict | None, lb: dict | None) -> None:
    if sc:
        e = sc["exposition"]
        print(f"  scrape (10 zones, {e['series']} series, {e['bytes']:,} bytes, "
              f"{e['wire_bytes']:,} gzipped): median {sc['scrape_ms']} ms, p99 "
              f"{sc['scrape_p99_ms']} ms; TLS + HTTP alone {sc['tls_only_ms']} ms "
              f"(ratio {sc['ratio_vs_tls_only']})")
        print(f"  scrape server CPU: {sc['server_cpu_ms_clock']} ms, alone "
              f"{sc['server_cpu_ms_clock_tls_only']} ms (ratio {sc['cpu_ratio_vs_tls_only']}); "
              f"from /proc/<pid>/stat {sc['server_cpu_ms']} / {sc['server_cpu_ms_tls_only']} ms")
    if lb:
        p, b, o = lb["log_path"]["paced"], lb["log_path"]["burst"], lb["outage"]
        print(f"  log path at 5,000/s: {p['cpu_fraction'] * 100:.2f}% of a core, "
              f"{p['cpu_us_per_record']:.2f} µs a record (threads {p['thread_cpu_s']:.3f} s, "
              f"submit {p['submit_cpu_s']:.3f} s over {p['wall_s']} s), "
              f"{p['ratio_vs_baseline']}x encode+gzip ({p['baseline_us_per_record']} µs); "
              f"max pending {p['max_pending_records']:,}, all acked {p['drain_s']} s after "
              f"the last; all stored {p['all_stored']}")
        print(f"  log path flat out: {b['records_per_s']:,} records/s ({b['records']:,} in "
              f"{b['wall_s']} s), edge {b['cpu_us_per_record']:.2f} µs a record, core "
              f"{b['core']['cpu_us_per_record']} µs; all stored {b['all_stored']}")
        print(f"  core outage {o['outage_s']} s at {o['rate']:g}/s: answered {o['answered']:,}, "
              f"stored {o['records_stored']:,}, lost {o['records_lost']}, dropped reported "
              f"{o['dropped_reported']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: shorter everything")
    p.add_argument("--skip-lab", action="store_true", help="the scrape only (no lab)")
    a = p.parse_args(argv)
    from agent.preflight import missing

    problems = missing()
    if problems:
        print("bench-metadata: " + "; ".join(problems), file=sys.stderr)
        return 1
    rounds, per_round = (3, 20) if a.quick else (9, 50)
    paced_s, burst_n = (5.0, 30_000) if a.quick else (20.0, 200_000)
    outage_args = (50.0, 20.0, 10.0) if a.quick else (200.0, 80.0, 60.0)
    if CLIENT_CPU:
        os.sched_setaffinity(0, CLIENT_CPU)
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pe-bench-md-"))
    try:
        log(f"scrape: {rounds} rounds of {per_round} scrapes of each server")
        sc = scrape_bench(work, rounds, per_round)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if CLIENT_CPU:
        os.sched_setaffinity(0, CLIENT_CPU | SERVER_CPU)  # the lab's processes inherit it
    lb = None if a.skip_lab else lab_parts(paced_s, burst_n, outage_args)
    summary = summarise(sc, lb, a.quick)
    result = {**summary, "scrape": sc, **(lb or {}),
              "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
              "command": "sudo make bench-metadata" + (" (--quick)" if a.quick else ""),
              "runtime_s": round(time.monotonic() - t_start, 1)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(RESULTS)
    print_table(sc, lb)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
