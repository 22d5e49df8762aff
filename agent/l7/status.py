"""Client of the L7 status socket: one JSON command, one JSON line back.

    python -m agent.l7.status SOCKET                      counters and cache stats
    python -m agent.l7.status SOCKET purge ZONE           the whole zone's cache
    python -m agent.l7.status SOCKET purge ZONE --url https://www.example.com/a.css
    python -m agent.l7.status SOCKET purge ZONE --prefix https://www.example.com/static/
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

MAX_STATUS_BYTES = 1 << 20


def read_status(socket_path: str | Path, timeout: float = 5.0) -> dict[str, object]:
    """The front end's counters (and its cache's) as a dict."""
    return command(socket_path, {"cmd": "status"}, timeout)


def purge(socket_path: str | Path, zone: str, url: str | None = None,
          prefix: str | None = None, timeout: float = 5.0) -> int:
    """Purge a zone's cache (one URL, a URL prefix, or all); the objects removed."""
    doc: dict[str, object] = {"cmd": "purge", "zone": zone}
    if url is not None:
        doc["url"] = url
    if prefix is not None:
        doc["prefix"] = prefix
    answer = command(socket_path, doc, timeout)
    if "error" in answer:
        raise ValueError(f"{socket_path}: {answer['error']}")
    return int(answer["purged"])  # type: ignore[call-overload]


def command(socket_path: str | Path, doc: dict[str, object],
            timeout: float = 5.0) -> dict[str, object]:
    """Send one command, return the one JSON object answered.

    Raises OSError if nobody answers and ValueError if the answer is not a
    JSON object; every socket operation is bounded by `timeout`.
    """
    chunks: list[bytes] = []
    size = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(json.dumps(doc).encode() + b"\n")
        while size <= MAX_STATUS_BYTES:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):
                break
    line = b"".join(chunks)
    if size > MAX_STATUS_BYTES:
        raise ValueError(f"{socket_path}: status answer longer than {MAX_STATUS_BYTES} bytes")
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError(f"{socket_path}: status answer is not a JSON object")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.l7.status",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("socket")
    sub = p.add_subparsers(dest="verb")
    pg = sub.add_parser("purge", help="remove a zone's cached objects")
    pg.add_argument("zone")
    which = pg.add_mutually_exclusive_group()
    which.add_argument("--url", help="one URL (every Vary variant of it)")
    which.add_argument("--prefix", help="every URL that starts with this")
    args = p.parse_args(argv)
    try:
        if args.verb == "purge":
            n = purge(args.socket, args.zone, args.url, args.prefix)
            print(f"purged {n} object{'s' if n != 1 else ''} of zone {args.zone}")
        else:
            print(json.dumps(read_status(args.socket), indent=2, sort_keys=True))
    except (OSError, ValueError) as e:
        print(f"privedge-l7-status: {args.socket}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
