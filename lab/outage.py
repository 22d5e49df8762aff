"""A core outage under steady traffic, and what it cost in log records.

Katerina's namespace sends `rate` requests per second to www through
Düsseldorf (lab/load.py, a user agent of this run's own) for `seconds`;
`start_after` seconds in, the core's log store is stopped for `outage`
seconds, then started again. Meanwhile the edge keeps the records in memory
and retries (agent/logs/shipper.py). After the load ends, the records of
this run stored for zone www are counted (read with the zone's own
certificate) until they stop growing; every answered request should be
there exactly once.

Used by tests/integration/test_core_outage.py (zero lost) and by
bench/metadata.py (records_lost_core_outage).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time

from lab import netns
from lab.cluster import ROOT, Lab
from lab.coreapi import day, scrape, zone_logs

WWW = "www.example.com"
ANYCAST = "198.51.100.10"
SETTLE_SECONDS = 60.0       # after the load: the edge's retries reach the restarted core


def _load_argv(lab: Lab, agent: str, rate: float, seconds: float) -> list[str]:
    return [lab.python, "-m", "lab.load", "--url", f"https://{WWW}/cdn-cgi/trace",
            "--resolve", f"{WWW}:{ANYCAST}", "--cafile", str(lab.state_dir / "pki" / "ca.crt"),
            "--rate", str(rate), "--seconds", str(seconds), "--user-agent", agent]


def stored(lab: Lab, agent: str, days: list[str]) -> int:
    """Records of zone www with this user agent, in the store on these days."""
    n = 0
    for d in days:
        status, records = zone_logs(lab, "www", "zones/www", d)
        if status != 200:
            raise RuntimeError(f"reading www's logs of {d}: HTTP {status}")
        n += sum(1 for r in records if r["user_agent"] == agent)
    return n


def dropped(lab: Lab, dc: str) -> int:
    """What the DC's log shippers counted as dropped (its metrics)."""
    text = scrape(lab, dc)
    return sum(int(float(v)) for v in
               re.findall(r'^privedge_logs_records_dropped_total\{[^}]*\} (\S+)$', text, re.M))


def run(lab: Lab, rate: float = 200.0, seconds: float = 80.0, outage: float = 60.0,
        start_after: float = 5.0, dc: str = "dus") -> dict:
    if start_after + outage >= seconds:
        raise ValueError("the outage must end before the load does")
    agent = f"privedge-outage-{secrets.token_hex(6)}"
    store = lab.logstore_service()
    if store is None:
        raise RuntimeError("this lab has no core log store")
    first_day = day()
    load = subprocess.Popen(netns.nsenter(lab.ns("client"), _load_argv(lab, agent, rate,
                                                                         seconds)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        time.sleep(start_after)
        stopped_at = time.monotonic()
        lab.stop_service(store)
        time.sleep(max(0.0, outage - (time.monotonic() - stopped_at)))
        down_for = time.monotonic() - stopped_at
        lab.start_service(store)
        out, err = load.communicate(timeout=seconds + 60)
    finally:
        if load.poll() is None:
            load.kill()
            load.communicate()
    if load.returncode not in (0, 1):
        raise RuntimeError(f"lab.load failed: {err.strip()}")
    result = json.loads(out)
    answered = result["statuses"].get("200", 0)
    days = sorted({first_day, day()})
    deadline, last, count = time.monotonic() + SETTLE_SECONDS, -1, 0
    while time.monotonic() < deadline:
        count = stored(lab, agent, days)
        if count >= answered or (count == last and count > 0 and
                                 time.monotonic() > deadline - SETTLE_SECONDS / 2):
            break
        last = count
        time.sleep(2)
    return {"rate": rate, "seconds": seconds, "outage_s": round(down_for, 1),
            "requests_sent": result["sent"], "answered": answered, "errors": result["errors"],
            "records_stored": count, "records_lost": answered - count,
            "dropped_reported": dropped(lab, dc)}
