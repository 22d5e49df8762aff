"""Client of the L7 status socket: one JSON line of counters, then EOF.

    python -m agent.l7.status /run/privedge/el-dus/l7.sock
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

MAX_STATUS_BYTES = 1 << 20


def read_status(socket_path: str | Path, timeout: float = 5.0) -> dict[str, object]:
    """Connect, read the one JSON line the server writes, return it as a dict.

    Raises OSError if nobody answers and ValueError if the answer is not a
    JSON object; every socket operation is bounded by `timeout`.
    """
    chunks: list[bytes] = []
    size = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
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
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m agent.l7.status SOCKET", file=sys.stderr)
        return 2
    try:
        print(json.dumps(read_status(args[0]), indent=2, sort_keys=True))
    except (OSError, ValueError) as e:
        print(f"privedge-l7-status: {args[0]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
