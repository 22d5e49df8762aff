"""Steady HTTPS load at a fixed rate, bounded in time and count.

    python -m lab.load --url https://www.example.com/static/a.css \\
        --resolve www.example.com:198.51.100.10 --cafile ca.crt \\
        --rate 200 --seconds 90 [--connections 4]

Runs in a lab host's namespace (through nsenter). Requests go out on
`--connections` keep-alive connections, paced so the total rate stays at
`--rate` per second (a late request is sent at once, not skipped, so the
count is exact). Stops after --seconds or --count requests, whichever comes
first, and prints JSON: requests sent, answered by status, errors, seconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

MAX_SECONDS = 900.0      # no run is longer, whatever it is asked
TIMEOUT = 10.0


class _Connection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, the URL's name as SNI and Host (like curl --resolve)."""

    def __init__(self, name: str, address: str, port: int, ctx: ssl.SSLContext) -> None:
        super().__init__(name, port, timeout=TIMEOUT, context=ctx)
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), TIMEOUT)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def run(url: str, address: str, ctx: ssl.SSLContext, rate: float, seconds: float,
        count: int, connections: int, user_agent: str) -> dict:
    parts = urlsplit(url)
    name, port = parts.hostname or "", parts.port or 443
    target = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
    seconds = min(seconds, MAX_SECONDS)
    total = min(count, int(rate * seconds))
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    start = time.monotonic() + 0.1

    def worker(first: int) -> None:
        conn = _Connection(name, address, port, ctx)
        for i in range(first, total, connections):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                conn.request("GET", target, headers={"User-Agent": user_agent})
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses[response.status] += 1
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors[type(e).__name__] += 1
                conn.close()
                conn = _Connection(name, address, port, ctx)
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True)
               for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 2 * TIMEOUT)
    return {"sent": total, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "errors": dict(errors), "seconds": round(time.monotonic() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--resolve", required=True, help="NAME:ADDRESS the URL's name goes to")
    p.add_argument("--cafile", required=True, help="the CA the zone's certificate is from")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second")
    p.add_argument("--seconds", type=float, default=10.0, help=f"at most {MAX_SECONDS:g}")
    p.add_argument("--count", type=int, default=1_000_000, help="at most this many requests")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--user-agent", default="privedge-lab-load/1")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.connections < 1:
        p.error("--rate and --seconds must be positive, --connections at least 1")
    _name, sep, address = args.resolve.partition(":")   # an IPv6 address keeps its colons
    if not sep:
        p.error(f"--resolve {args.resolve!r}: expected NAME:ADDRESS")
    ctx = ssl.create_default_context(cafile=args.cafile)
    result = run(args.url, address, ctx, args.rate, args.seconds, args.count, args.connections,
                 args.user_agent)
    print(json.dumps(result), flush=True)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
