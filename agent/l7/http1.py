"""HTTP/1.1 on one TLS connection, parsed by h11 (not by hand).

One `Http1Session` per connection reads requests, hands each complete one
(head and body) to the pipeline's handler, and writes the handler's
response, for as many requests as keep-alive allows. It owns the limits
that keep a client from holding the server hostage:

  head      at most `head_bytes` of request line and headers (431), at most
            `headers` header fields (431), complete within `head_timeout`
            of its first byte being awaited (408: a slowloris is closed)
  body      at most `body_bytes` (413), each read within `body_timeout`
            (408); chunked and Content-Length bodies alike (h11 decodes)
  idle      a request must start within `idle_timeout`: the first one gets
            408 after that, a kept-alive connection is closed quietly

Malformed requests get 400. Every response carries X-Request-Id, the id
the pipeline logs and sends on to the origin. Nothing here logs or keeps
any part of a request: the handler gets it, and it is dropped after.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h11

from agent.l7.counters import Counters, RequestError

READ_SIZE = 65536
REQUEST_ID = "X-Request-Id"


@dataclass(frozen=True)
class Limits:
    head_bytes: int = 16 * 1024
    headers: int = 100
    body_bytes: int = 1024 * 1024
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    host: str | None
    headers: tuple[tuple[str, str], ...]   # lower-case names, in order
    body: bytes
    request_id: str
    http_version: str


@dataclass
class Response:
    """What the handler answers. A `stream` (an origin's body, read as it
    arrives) replaces `body`; `length` is its Content-Length when known,
    else the body goes chunked (or to the close, for an HTTP/1.0 client).
    `content_type` None: the headers already carry one (or none is due)."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = "text/plain; charset=utf-8"
    close: bool = False
    stream: AsyncIterator[bytes] | None = None
    length: int | None = None


Handler = Callable[[Request], Awaitable[Response]]


