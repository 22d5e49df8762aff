"""The edge's log path under a known load, for bench/metadata.py.

    python -m bench.logdrive --logs LOGS_YAML paced --rate 5000 --seconds 20
    python -m bench.logdrive --logs LOGS_YAML burst --records 200000

Runs where an agent runs (bench/metadata.py starts it in the lab's dus
namespace, with dus's own logs.yaml), builds the agent's real log path
(agent/logs/service.py LogService: the router, a Shipper per stream to the
core, the 1% sampler and pseudonymizer) and plays the front end: for each
answered request one log record to the zone's shipper and, for a sampled
one, a sample record, exactly what agent/l7/observe.py Observer.finished
hands over past its metrics. The records are realistic log lines (paths,
query strings, addresses, user agents, a status and cache mix).

The log path's CPU is the shipper threads' CPU (their POSIX thread clocks)
plus the CPU spent in the submit calls on this thread (the front end's
event loop pays that); building the record tuples is the front end's and
is not counted.

  paced   records at --rate a second, in 10 ms ticks, for --seconds; then
          waits until every record is acked (the core acks after commit)
  burst   --records as fast as the path takes them: submitted in chunks
          of 1,000 while fewer than max_pending_records - 1,000 are in
          memory (so none is dropped); timed from the first submit to the
          last ack

Baseline, in this process, before and after the run: the least any shipper
must do with the same records, JSON-encode them and gzip them in batches
of batch_records (no checks, no TLS, no threads).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import zlib
from pathlib import Path

from agent.logs.config import load_logs_config
from agent.logs.records import LOG_FIELDS
from agent.logs.service import LogService
from agent.logs.shipper import GZIP_LEVEL

TICK = 0.01                 # paced: submit what is due every 10 ms
CHUNK = 1000                # burst: records per chunk
DRAIN_TIMEOUT = 60.0        # after the last submit, every record acked within this
BASELINE_RECORDS = 20_000
POOL = 8192                 # distinct records, cycled

USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/8.5.0",
    "",
)
WORDS = ("shoes", "red", "jacket", "winter", "sale", "kids", "wool", "size 42", "München",
         "running", "gift card")


def _path(rng: random.Random) -> tuple[str, str]:
    """(path and query, kind) of a shop's traffic."""
    r = rng.random()
    if r < 0.45:
        ext = rng.choice(("css", "js", "woff2", "svg"))
        return f"/static/{rng.choice(('app', 'vendor', 'theme', 'icons'))}." \
               f"{rng.getrandbits(32):08x}.{ext}", "static"
    if r < 0.70:
        return f"/images/products/{rng.randrange(100_000)}/{rng.choice((320, 640, 1280))}" \
               f".webp", "static"
    if r < 0.85:
        return f"/api/v2/cart?session={rng.getrandbits(64):016x}&item={rng.randrange(10**6)}", \
            "api"
    if r < 0.95:
        return f"/en/products/{rng.choice(WORDS).replace(' ', '-')}-{rng.randrange(10**5)}", \
            "page"
    q = "+".join(rng.sample(WORDS, rng.randrange(1, 4))).replace(" ", "%20")
    return f"/search?q={q}&page={rng.randrange(1, 5)}", "api"


def _client(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return f"2a02:{rng.getrandbits(16):x}:{rng.getrandbits(16):x}::{rng.getrandbits(16):x}"
    return f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}." \
           f"{rng.randrange(1, 255)}"


