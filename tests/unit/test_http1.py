"""HTTP/1.1 connections (agent/l7/http1.py) over plain loopback TCP, no TLS.

A tiny handler echoes what it got (method, target, body length and bytes),
so each test checks what the session made of the bytes a client sent and
how it answered: keep-alive, pipelining, chunked bodies, limits, timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from agent.l7.counters import Counters
from agent.l7.http1 import Http1Protocol, Limits, Request, Response

LIMITS = Limits(head_bytes=4096, headers=20, body_bytes=1000, head_timeout=0.5,
                body_timeout=0.5, idle_timeout=0.5)


async def _echo(request: Request) -> Response:
    if request.target.startswith("/bug"):
        raise ValueError(f"a bug that quotes the request: {request.target}")
    return Response(200, json.dumps({"method": request.method, "target": request.target,
                                     "host": request.host, "body": request.body.decode(),
                                     "id": request.request_id}).encode(),
                    content_type="application/json")


@pytest.fixture()
def server() -> Iterator[tuple[int, Counters]]:
    counters = Counters(["www"])
    ready = threading.Event()
    state: dict = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: Http1Protocol(LIMITS, counters, _echo),
                                       "127.0.0.1", 0)
        state["port"] = srv.sockets[0].getsockname()[1]
        state["stop"] = asyncio.Event()
        state["loop"] = asyncio.get_running_loop()
        ready.set()
        async with srv:
            await state["stop"].wait()

    t = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    t.start()
    assert ready.wait(10)
    yield state["port"], counters
    state["loop"].call_soon_threadsafe(state["stop"].set)
    t.join(10)


def _read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


def _exchange(port: int, *parts: bytes, pause: float = 0.0) -> list:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for p in parts:
            s.sendall(p)
            time.sleep(pause)
        return _responses(_read_all(s))


GET = b"GET /a HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
CLOSE = b"GET /b HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n"


def test_keep_alive_serves_several_requests_each_with_its_id(server) -> None:
    port, _ = server
    got = _exchange(port, GET, CLOSE, pause=0.05)
    assert [s for s, _, _ in got] == [200, 200]
    bodies = [json.loads(b) for _, _, b in got]
    assert [b["target"] for b in bodies] == ["/a", "/b"]
    ids = [h["x-request-id"] for _, h, _ in got]
    assert ids == [b["id"] for b in bodies] and ids[0] != ids[1]


def test_pipelined_requests_are_answered_in_order(server) -> None:
    port, _ = server
    got = _exchange(port, GET + GET.replace(b"/a", b"/c") + CLOSE)
    assert [json.loads(b)["target"] for _, _, b in got] == ["/a", "/c", "/b"]


def test_chunked_body_is_decoded(server) -> None:
    port, _ = server
    req = (b"POST /api HTTP/1.1\r\nHost: www.example.com\r\nTransfer-Encoding: chunked\r\n"
           b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    ((status, _, body),) = _exchange(port, req)
    assert status == 200 and json.loads(body)["body"] == "hello world"


def test_body_over_the_limit_gets_413_and_the_connection_ends(server) -> None:
    port, counters = server
    req = (b"POST / HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 2000\r\n\r\n"
           + b"x" * 2000)
    ((status, headers, _),) = _exchange(port, req)
    assert status == 413 and headers["connection"] == "close"
    assert counters.snapshot()["request_errors"]["too_large"] == 1


def test_too_many_headers_get_431(server) -> None:
    port, _ = server
    req = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n" + b"X-A: 1\r\n" * 25 + b"\r\n"
    ((status, _, _),) = _exchange(port, req)
    assert status == 431


def test_slowloris_is_closed_after_the_head_timeout(server) -> None:
    """One byte every 0.1 s: the head never completes within 0.5 s."""
    port, counters = server
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with contextlib.suppress(OSError):
            for b in GET[:-2]:
                s.sendall(bytes([b]))
                time.sleep(0.1)
        got = _responses(_read_all(s))
    assert got and got[0][0] == 408
    assert time.monotonic() - started < 3, "the trickle was not cut off at the head timeout"
    assert counters.snapshot()["request_errors"]["timeout"] == 1


def test_slow_body_gets_408(server) -> None:
    port, _ = server
    req = b"POST / HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 10\r\n\r\nabc"
    ((status, _, _),) = _exchange(port, req)
    assert status == 408


def test_an_idle_kept_alive_connection_is_closed_quietly(server) -> None:
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(GET)
        started = time.monotonic()
        got = _responses(_read_all(s))
    assert [st for st, _, _ in got] == [200]        # no 408 for the silence after
    assert 0.4 < time.monotonic() - started < 3


def test_http10_closes_after_the_response(server) -> None:
    port, _ = server
    ((status, _, body),) = _exchange(port, b"GET /old HTTP/1.0\r\n\r\n")
    assert status == 200 and json.loads(body)["host"] is None


def test_garbage_gets_400(server) -> None:
    port, counters = server
    ((status, _, _),) = _exchange(port, b"\x16\x03\x01 not http\r\n\r\n")
    assert status == 400 and counters.snapshot()["request_errors"]["malformed"] == 1


def test_a_handler_bug_is_a_500_and_its_message_is_not_logged(server, caplog) -> None:
    port, _ = server
    with caplog.at_level("ERROR", logger="privedge.l7"):
        got = _exchange(port, b"GET /bug-secret-7f3a HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    assert [s for s, _, _ in got] == [500]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ValueError" in logged and "secret-7f3a" not in logged


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(server) -> None:
    port, counters = server
    head = (b"POST /up HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n")
    got = _exchange(port, head)           # no body byte sent at all
    assert [s for s, _, _ in got] == [413]
    assert counters.snapshot()["request_errors"]["too_large"] == 1


def test_expect_100_continue_is_answered_before_the_body(server) -> None:
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        got = _responses(_read_all(s))
    assert got[0][0] == 200 and json.loads(got[0][2])["body"] == "hello"
