"""HTTP/1.1 on one connection, parsed by httptools (llhttp, not by hand).

One `Http1Protocol` per connection (TLS or plain) turns bytes into complete
requests (head and body), hands each to the handler, and writes its
response, for as many requests as keep-alive allows, in order (pipelined
requests wait their turn; reading pauses while two are queued). A handler
answers at once with a Response (a cache hit, a refusal: no task, no
await) or with an awaitable of one (an origin fetch). The limits that keep
a client from holding the server hostage:

  head      at most `head_bytes` of request line and headers (431), at most
            `headers` header fields (431), complete within `head_timeout`
            of its first byte (408: a slowloris is closed)
  body      at most `body_bytes` (413, before any body byte when the
            declared length is over), each read within `body_timeout` (408);
            chunked and Content-Length bodies alike (llhttp decodes);
            "Expect: 100-continue" gets its 100 at once
  idle      a request must start within `idle_timeout`: the first one gets
            408 after that, a kept-alive connection is closed quietly

Malformed requests get 400 (and so do upgrades and CONNECT: this edge
proxies plain HTTP requests only). Every response carries X-Request-Id,
the id sent on to the origin. A response's body is bytes, or a stream
(an origin's body as it arrives) written with the transport's flow
control, so a slow client never makes the edge buffer a whole body.
Nothing here logs or keeps any part of a request after it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

from agent.l7.counters import Counters, RequestError

REQUEST_ID = "X-Request-Id"
QUEUE_PAUSE = 2          # requests parsed ahead of the one answered: stop reading
log = logging.getLogger("privedge.l7")


@dataclass(frozen=True)
class Limits:
    head_bytes: int = 16 * 1024
    headers: int = 100
    body_bytes: int = 1024 * 1024
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0

    @property
    def shortest(self) -> float:
        return min(self.head_timeout, self.body_timeout, self.idle_timeout)


@dataclass(slots=True)  # not frozen: one per request, and frozen ones cost more to build
class Request:
    method: str
    target: str
    host: str | None
    headers: tuple[tuple[str, str], ...]   # lower-case names, in order
    body: bytes
    request_id: str
    http_version: str
    keep_alive: bool = True                # the client allows another request after
    received: float = 0.0                  # loop time its last byte was read


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
    header_block: bytes = b""      # more header lines, encoded already (a cache entry's)
    # What the observer (agent/l7/observe.py) reports; set where it is known.
    cache: str = ""                # the cache's status (agent/l7/cache Status) or none
    action: str = ""               # the RuleAction that decided the request, if one did


# Told of each answered request: (request, response, body bytes sent,
# seconds from the request's last byte in to the response's last byte out).
Observe = Callable[["Request", Response, int, float], None]


Handler = Callable[[Request], "Response | Awaitable[Response]"]


class StreamBroken(Exception):
    """A streamed body failed after its head was sent."""


class _Refuse(Exception):
    """Answer with this status and close (a limit or a malformed request)."""

    def __init__(self, status: int, error: RequestError) -> None:
        super().__init__(status)
        self.status, self.error = status, error


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "")


def _no_body(status: int) -> bool:
    return status < 200 or status in (204, 304)


class _RequestIds:
    """Random 128-bit ids, hex; the kernel's randomness fetched 256 ids at a
    time (one getrandom call per request was a tenth of a request's CPU)."""

    BATCH = 16 * 256

    def __init__(self) -> None:
        self._pool, self._at = b"", self.BATCH

    def next(self) -> str:
        if self._at >= self.BATCH:
            self._pool, self._at = os.urandom(self.BATCH), 0
        at = self._at
        self._at = at + 16
        return self._pool[at:at + 16].hex()


_per_thread = threading.local()  # each front end's event loop thread has its own


def _request_id() -> str:
    ids = getattr(_per_thread, "ids", None)
    if ids is None:
        ids = _per_thread.ids = _RequestIds()
    return ids.next()


def _handler_failed(e: Exception) -> Response:
    """A bug answered with 500. Logged by type and code location only: an
    exception's message may quote the request, and nothing of it is logged."""
    where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    log.error("request handler failed: %s at %s", type(e).__name__,
              ", ".join(f"{f.filename}:{f.lineno}" for f in where) or "?")
    return Response(500, b"500 Internal Server Error\n", close=True)


async def _close_stream(stream: AsyncIterator[bytes]) -> None:
    """Let an unfinished body stream release what it holds (its origin connection)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class Http1Protocol(asyncio.Protocol):
    """HTTP/1.x server side of one connection; `start(handler)` begins it.

    Bytes that arrive before start() (the TLS handshake hands the connection
    over a moment before the server knows the zone) wait in a buffer.
    `done` resolves when the connection is gone.
    """

    # No instance dict: every attribute read and write of a request is cheaper.
    __slots__ = (
        "_body",
        "_body_size",
        "_broken",
        "_busy",
        "_closed",
        "_deadline",
        "_drained",
        "_early",
        "_eof",
        "_expire",
        "_first",
        "_head_armed",
        "_head_size",
        "_headers",
        "_host",
        "_in_head",
        "_in_message",
        "_parser",
        "_queue",
        "_reading_paused",
        "_streamed",
        "_task",
        "_timer",
        "_tls",
        "_url",
        "_write_paused",
        "counters",
        "done",
        "handler",
        "limits",
        "loop",
        "observe",
        "registry",
        "transport",
    )

    def __init__(self, limits: Limits, counters: Counters,
                 handler: Handler | None = None,
                 registry: set[Http1Protocol] | None = None,
                 observe: Observe | None = None) -> None:
        self.limits, self.counters = limits, counters
        self.observe = observe
        self.registry = registry              # holds the protocol while connected
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.handler: Handler | None = handler
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._early: list[bytes] = []
        self._queue: deque[Request | _Refuse] = deque()
        self._busy = False                   # a response is being produced or written
        self._task: asyncio.Task[None] | None = None
        self._first = True                   # no request answered yet
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._expire: Callable[[], None] | None = None
        self._reading_paused = False
        self._streamed = 0                   # body bytes of the response being streamed
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._closed = False
        self._tls = False
        self._broken = False                 # a refusal is queued: parse no more
        self._eof = False                    # the client has sent all it will
        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._host: str | None = None        # the one Host header (on_headers_complete)
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_head = False
        self._head_armed = False             # the head's timer runs (set once per head)
        self._in_message = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.registry is not None:
            self.registry.add(self)
        self._tls = transport.get_extra_info("ssl_object") is not None
        self._arm(self.limits.idle_timeout, self._idle_expired)

    def start(self, handler: Handler) -> None:
        self.handler = handler
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            self._early.append(data)
            return
        if self._closed or self._broken:
            return
        try:
            self._parser.feed_data(data)  # type: ignore[union-attr]  # None once closed
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._refused(cause if isinstance(cause, _Refuse)
                          else _Refuse(400, RequestError.MALFORMED))
        except httptools.HttpParserUpgrade:
            # Upgrades (websockets) and CONNECT are not proxied: a request
            # completed before it is answered, then the connection ends.
            last = self._queue[-1] if self._queue else None
            if isinstance(last, Request) and last.method != "CONNECT":
                self._refused(_Refuse(0, RequestError.MALFORMED))  # 0: close quietly
            else:
                if isinstance(last, Request):
                    self._queue.pop()
                self._refused(_Refuse(400, RequestError.MALFORMED))
        except httptools.HttpParserError:
            self._refused(_Refuse(400, RequestError.MALFORMED))
        # A head cut across reads has head_timeout from its first byte. Armed
        # here, not at its first byte: most heads arrive whole in one read.
        if self._in_head and not self._head_armed and not self._busy and not self._broken:
            self._head_armed = True
            self._arm(self.limits.head_timeout, self._head_expired)
        self._next()

    def _refused(self, refusal: _Refuse) -> None:
        """Queue a refusal after what is already queued; read and parse no more."""
        self._broken = True
        self._queue.append(refusal)
        self._pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._in_message:
            self.counters.request_error(RequestError.CLOSED)
        if not self._busy and not self._queue:
            self._close()
        # Plain TCP: stay half-open to send the answers still due, then close.
        # TLS closes on its own (a TLS transport cannot stay half-open).
        return None if self._tls else True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        # The parser holds this protocol's callbacks: a reference cycle. Cut,
        # the connection's objects go when their last reference does, not at
        # the collector's next pass (nothing parses after this: _closed).
        self._parser = None
        if self.registry is not None:
            self.registry.discard(self)
        self._drop_timer()  # a connection gone holds no handle in the loop
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("connection lost"))
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        """Drop the connection at once (the server is stopping)."""
        if self.transport is not None:
            self.transport.abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- httptools callbacks (raise _Refuse to stop parsing) -------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._head_size = b"", [], 0
        self._body, self._body_size = [], 0
        self._in_head = self._in_message = True
        self._head_armed = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.limits.head_bytes:
            raise _Refuse(431, RequestError.TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.limits.head_bytes or \
                len(self._headers) >= self.limits.headers:
            raise _Refuse(431, RequestError.TOO_LARGE)
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        # RFC 9112 3.2: an HTTP/1.1 request has exactly one Host; a server
        # must refuse one with none or several (they would split the zone check).
        # A declared length over the limit is refused before any body byte
        # is read; a client that waits for "100 Continue" is told to go on
        # (curl waits a second for it before sending a body over 1 KB).
        host: str | None = None
        hosts = 0
        expect = body = too_large = False
        for name, value in self._headers:  # one pass: this runs for every request
            if name == "host":
                host = value
                hosts += 1
            elif name == "content-length":
                too_large = too_large or (value.isdigit() and int(value) > self.limits.body_bytes)
                body = True
            elif name == "transfer-encoding":
                body = True
            elif name == "expect" and value.lower() == "100-continue":
                expect = True
        p = self._parser
        assert p is not None  # parser callbacks run inside feed_data, before any close
        if hosts > 1 or (not hosts and p.get_http_version() == "1.1"):
            raise _Refuse(400, RequestError.MALFORMED)
        if too_large:
            raise _Refuse(413, RequestError.TOO_LARGE)
        self._host = host
        if expect and not self._busy and not self._queue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._in_head = False
        if body and not self._busy:  # no body due: the message completes at once
            self._arm(self.limits.body_timeout, self._body_expired)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.body_bytes:
            raise _Refuse(413, RequestError.TOO_LARGE)
        self._body.append(body)
        if not self._busy:
            self._arm(self.limits.body_timeout, self._body_expired)

    def on_message_complete(self) -> None:
        p = self._parser
        assert p is not None
        self._queue.append(Request(
            p.get_method().decode("ascii"), self._url.decode("latin-1"), self._host,
            tuple(self._headers),
            b"".join(self._body), _request_id(), p.get_http_version(),
            p.should_keep_alive(), self.loop.time()))
        self._body, self._body_size = [], 0
        self._in_message = False
        if len(self._queue) >= QUEUE_PAUSE:
            self._pause_reading()

    # -- answering -------------------------------------------------------------------

    def _next(self) -> None:
        """Answer the next queued request, if none is being answered."""
        while not self._busy and self._queue and not self._closed:
            item = self._queue.popleft()
            if isinstance(item, _Refuse):
                self._refuse(item)
                return
            self._busy = True
            self._expire = None      # no timeout while answering (the handle may still fire)
            try:
                answer = self.handler(item)  # type: ignore[misc]
            except Exception as e:
                answer = _handler_failed(e)
            if isinstance(answer, Response) and answer.stream is None:
                self._finished(answer, item, self._write(answer, item))
            else:
                self._task = self.loop.create_task(self._complete(answer, item))

    async def _complete(self, answer: Response | Awaitable[Response], request: Request) -> None:
        try:
            response = answer if isinstance(answer, Response) else await answer
        except asyncio.CancelledError:
            raise
        except Exception as e:
            response = _handler_failed(e)
        try:
            if response.stream is None:
                sent = self._write(response, request)
            else:
                sent = await self._stream(response, request)
        except (StreamBroken, ConnectionError):
            # The head is out and the body cannot be finished: cut the
            # connection so the client sees a truncated response, never a
            # complete-looking short one. It was answered all the same, in part.
            if self.observe is not None:
                self.observe(request, response, self._streamed,
                             self.loop.time() - request.received)
            if self.transport is not None:
                self.transport.abort()
            return
        self._task = None
        self._finished(response, request, sent)

    def _finished(self, response: Response, request: Request, sent: int) -> None:
        if self.observe is not None:
            self.observe(request, response, sent, self.loop.time() - request.received)
        self._busy = False
        self._first = False
        if response.close or not request.keep_alive or (self._eof and not self._queue):
            self._close()
            return
        if self._reading_paused:
            self._resume_reading()
        if self._queue:
            self._next()
        elif self._in_head:
            self._head_armed = True
            self._arm(self.limits.head_timeout, self._head_expired)
        elif self._in_message:
            self._arm(self.limits.body_timeout, self._body_expired)
        elif not self._closed:
            self._arm(self.limits.idle_timeout, self._idle_expired)

    def _head(self, r: Response, request: Request, length: int | None, chunked: bool) -> bytes:
        head = f"HTTP/1.1 {r.status} {_REASONS.get(r.status, '')}\r\n"
        if r.content_type is not None:
            head += f"Content-Type: {r.content_type}\r\n"
        if not _no_body(r.status):
            if length is not None:
                head += f"Content-Length: {length}\r\n"
            elif chunked:
                head += "Transfer-Encoding: chunked\r\n"
        head += f"{REQUEST_ID}: {request.request_id}\r\n"
        for name, value in r.headers:
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"header {name!r}: a line break in a header")
            head += f"{name}: {value}\r\n"
        if r.close or not request.keep_alive:
            head += "Connection: close\r\n"
        return head.encode("latin-1") + r.header_block + b"\r\n"

    def _write(self, r: Response, request: Request) -> int:
        """Write a whole response; returns the body bytes written."""
        head = self._head(r, request, len(r.body), False)
        if self.transport is None or self._closed:
            return 0
        if r.body and request.method != "HEAD" and not _no_body(r.status):
            self.transport.write(head + r.body)
            return len(r.body)
        self.transport.write(head)  # HEAD: the length, not the bytes
        return 0

    async def _stream(self, r: Response, request: Request) -> int:
        """Write the head, then each chunk as it comes, paced by the client;
        returns the body bytes written."""
        assert r.stream is not None
        head_only = request.method == "HEAD" or _no_body(r.status)
        # Unknown length: chunked for HTTP/1.1, to the close for HTTP/1.0.
        chunked = r.length is None and request.http_version == "1.1"
        if r.length is None and not chunked:
            r.close = True
        try:
            self.transport.write(self._head(r, request, r.length, chunked))  # type: ignore[union-attr]
            if head_only:
                return 0
            sent = self._streamed = 0
            while True:
                try:
                    chunk = await anext(r.stream)
                except StopAsyncIteration:
                    break
                except (OSError, StreamBroken) as e:
                    raise StreamBroken(str(e)) from None
                except Exception as e:  # the origin's errors (OriginError): same outcome
                    raise StreamBroken(type(e).__name__) from None
                if not chunk:
                    continue
                sent += len(chunk)
                if r.length is not None and sent > r.length:
                    raise StreamBroken("body longer than its length")
                self.transport.write(  # type: ignore[union-attr]
                    b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                self._streamed = sent
                await self._drain()
            if r.length is not None and sent != r.length:
                raise StreamBroken("body shorter than its length")
            if chunked:
                self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
            return sent
        finally:
            await _close_stream(r.stream)

    async def _drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        self._drained = self.loop.create_future()
        try:
            await asyncio.wait_for(self._drained, self.limits.body_timeout)
        except TimeoutError:  # a client that stopped reading
            raise StreamBroken("client stalled") from None
        finally:
            self._drained = None

    def _refuse(self, r: _Refuse) -> None:
        """Answer a refused request (status 0: none) and close."""
        self.counters.request_error(r.error)
        if r.status and self.transport is not None and not self._closed:
            body = f"{r.status} {_reason(r.status)}\n".encode()
            self.transport.write(
                f"HTTP/1.1 {r.status} {_reason(r.status)}\r\nContent-Type: text/plain; "
                f"charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                .encode() + body)
        self._close()

    def _close(self) -> None:
        self._drop_timer()
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.close()  # TLS: close_notify after what is written

    # -- timers and reading ----------------------------------------------------------

    # One timer handle per connection, moved by deadline: arming, cancelling
    # and re-arming it for every request (idle, head, body, busy) would make
    # and drop several handles per request. A pending handle that fires
    # before the current deadline just re-arms itself for what is left. It
    # is never set further ahead than the shortest limit, so a later, shorter
    # deadline (a request's head after an idle wait) never has to replace it.

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        now = self.loop.time()
        deadline = now + delay
        self._deadline, self._expire = deadline, callback
        if self._timer is not None and self._timer.when() > deadline:
            self._timer.cancel()    # fires too late for the new deadline (delay < shortest)
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(min(deadline, now + self.limits.shortest),
                                            self._tick)

    def _drop_timer(self) -> None:
        self._expire = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        expire = self._expire
        if expire is None or self._closed:
            return
        now = self.loop.time()
        if now < self._deadline:
            self._timer = self.loop.call_at(min(self._deadline, now + self.limits.shortest),
                                            self._tick)
            return
        self._expire = None
        expire()

    def _idle_expired(self) -> None:
        if self._first:
            self._refuse(_Refuse(408, RequestError.TIMEOUT))
        else:
            self._close()  # an idle kept-alive connection: close quietly

    def _head_expired(self) -> None:
        self._refused(_Refuse(408, RequestError.TIMEOUT))
        self._next()

    _body_expired = _head_expired

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closed and \
                not self._broken:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()