def templates(zone: str, dc: str, host: str, n: int = POOL, seed: int = 23) -> list[tuple]:
    """Log records without their time (LOG_FIELDS[1:]): the front end's tuples."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        path, kind = _path(rng)
        method = "GET" if kind != "api" else rng.choice(("GET", "GET", "POST"))
        if rng.random() < 0.03:
            method = "HEAD"
        r = rng.random()
        status, action, cache = 200, "", "HIT" if kind == "static" else "DYNAMIC"
        if kind == "static" and r < 0.10:
            cache = rng.choice(("MISS", "EXPIRED", "REVALIDATED"))
        if kind == "api" and r < 0.3:
            cache = "BYPASS"
        if 0.90 <= r < 0.94:
            status = 304
        elif 0.94 <= r < 0.97:
            status = 404
        elif 0.97 <= r < 0.985:
            status, action, cache = 403, rng.choice(("waf_block", "fw_block", "bot_block")), ""
        elif 0.985 <= r < 0.99:
            status, action, cache = 429, "rate_limited", ""
        elif 0.99 <= r < 0.995:
            status, action = 502, "origin_error"
        elif r >= 0.995:
            status, action = 200, "waf_scored"
        size = 0 if status in (304, 403, 429) or method == "HEAD" else \
            int(rng.lognormvariate(8.5, 1.5))
        out.append((zone, dc, method, host, path, status, size, cache, action,
                    _client(rng), rng.choice(USER_AGENTS)))
    return out


# ------------------------------------------------------------------------- CPU


class ThreadClocks:
    """The summed CPU clocks of the shippers' threads (alive until stop)."""

    def __init__(self, service: LogService) -> None:
        self.threads = [t for s in service.router.shippers.values()
                        for t in s.threads]  # type: ignore[attr-defined]
        self.clocks = [time.pthread_getcpuclockid(t.ident) for t in self.threads
                       if t.ident is not None]

    def ns(self) -> int:
        return sum(time.clock_gettime_ns(c) for c in self.clocks)


def baseline_ns(pool: list[tuple], batch: int, n: int = BASELINE_RECORDS) -> float:
    """CPU ns per record to JSON-encode and gzip `n` records in batches."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    now = time.time()
    records = [(now, *pool[i % len(pool)]) for i in range(n)]
    t0 = time.thread_time_ns()
    for i in range(0, n, batch):
        lines = [dumps(dict(zip(LOG_FIELDS, r, strict=True))) for r in records[i:i + batch]]
        zlib.compress(("\n".join(lines) + "\n").encode(), GZIP_LEVEL, wbits=31)
    return (time.thread_time_ns() - t0) / n


# ------------------------------------------------------------------------- the run


class Driver:
    """The front end's side of the log path: log_many() is what the event
    loop would do for these answered requests."""

    def __init__(self, logs: Path, zone: str) -> None:
        cfg = load_logs_config(logs)
        self.cfg = cfg
        self.service = LogService(cfg).start()
        submit = self.service.router.submitter(zone)
        if submit is None:
            raise SystemExit(f"{logs}: zone {zone} keeps no logs")
        self.submit = submit
        self.sampling = self.service.sampling()
        self.dc = cfg.dc
        self.clocks = ThreadClocks(self.service)
        self.submit_ns = 0
        self.samples = 0

    def log_many(self, records: list[tuple]) -> None:
        """One log record per request and, for a sampled one, a sample record
        (agent/l7/observe.py), timed on this thread's CPU clock."""
        submit, sampling, dc = self.submit, self.sampling, self.dc
        t0 = time.thread_time_ns()
        if sampling is None:
            for rec in records:
                submit(rec)
        else:
            draw, pseudonym, sample = sampling.draw, sampling.pseudonym, sampling.submit
            for rec in records:
                submit(rec)
                if draw():
                    p, period = pseudonym(rec[10])
                    sample((rec[0], dc, rec[1], rec[3], rec[6], rec[7], rec[8], rec[9], 0.8,
                            "TLSv1.3", p, period))
                    self.samples += 1
        self.submit_ns += time.thread_time_ns() - t0

    def stats(self) -> dict[str, dict]:
        return {f"{stream}/{core}": s for stream, core, s in self.service.router.stats()}

    def pending(self) -> int:
        return sum(int(s["pending_records"]) for s in self.stats().values())

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> float | None:
        """Seconds until nothing is pending (every record acked), or None."""
        t0 = time.monotonic()
        while self.pending():
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(0.01)
        return round(time.monotonic() - t0, 3)


