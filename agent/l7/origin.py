"""Requests to a zone's origin: pooled HTTP/1.1 connections over TLS (or not).

An `Origin` is one zone's origin server: `https://host:port` with the
certificate verified against the system's trust store (or a CA file of
the zone's) when `verify` is on, the name checked being the origin's host
or `server_name`; or `http://host:port`. Connections are kept for reuse
(at most `pool` idle ones). Each step has its own timeout: connect, the
response head, each read of the body. A request that fails before any
byte of a response arrived is retried once on a fresh connection, but
only for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE), so a POST
is never sent twice. Errors become `OriginError` with the status the
client should get: 502 (refused, reset, bad response, TLS) or 504 (time).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
READ_SIZE = 65536


class OriginError(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class OriginResponse:
    status: int
    headers: tuple[tuple[str, str], ...]   # lower-case names
    body: bytes


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection


class Origin:
    def __init__(self, url: str, verify: bool = True, ca_file: str | None = None,
                 server_name: str | None = None, pool: int = 8, connect_timeout: float = 5,
                 head_timeout: float = 30, read_timeout: float = 30,
                 max_body: int = 64 * 1024 * 1024) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"origin {url!r}: expected http://host[:port] or https://...")
        self.host, self.tls = u.hostname, u.scheme == "https"
        self.port = u.port or (443 if self.tls else 80)
        self.server_name = server_name or self.host
        self.ssl: ssl.SSLContext | None = None
        if self.tls:
            self.ssl = ssl.create_default_context(cafile=ca_file)
            if not verify:  # the zone said so: encrypted, but not authenticated
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
        self.pool_size, self._idle = pool, []
        self.connect_timeout, self.head_timeout = connect_timeout, head_timeout
        self.read_timeout, self.max_body = read_timeout, max_body

    async def request(self, method: str, target: str,
                      headers: Sequence[tuple[str, str]], body: bytes = b"") -> OriginResponse:
        """The whole response, body buffered (bounded by max_body)."""
        stream = await self.open(method, target, headers, body)
        try:
            data = await stream.read(self.max_body)
        finally:
            await stream.aclose()
        return OriginResponse(stream.status, stream.headers, data)

    async def open(self, method: str, target: str,
                   headers: Sequence[tuple[str, str]], body: bytes = b"") -> OriginStream:
        """Send the request and read the response head; the body is read
        as the caller iterates the returned stream (which must be closed)."""
        attempts = 2 if method in IDEMPOTENT else 1
        for attempt in range(attempts):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                return await self._exchange(conn, method, target, headers, body)
            except _BeforeResponse as e:
                self._close(conn)
                # A kept connection the origin closed meanwhile is the usual
                # cause: try a fresh one, if repeating the request is safe.
                if attempt + 1 < attempts:
                    continue
                raise OriginError(502, f"origin {self.host}: {e}") from None
            except BaseException:
                self._close(conn)
                raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for conn in self._idle:
            self._close(conn)
        self._idle.clear()

    # -- internals -----------------------------------------------------------------

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, ssl=self.ssl,
                server_hostname=self.server_name if self.tls else None), self.connect_timeout)
        except TimeoutError:
            raise OriginError(504, f"origin {self.host}: no connection within "
                                   f"{self.connect_timeout}s") from None
        except ssl.SSLError as e:
            raise OriginError(502, f"origin {self.host}: TLS failed ({e.reason or e})") from None
        except OSError as e:
            raise OriginError(502, f"origin {self.host}: cannot connect ({e.strerror})") from None
        return _Conn(reader, writer, h11.Connection(h11.CLIENT))

    async def _exchange(self, conn: _Conn, method: str, target: str,
                        headers: Sequence[tuple[str, str]], body: bytes) -> OriginResponse:
        out = [(n, v) for n, v in headers if n not in ("content-length", "transfer-encoding")]
        if body or method in ("POST", "PUT", "PATCH"):
            out.append(("content-length", str(len(body))))
        try:
            data = conn.h11.send(h11.Request(method=method, target=target, headers=out))
            if body:
                data += conn.h11.send(h11.Data(data=body))
            data += conn.h11.send(h11.EndOfMessage())
            conn.writer.write(data)
            await conn.writer.drain()
            event = await self._next(conn, self.head_timeout, first=True)
        except (OSError, h11.RemoteProtocolError, ssl.SSLError) as e:
            raise _BeforeResponse(str(e) or type(e).__name__) from None
        if not isinstance(event, h11.Response):
            raise OriginError(502, f"origin {self.host}: no response")
        headers_out = tuple((n.decode("latin-1").lower(), v.decode("latin-1"))
                            for n, v in event.headers)
        return OriginStream(self, conn, event.status_code, headers_out)

    def _release(self, conn: _Conn) -> None:
        """A finished exchange: keep the connection for the next one if we can."""
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE and \
                len(self._idle) < self.pool_size:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:
            self._close(conn)

    async def _next(self, conn: _Conn, timeout: float, first: bool = False) -> h11.Event:
        while True:
            try:
                ev = conn.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise OriginError(502, f"origin {self.host}: bad response ({e})") from None
            if ev is not h11.NEED_DATA:
                if isinstance(ev, h11.ConnectionClosed) and first:
                    raise _BeforeResponse("closed before responding")
                return ev
            try:
                data = await asyncio.wait_for(conn.reader.read(READ_SIZE), timeout)
            except TimeoutError:
                raise OriginError(504, f"origin {self.host}: no answer within {timeout}s"
                                  ) from None
            except (OSError, ssl.SSLError) as e:
                if first:
                    raise _BeforeResponse(str(e) or type(e).__name__) from None
                raise OriginError(502, f"origin {self.host}: {e}") from None
            if not data and first and conn.h11.their_state is h11.SEND_RESPONSE:
                raise _BeforeResponse("closed before responding")
            conn.h11.receive_data(data)

    @staticmethod
    def _close(conn: _Conn) -> None:
        conn.writer.close()


class OriginStream:
    """A response whose head has arrived; its body is read on demand.

    Iterating yields the body's chunks as the origin sends them (each read
    within read_timeout); at the end the connection goes back to the pool.
    Closed early, the connection is dropped: it still carries unread body.
    """

    def __init__(self, origin: Origin, conn: _Conn, status: int,
                 headers: tuple[tuple[str, str], ...]) -> None:
        self.origin, self._conn = origin, conn
        self.status, self.headers = status, headers
        self._done = False

    @property
    def length(self) -> int | None:
        """Content-Length, if the origin sent one (else chunked or to close)."""
        value = next((v for n, v in self.headers if n == "content-length"), None)
        return int(value) if value is not None and value.isdigit() else None

    def __aiter__(self) -> OriginStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        origin = self.origin
        try:
            event = await origin._next(self._conn, origin.read_timeout)
        except BaseException:
            await self.aclose()
            raise
        if isinstance(event, h11.Data):
            return bytes(event.data)
        self._done = True
        if isinstance(event, h11.EndOfMessage):
            origin._release(self._conn)
            raise StopAsyncIteration
        origin._close(self._conn)
        raise OriginError(502, f"origin {origin.host}: response cut short")

    async def read(self, limit: int) -> bytes:
        """The rest of the body; OriginError 502 past `limit` bytes."""
        parts, size = [], 0
        async for chunk in self:
            size += len(chunk)
            if size > limit:
                await self.aclose()
                raise OriginError(502, f"origin {self.origin.host}: body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self.origin._close(self._conn)


class _BeforeResponse(Exception):
    """The exchange failed before any byte of a response: safe to retry."""
