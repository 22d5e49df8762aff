"""A batch on the wire: its id (X-Privedge-Batch) and its gzip body.

core/server.py parses the header with BatchId.parse and expands the body
with gunzip(), bounded so that a small body cannot expand into the core's
memory (PROTOCOL.md: 64 MiB expanded by default). core/store.py names the
stored files after the batch id, so a retry lands on the same names.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

_BATCH_RE = re.compile(r"^([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?):(logs|sample):"
                       r"([0-9a-f]{16}):([1-9][0-9]{0,18})$")


class BodyError(ValueError):
    """The body is not what PROTOCOL.md sends; `status` is the answer (400 or 413)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True, order=True)
class BatchId:
    """<dc>:<stream>:<boot>:<seq>: boot is 16 hex digits, seq counts from 1."""

    dc: str
    stream: str
    boot: str
    seq: int

    @classmethod
    def parse(cls, text: str) -> BatchId:
        m = _BATCH_RE.match(text.strip().lower() if text else "")
        if not m:
            raise ValueError(f"X-Privedge-Batch {text!r} is not <dc>:<stream>:<boot>:<seq> "
                             "(stream logs or sample, boot 16 hex digits, seq from 1)")
        return cls(m[1], m[2], m[3], int(m[4]))

    def __str__(self) -> str:
        return f"{self.dc}:{self.stream}:{self.boot}:{self.seq}"


def gunzip(body: bytes, limit: int) -> bytes:
    """Expand a gzip body (several members allowed, as gzip(1) concatenates
    them), at most `limit` bytes; BodyError 413 above it, 400 if not gzip."""
    out: list[bytes] = []
    size = 0
    data = body
    if not data:
        raise BodyError(400, "empty body (expected gzip of NDJSON)")
    while data:
        d = zlib.decompressobj(wbits=31)  # 31: gzip framing only
        try:
            chunk = d.decompress(data, limit - size + 1)
        except zlib.error as e:
            raise BodyError(400, f"body is not gzip ({e})") from None
        size += len(chunk)
        out.append(chunk)
        if size > limit or d.unconsumed_tail:
            raise BodyError(413, f"body expands beyond the core's limit of {limit} bytes")
        if not d.eof:
            raise BodyError(400, "gzip body is truncated")
        data = d.unused_data
    return b"".join(out)
