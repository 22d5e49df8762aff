"""The lab's origin server: what a customer runs behind the edge, for tests.

    python -m lab.origin --listen 203.0.113.80 --port 443 --cert o.crt --key o.key
    python -m lab.origin --listen 127.0.0.1 --port 0 --plain     (prints its port)

HTTP/1.1 (h11) over TLS or plain. Its paths exist to exercise the edge:

  /static/<name>.<ext>  a deterministic body (?size=N bytes, default 1024, of
                        ?fill=TEXT repeated, else of a hash of the path),
                        Cache-Control from ?cc= (default "public, max-age=60"),
                        ETag and Last-Modified; If-None-Match → 304
  /echo/...             JSON of what arrived: method, target, headers, body
  /login                POST username/password (form or JSON): 200 for the
                        password "correct horse battery staple", else 401
  /slow?delay=S         answers after S seconds (edge timeouts)
  /drop                 closes the connection without answering (502)
  /big?size=N           N bytes, chunked, in 64 KiB pieces (streaming)
  /__origin/hits        JSON: requests seen per path (tests count origin trips)

Anything else: 200 with a small JSON body and Cache-Control: no-store. The
server keeps nothing but the per-path counts, in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import ssl
import sys
from collections import Counter
from email.utils import formatdate
from urllib.parse import parse_qs, urlsplit

import h11

GOOD_PASSWORD = "correct horse battery staple"
LAST_MODIFIED = formatdate(1_700_000_000, usegmt=True)
CHUNK = 64 * 1024


class OriginServer:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.open: set[asyncio.StreamWriter] = set()   # connections, cut at stop

    async def connection(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        self.open.add(writer)
        try:
            while True:
                request, body = await self._read(conn, reader)
                if request is None:
                    break
                if not await self._answer(conn, writer, request, body):
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError, ssl.SSLError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read(conn: h11.Connection, reader: asyncio.StreamReader
                    ) -> tuple[h11.Request | None, bytes]:
        request, parts = None, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return request, b"".join(parts)
            else:  # closed or paused
                return None, b""

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                      request: h11.Request, body: bytes) -> bool:
        target = request.target.decode("latin-1")
        url = urlsplit(target)
        args = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.hits[url.path] += 1
        headers = {n.decode().lower(): v.decode("latin-1") for n, v in request.headers}
        path = url.path
        if path == "/drop":
            return False
        if path == "/slow":
            await asyncio.sleep(float(args.get("delay", "5")))
        if path.startswith("/static/"):
            size = int(args.get("size", "1024"))
            fill = (args.get("fill", "").encode()
                    or hashlib.sha256(path.encode()).hexdigest().encode())
            content = (fill * (size // len(fill) + 1))[:size]
            etag = '"' + hashlib.sha256(content + target.encode()).hexdigest()[:16] + '"'
            out = [("cache-control", args.get("cc", "public, max-age=60")), ("etag", etag),
                   ("last-modified", LAST_MODIFIED), ("content-type", "text/css")]
            if "vary" in args:
                out.append(("vary", args["vary"]))
            if headers.get("if-none-match") == etag:
                return await self._send(conn, writer, 304, out, b"", request.method)
            return await self._send(conn, writer, 200, out, content, request.method)
        if path.startswith("/echo"):
            doc = {"method": request.method.decode(), "target": target,
                   "headers": [[n.decode().lower(), v.decode("latin-1")]
                               for n, v in request.headers],
                   "body": body.decode("utf-8", "replace")}
            return await self._send(conn, writer, 200, [
                ("content-type", "application/json"), ("cache-control", "no-store")],
                json.dumps(doc).encode(), request.method)
        if path == "/login":
            password = _password(headers.get("content-type", ""), body)
            status = 200 if password == GOOD_PASSWORD else 401
            return await self._send(conn, writer, status, [("cache-control", "no-store")],
                                    b"welcome\n" if status == 200 else b"no\n", request.method)
        if path == "/big":
            return await self._big(conn, writer, int(args.get("size", str(1 << 20))))
        if path == "/__origin/hits":
            return await self._send(conn, writer, 200, [("content-type", "application/json"),
                                                        ("cache-control", "no-store")],
                                    json.dumps(dict(self.hits)).encode(), request.method)
        return await self._send(conn, writer, 200, [("content-type", "application/json"),
                                                    ("cache-control", "no-store")],
                                b'{"origin": "lab"}\n', request.method)

    @staticmethod
    async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                    headers: list[tuple[str, str]], body: bytes, method: bytes) -> bool:
        headers = [*headers, ("date", formatdate(usegmt=True))]
        if status != 304:
            headers.append(("content-length", str(len(body))))
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if body and method != b"HEAD" and status != 304:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        writer.write(data)
        await writer.drain()
        return True

    @staticmethod
    async def _big(conn: h11.Connection, writer: asyncio.StreamWriter, size: int) -> bool:
        writer.write(conn.send(h11.Response(status_code=200, headers=[
            ("content-type", "application/octet-stream"), ("cache-control", "no-store"),
            ("transfer-encoding", "chunked")])))
        sent = 0
        while sent < size:
            n = min(CHUNK, size - sent)
            writer.write(conn.send(h11.Data(data=b"b" * n)))
            await writer.drain()
            sent += n
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True


def _password(content_type: str, body: bytes) -> str | None:
    try:
        if content_type.startswith("application/json"):
            return json.loads(body).get("password")
        return parse_qs(body.decode()).get("password", [None])[-1]
    except (ValueError, AttributeError):
        return None


async def serve(listen: list[str], port: int, tls: ssl.SSLContext | None) -> None:
    origin = OriginServer()
    server = await asyncio.start_server(origin.connection, listen, port, ssl=tls)
    bound = ", ".join(f"[{s.getsockname()[0]}]:{s.getsockname()[1]}" for s in server.sockets)
    print(f"lab-origin: listening on {bound} ({'https' if tls else 'http'})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
        # A kept-alive TLS connection would hold the exit until its peer
        # answered close_notify: cut them (the lab and the tests stop us).
        for writer in list(origin.open):
            writer.transport.abort()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.origin", description=__doc__.split("\n")[0])
    p.add_argument("--listen", action="append", help="address (repeat for more; "
                   "default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert", help="PEM certificate chain (TLS)")
    p.add_argument("--key", help="PEM private key (TLS)")
    p.add_argument("--plain", action="store_true", help="plain HTTP instead of TLS")
    args = p.parse_args(argv)
    tls = None
    if not args.plain:
        if not (args.cert and args.key):
            p.error("TLS needs --cert and --key (or say --plain)")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    asyncio.run(serve(args.listen or ["127.0.0.1"], args.port, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