async def _close_stream(stream: AsyncIterator[bytes]) -> None:
    """Let an unfinished body stream release what it holds (its origin connection)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class StreamBroken(Exception):
    """A streamed body failed after its head was sent."""


class _Refuse(Exception):
    """Answer with this status and close (a limit or a malformed request)."""

    def __init__(self, status: int, error: RequestError) -> None:
        super().__init__(status)
        self.status, self.error = status, error


REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
           431: "Request Header Fields Too Large"}


class Http1Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: Limits, counters: Counters, handler: Handler) -> None:
        self.reader, self.writer = reader, writer
        self.limits, self.counters, self.handler = limits, counters, handler
        # h11 refuses a head over this size with 431 on its own.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.head_bytes)

    async def run(self) -> None:
        """Serve requests until the client or a limit ends the connection."""
        first = True
        while True:
            try:
                request = await self._read_request(first)
            except _Refuse as r:
                self.counters.request_error(r.error)
                await self._refuse(r.status)
                return
            if request is None:
                return
            first = False
            response = await self.handler(request)
            try:
                await self._send(response, request)
            except StreamBroken:
                # The head is out and the body cannot be finished: cut the
                # connection so the client sees a truncated response, never
                # a complete-looking short one.
                self.writer.transport.abort()
                return
            if response.close or self.conn.our_state is not h11.DONE or \
                    self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    # -- reading --------------------------------------------------------------------

    async def _fill(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.reader.read(READ_SIZE), timeout)
        self.conn.receive_data(data)  # b"" tells h11 the client closed

    def _next(self) -> h11.Event | type[h11.NEED_DATA]:
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint
            raise _Refuse(431 if status == 431 else 400,
                          RequestError.TOO_LARGE if status == 431 else RequestError.MALFORMED
                          ) from None

    def _started(self) -> bool:
        """Has a request begun (bytes of it received, parsed or buffered)?"""
        return self.conn.their_state is not h11.IDLE or bool(self.conn.trailing_data[0])

    async def _read_request(self, first: bool) -> Request | None:
        """The next complete request, or None when the client is done."""
        lim = self.limits
        loop = asyncio.get_running_loop()
        deadline: float | None = None   # set by the request's first byte
        event = self._next()
        while event is h11.NEED_DATA:
            if deadline is None and self._started():
                deadline = loop.time() + lim.head_timeout
            # Nothing of a request yet: a client may idle this long.
            timeout = (lim.idle_timeout if deadline is None
                       else max(deadline - loop.time(), 0.001))
            try:
                await self._fill(timeout)
            except TimeoutError:
                if deadline is None and not first:
                    return None  # an idle kept-alive connection: close quietly
                raise _Refuse(408, RequestError.TIMEOUT) from None
            event = self._next()
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            raise _Refuse(400, RequestError.MALFORMED)
        # h11 bounds only a head that arrives in pieces; one that came whole
        # is measured here (line, names, values and their separators).
        size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
        if len(event.headers) > lim.headers or size > lim.head_bytes:
            raise _Refuse(431, RequestError.TOO_LARGE)
        body = await self._read_body()
        headers = tuple((n.decode("latin-1").lower(), v.decode("latin-1"))
                        for n, v in event.headers)
        host = next((v for n, v in headers if n == "host"), None)
        return Request(event.method.decode("ascii"), event.target.decode("latin-1"), host,
                       headers, body, uuid.uuid4().hex, event.http_version.decode("ascii"))

    async def _read_body(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            event = self._next()
            if event is h11.NEED_DATA:
                try:
                    await self._fill(self.limits.body_timeout)
                except TimeoutError:
                    raise _Refuse(408, RequestError.TIMEOUT) from None
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.limits.body_bytes:
                    raise _Refuse(413, RequestError.TOO_LARGE)
                parts.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            raise _Refuse(400, RequestError.MALFORMED)  # closed mid-body

    # -- writing --------------------------------------------------------------------

    async def _send(self, r: Response, request: Request) -> None:
        length = r.length if r.stream is not None else len(r.body)
        headers = [(REQUEST_ID, request.request_id), *r.headers]
        if r.content_type is not None:
            headers.insert(0, ("Content-Type", r.content_type))
        if length is not None and r.status not in (204, 304) and r.status >= 200:
            headers.insert(0, ("Content-Length", str(length)))
        if r.close:
            headers.append(("Connection", "close"))
        out = self.conn.send(h11.Response(status_code=r.status, headers=headers))
        head_only = request.method == "HEAD" or r.status in (204, 304)
        if r.stream is not None:
            try:
                if not head_only:
                    await self._stream(r.stream, out)
                    out = b""
                out += self.conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError:  # the origin's body disagreed with its length
                raise StreamBroken("body length") from None
            finally:
                await _close_stream(r.stream)
        else:
            if r.body and not head_only:  # HEAD: the length, not the bytes
                out += self.conn.send(h11.Data(data=r.body))
            out += self.conn.send(h11.EndOfMessage())
        self.writer.write(out)
        await asyncio.wait_for(self.writer.drain(), self.limits.body_timeout)

    async def _stream(self, chunks: AsyncIterator[bytes], head: bytes) -> None:
        """Write the head, then each chunk as it comes; drain paces the
        origin to the client, so a slow client never buffers a whole body."""
        self.writer.write(head)
        while True:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except (OSError, StreamBroken) as e:
                raise StreamBroken(str(e)) from None
            except Exception as e:  # the origin's errors (OriginError): same outcome
                raise StreamBroken(type(e).__name__) from None
            if chunk:
                self.writer.write(self.conn.send(h11.Data(data=chunk)))
                try:
                    await asyncio.wait_for(self.writer.drain(), self.limits.body_timeout)
                except TimeoutError:  # a client that stopped reading
                    raise StreamBroken("client stalled") from None

    async def _refuse(self, status: int) -> None:
        """Answer a refused request, if the protocol still allows an answer."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {REASONS.get(status, '')}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body))), ("Connection", "close")]
        try:
            out = self.conn.send(h11.Response(status_code=status, headers=headers))
            out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        self.writer.write(out)
        with contextlib.suppress(OSError, TimeoutError):  # the client is gone: so are we
            await asyncio.wait_for(self.writer.drain(), self.limits.body_timeout)