def paced(d: Driver, pool: list[tuple], rate: float, seconds: float) -> dict:
    total = int(rate * seconds)
    cpu0 = d.clocks.ns()
    start = time.monotonic()
    sent = tick = 0
    max_pending = 0
    late = 0.0
    while sent < total:
        due_at = start + tick * TICK
        now = time.monotonic()
        if now < due_at:
            time.sleep(due_at - now)
        else:
            late = max(late, now - due_at)
        due = min(total, round((tick + 1) * TICK * rate))
        stamp = time.time()
        d.log_many([(stamp, *pool[i % len(pool)]) for i in range(sent, due)])
        sent = due
        tick += 1
        if tick % 50 == 0:  # twice a second
            max_pending = max(max_pending, d.pending())
    submit_end = time.monotonic()
    drain = d.drain()
    cpu = d.clocks.ns() - cpu0
    wall = submit_end - start
    return {"records": total, "rate": rate, "wall_s": round(wall, 3),
            "achieved_rate": round(total / wall, 1), "drain_s": drain,
            "max_pending_records": max_pending, "max_tick_late_s": round(late, 4),
            "thread_cpu_s": cpu / 1e9, "submit_cpu_s": d.submit_ns / 1e9,
            "cpu_fraction": (cpu + d.submit_ns) / 1e9 / wall,
            "cpu_us_per_record": (cpu + d.submit_ns) / 1e3 / total}


def burst(d: Driver, pool: list[tuple], records: int) -> dict:
    room = d.cfg.max_pending_records - CHUNK
    cpu0 = d.clocks.ns()
    start = time.monotonic()
    sent = waits = 0
    max_pending = 0
    stamp = time.time()
    while sent < records:
        pending = d.pending()
        max_pending = max(max_pending, pending)
        if pending > room:
            waits += 1
            time.sleep(0.002)
            continue
        n = min(CHUNK, records - sent)
        if sent % 20_000 == 0:
            stamp = time.time()
        d.log_many([(stamp, *pool[i % len(pool)]) for i in range(sent, sent + n)])
        sent += n
    submit_end = time.monotonic()
    drain = d.drain()
    done = time.monotonic()
    cpu = d.clocks.ns() - cpu0
    return {"records": records, "submit_s": round(submit_end - start, 3), "drain_s": drain,
            "wall_s": round(done - start, 3),
            "records_per_s": round(records / (done - start), 1) if drain is not None else None,
            "max_pending_records": max_pending, "backpressure_waits": waits,
            "thread_cpu_s": cpu / 1e9, "submit_cpu_s": d.submit_ns / 1e9,
            "cpu_us_per_record": (cpu + d.submit_ns) / 1e3 / records}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--logs", type=Path, required=True, help="the DC's logs.yaml")
    p.add_argument("--zone", default="shop-eu", help="the zone whose logs are made")
    p.add_argument("--host", default="shop.example.eu")
    sub = p.add_subparsers(dest="mode", required=True)
    sp = sub.add_parser("paced")
    sp.add_argument("--rate", type=float, default=5000.0)
    sp.add_argument("--seconds", type=float, default=20.0)
    sb = sub.add_parser("burst")
    sb.add_argument("--records", type=int, default=200_000)
    a = p.parse_args(argv)
    if a.mode == "paced" and not (0 < a.rate <= 100_000 and 0 < a.seconds <= 600):
        p.error("--rate 1..100000, --seconds up to 600")
    if a.mode == "burst" and not 0 < a.records <= 5_000_000:
        p.error("--records 1..5000000")
    d = Driver(a.logs, a.zone)
    pool = templates(a.zone, d.dc, a.host)
    try:
        base = [baseline_ns(pool, d.cfg.batch_records)]
        out = paced(d, pool, a.rate, a.seconds) if a.mode == "paced" else \
            burst(d, pool, a.records)
        base.append(baseline_ns(pool, d.cfg.batch_records))
    finally:
        d.service.stop(10.0)
    stats = d.stats()
    base_us = statistics.median(base) / 1e3
    out.update({"mode": a.mode, "zone": a.zone, "sample_records": d.samples,
                "baseline_us_per_record": round(base_us, 3),
                "baseline_runs_us": [round(b / 1e3, 3) for b in base],
                "ratio_vs_baseline": round(out["cpu_us_per_record"] / base_us, 2),
                "shipper_threads": len(d.clocks.clocks), "stats": stats,
                "dropped": sum(int(s["dropped"]) for s in stats.values()),
                "rejected": sum(int(s["rejected"]) for s in stats.values()),
                "sent": {k: s["sent"] for k, s in stats.items()}})
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
