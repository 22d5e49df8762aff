"""A small origin for the L7 benches and tests: nginx serving fixed files.

    with Origin() as origin:
        origin.url            # http://127.0.0.1:PORT
        OBJECT_PATH           # /static/1k.css: 1,024 bytes, cacheable for an hour

The object is served with `Cache-Control: public, max-age=3600`, an ETag and
Last-Modified (nginx's own, from the file), so a cache in front keeps it
and can revalidate it. Any other path and method gets a small 200, so a
WAF corpus replayed through a proxy in front of it meets no 404 or 405
that would make the proxy's work differ by request.

nginx in plain HTTP rather than a Python server: an origin miss is rare in
the benches, but when it happens it should cost little CPU, and the CPU it
costs is not counted against the servers measured (their PIDs only).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench.nginx import Nginx, NginxConfig, free_port

OBJECT_PATH = "/static/1k.css"
OBJECT_SIZE = 1024
CACHE_CONTROL = "public, max-age=3600"


def object_body(size: int = OBJECT_SIZE) -> bytes:
    """`size` bytes of plausible CSS, the same on every run."""
    rule = b".c%04d{color:#%06x;margin:0}\n"
    out = b"".join(rule % (i, i * 2654435761 % 0xFFFFFF) for i in range(size // 16 + 1))
    return out[:size - 1] + b"\n"


class Origin:
    """nginx, plain HTTP on 127.0.0.1, with the object in a temp document root."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.root: Path | None = None
        self.nginx: Nginx | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        return self.nginx.pids if self.nginx else []

    def start(self) -> Origin:
        self.root = Path(tempfile.mkdtemp(prefix="pe-origin-"))
        try:
            self.root.chmod(0o755)  # nginx's worker runs as nobody when we are root
            target = self.root / OBJECT_PATH.lstrip("/")
            target.parent.mkdir(parents=True)
            target.parent.chmod(0o755)
            target.write_bytes(object_body())
            target.chmod(0o644)
            self.nginx = Nginx(NginxConfig("static", self.port, root=self.root,
                                           cache_control=CACHE_CONTROL, tls=False)).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
            self.nginx = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
