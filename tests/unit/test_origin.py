"""Requests to an origin: TLS verification, pooling, timeouts, safe retries.

Each test runs a small origin on loopback (asyncio, in the test's own
event loop) that answers with what it saw, and can misbehave on request.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import h11
import pytest

from agent.l7.origin import Origin, OriginError
from lab.certs import make_lab_pki

NAME = "origin.example"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lab_pki(tmp_path_factory.mktemp("opki"), {"origin": [NAME]})


class FakeOrigin:
    """Answers each request with JSON of what it saw; `mode` misbehaves."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode, self.connections, self.requests = mode, 0, 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(ev, h11.Request):
                    req, body = ev, b""
                    while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await reader.read(65536))
                        elif isinstance(ev, h11.Data):
                            body += ev.data
                    self.requests += 1
                    if self.mode == "silent":
                        await asyncio.sleep(30)
                    if self.mode == "close-after-first" and self.requests > 1 \
                            and self.connections == 1:
                        return  # a kept-alive connection dropped under the client
                    out = json.dumps({"target": req.target.decode(), "body": body.decode(),
                                      "headers": {n.decode(): v.decode()
                                                  for n, v in req.headers}}).encode()
                    writer.write(conn.send(h11.Response(status_code=200, headers=[
                        ("content-length", str(len(out)))])) + conn.send(h11.Data(data=out))
                                 + conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    conn.start_next_cycle()
                elif isinstance(ev, h11.ConnectionClosed):
                    return
        finally:
            writer.close()


async def _serve(fake: FakeOrigin, pki: Path | None) -> asyncio.Server:
    ctx = None
    if pki is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.parent / "origin.crt", pki.parent / "origin.key")
    return await asyncio.start_server(fake.handle, "127.0.0.1", 0, ssl=ctx)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_tls_verified_against_the_zones_ca_and_pooled(pki) -> None:
    async def scenario():
        fake = FakeOrigin()
        srv = await _serve(fake, pki)
        port = srv.sockets[0].getsockname()[1]
        o = Origin(f"https://127.0.0.1:{port}", ca_file=str(pki), server_name=NAME)
        r1 = await o.request("GET", "/a?x=1", [("host", NAME), ("x-request-id", "r1")])
        r2 = await o.request("POST", "/b", [("host", NAME)], b"payload")
        await o.close()
        srv.close()
        return fake, r1, r2

    fake, r1, r2 = run(scenario())
    assert r1.status == 200 and json.loads(r1.body)["target"] == "/a?x=1"
    assert json.loads(r1.body)["headers"]["x-request-id"] == "r1"
    assert json.loads(r2.body)["body"] == "payload"
    assert fake.connections == 1, "the second request did not reuse the connection"


def test_an_unverifiable_certificate_is_refused_unless_verification_is_off(pki) -> None:
    async def scenario(verify: bool):
        fake = FakeOrigin()
        srv = await _serve(fake, pki)
        port = srv.sockets[0].getsockname()[1]
        o = Origin(f"https://127.0.0.1:{port}", verify=verify, server_name=NAME)
        try:
            return await o.request("GET", "/", [("host", NAME)])
        finally:
            await o.close()
            srv.close()

    with pytest.raises(OriginError) as e:
        run(scenario(True))   # the lab CA is not in the system's trust store
    assert e.value.status == 502 and "TLS failed" in str(e.value)
    assert run(scenario(False)).status == 200


def test_plain_http_origin() -> None:
    async def scenario():
        srv = await _serve(FakeOrigin(), None)
        port = srv.sockets[0].getsockname()[1]
        o = Origin(f"http://127.0.0.1:{port}")
        r = await o.request("GET", "/p", [("host", "o")])
        await o.close()
        srv.close()
        return r

    assert run(scenario()).status == 200


def test_a_silent_origin_is_a_504() -> None:
    async def scenario():
        srv = await _serve(FakeOrigin("silent"), None)
        port = srv.sockets[0].getsockname()[1]
        o = Origin(f"http://127.0.0.1:{port}", head_timeout=0.3)
        try:
            await o.request("GET", "/", [("host", "o")])
        finally:
            await o.close()
            srv.close()

    with pytest.raises(OriginError) as e:
        run(scenario())
    assert e.value.status == 504


def test_a_closed_origin_is_a_502() -> None:
    with pytest.raises(OriginError) as e:
        run(Origin("http://127.0.0.1:9", connect_timeout=2).request("GET", "/", []))
    assert e.value.status == 502 and "cannot connect" in str(e.value)


@pytest.mark.parametrize("method,retried", [("GET", True), ("POST", False)])
def test_only_idempotent_requests_are_retried(method: str, retried: bool) -> None:
    """The origin drops the kept-alive connection when the second request
    arrives: a GET is sent again on a fresh one, a POST is not."""
    async def scenario():
        fake = FakeOrigin("close-after-first")
        srv = await _serve(fake, None)
        port = srv.sockets[0].getsockname()[1]
        o = Origin(f"http://127.0.0.1:{port}")
        await o.request("GET", "/1", [("host", "o")])
        try:
            return await o.request(method, "/2", [("host", "o")], b"x" if method == "POST"
                                   else b"")
        finally:
            await o.close()
            srv.close()

    if retried:
        assert run(scenario()).status == 200
    else:
        with pytest.raises(OriginError) as e:
            run(scenario())
        assert e.value.status == 502


def test_bad_urls_are_named() -> None:
    with pytest.raises(ValueError, match="expected http://host"):
        Origin("ftp://x")
