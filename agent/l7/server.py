"""The L7 front end: TCP accept → regional guard → TLS → HTTP/1.1 requests.

    python -m agent.l7.server --config serve.yaml           serve until SIGTERM/SIGINT
    python -m agent.l7.server --config serve.yaml --check   load config and certs; serve nothing

Per connection, each step learns only what the guard has allowed so far:

  1 accept      raw TCP; nothing is read. The listener defers a connection
                until its client has spoken (TCP_DEFER_ACCEPT: the kernel
                holds the ClientHello). The local address the client dialled
                goes to Guard.by_address: a foreign region's dedicated IP is
                closed at once (RST), not one TLS byte sent or read.
  2 TLS         the ClientHello's SNI goes to Guard.by_sni inside OpenSSL's
                servername callback, before a certificate is chosen: an
                unknown name (unless `unknown_sni` names a default zone), a
                missing one, or a foreign region's zone aborts the handshake
                (the connection closes); a servable zone switches to its context.
  3 requests    HTTP/1.1 by httptools (agent/l7/http1.py): keep-alive, bodies,
                limits and timeouts (400, 408, 413, 431). Each request's
                Host must name the TLS zone (Guard.by_host), else 421; an
                absolute-form target must name that Host, else 400. Then
                the zone's path (agent/l7/proxy.py): page rules, firewall,
                rate limits, WAF, bots, credential stuffing, cache, origin.

TLS follows Mozilla's "intermediate" profile: TLS 1.2 and 1.3, forward
secret AEAD ciphers, groups X25519/P-256/P-384 (agent/l7/openssl.cnf), an
ECDSA and an RSA certificate per zone, ALPN http/1.1, no OCSP stapling
(nothing to fetch from a CA at run time). Resumption is stateful, from this
process's session cache; `tls_resumption: false` refuses TLS 1.3
resumption (Python cannot switch off TLS 1.2's session-id cache).

Privacy: nothing about a client or a request is logged or kept, only the
counters of agent/l7/counters.py (zone names and enums as labels). A
request lives only while it is answered; the cache keeps responses, in
memory and, spilled, encrypted with a key that lives only in memory.

The status socket answers one JSON command per connection: counters, and
cache purges by URL, prefix or zone (agent/l7/status.py is its client).

The daemon runs it beside its own loop with `run_in_thread(cfg)`; the handle's
`.stop()` closes listeners and connections and removes the status socket.
"""

from __future__ import annotations

import _socket
import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
from collections.abc import Awaitable, Coroutine, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

from agent.l7.bots import Challenge
from agent.l7.cache import Cache, CacheDirError
from agent.l7.config import ConfigError, ServeConfig, load_serve_config, normalise_ip
from agent.l7.counters import Counters, Refusal, RequestError
from agent.l7.geo import CountryTable
from agent.l7.guard import Guard, Reason, host_name
from agent.l7.http1 import Http1Protocol, Limits, Request, Response
from agent.l7.observe import Observer, Sampling, Submit
from agent.l7.proxy import ZoneProxy

log = logging.getLogger("privedge.l7")

LISTEN_BACKLOG = 1024
SHUTDOWN_TIMEOUT = 5.0        # TLS close_notify exchange and final writes
STATUS_TIMEOUT = 2.0
ACCEPT_BACKOFF = 0.1          # after EMFILE and friends, instead of spinning
RETIRE_GRACE = 120.0          # replaced zones' origin pools close after this (their requests end)
ACCEPT_BATCH = 64             # connections accepted per wake-up of a listener
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # forward secret AEAD only
# Keys readable by group or others are refused, as ssh does for its keys.
KEY_MODE_FORBIDDEN = 0o077


class ServeError(Exception):
    """The server cannot start; the message says what and what to do."""


# --------------------------------------------------------------------------- TLS


def _target_matches_host(target: str, host: str | None) -> bool:
    """An absolute-form target names the host that counts (RFC 9112 3.2.2):
    it must be the Host header's, or the zone check could be bypassed."""
    if target.startswith("/") or target == "*":
        return True
    scheme, sep, rest = target.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    return bool(sep) and scheme.lower() in ("http", "https") and host is not None \
        and authority.lower() == host.lower()


def tls_context(cert: Path | None = None, key: Path | None = None,
                resumption: bool = True) -> ssl.SSLContext:
    """A server context with this project's TLS settings, and a chain if given.

    The front context (no chain) and each zone's context share settings:
    version and cipher choices stay with the context a handshake starts on,
    while the certificate and ALPN come from the one the SNI callback picks.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3 suites are all AEAD and stay default
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
                    | ssl.OP_CIPHER_SERVER_PREFERENCE)
    # Resumption from the server's own session cache, not from tickets:
    # ticket keys would have to be shared and rotated across processes and
    # DCs. With OP_NO_TICKET, TLS 1.3 hands out stateful tickets that are
    # only a cache key; the secrets stay in this process's memory.
    ctx.options |= ssl.OP_NO_TICKET
    # No ticket at all refuses TLS 1.3 resumption (benchmarks of full
    # handshakes; clients such as wrk resume whenever they can).
    ctx.num_tickets = 1 if resumption else 0
    ctx.set_alpn_protocols(["http/1.1"])
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _readable_by_others(zone: str, key: Path) -> str | None:
    """The problem with a private key that group or others may read, if so."""
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & KEY_MODE_FORBIDDEN:
        return f"zone {zone}: {key}: mode {mode:04o} lets others read the private key; " \
               f"chmod 600 {key}"
    return None


def load_zone_contexts(certs: Path, zones: Iterable[str],
                       resumption: bool = True) -> dict[str, ssl.SSLContext]:
    """One context per zone from <certs>/<zone>.crt and .key (and an RSA
    twin from <zone>.rsa.crt and .rsa.key); every problem listed.

    Only zones this DC may serve are asked for: a foreign region's key is
    never needed here, so it need not (and should not) be on this host.
    """
    contexts: dict[str, ssl.SSLContext] = {}
    problems: list[str] = []
    for zone in zones:
        crt, key = certs / f"{zone}.crt", certs / f"{zone}.key"
        try:
            missing = [p.name for p in (crt, key) if not p.is_file()]
            if missing:
                problems.append(f"zone {zone}: {certs}: {' and '.join(missing)} missing "
                                f"(a PEM chain in {zone}.crt, its key in {zone}.key)")
                continue
            if (exposed := _readable_by_others(zone, key)) is not None:
                problems.append(exposed)
                continue
            ctx = tls_context(crt, key, resumption)
            # An RSA twin, if there is one: OpenSSL then picks per client
            # (ECDSA for those that offer it, RSA for the rest).
            rsa_crt, rsa_key = certs / f"{zone}.rsa.crt", certs / f"{zone}.rsa.key"
            if rsa_crt.is_file() and rsa_key.is_file():
                crt, key = rsa_crt, rsa_key
                if (exposed := _readable_by_others(zone, key)) is not None:
                    problems.append(exposed)
                    continue
                ctx.load_cert_chain(crt, key)
            contexts[zone] = ctx
        except ssl.SSLError as e:
            problems.append(f"zone {zone}: {crt}, {key}: not a PEM chain and its key "
                            f"({e.reason or e})")
        except OSError as e:
            problems.append(f"zone {zone}: {e.filename or certs}: cannot read ({e.strerror})")
    if problems:
        raise ServeError("\n".join(problems))
    return contexts


# --------------------------------------------------------------------------- sockets


def _listener(address: str, port: int, defer: int) -> socket.socket:
    """A listening TCP socket; IPv6 ones are v6-only so :: and 0.0.0.0 coexist.

    A wildcard bind accepts connections to every address the host owns,
    including those only covered by a local route (anycast prefixes on lo).
    TCP_DEFER_ACCEPT: the kernel hands over a connection once its client
    has spoken (HTTP and TLS clients speak first), or after `defer` seconds:
    a silent connection costs the server nothing, and a new one costs one
    event loop wake-up instead of two (about 5% of a TLS connection's CPU).
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on [{address}]:{port}: {e.strerror}") from None
    return sock


def _unix_listener(path: Path) -> socket.socket:
    """A 0600 unix socket at `path`; a stale socket file is replaced.

    The mode is set between bind and listen: until listen() nobody can
    connect, so there is no moment where the socket is open to all.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ServeError(f"{path}: exists and is not a socket; remove it or choose "
                                 "another status_socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(0.5)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # nobody answers: left over from a crash
            else:
                raise ServeError(f"{path}: another server answers there; stop it first")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise ServeError(f"{path}: cannot create the status socket ({e.strerror})") from None


class _AcceptedSocket(socket.socket):
    """An accepted connection whose family and type read as plain ints:
    uvloop reads both for every connection it is handed, and socket.socket
    makes an enum of each read (a few µs a connection)."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type      # type: ignore[assignment]


def _socket_ip(text: str) -> str:
    """normalise_ip for what a socket reports: its IPv4 text is canonical
    already (the common case, no parsing); IPv6 and mapped forms are parsed."""
    return text if ":" not in text else normalise_ip(text)


def _reset(sock: socket.socket) -> None:
    """Close with RST: a refusal, and no TIME_WAIT left behind."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Log the event loop's stray errors without the context objects, which
    may describe a connection; message and exception type are enough."""
    exc = context.get("exception")
    log.warning("event loop: %s%s", context.get("message", "error"),
                f" ({type(exc).__name__})" if exc else "")


# --------------------------------------------------------------------------- server


class L7Server:
    """The asyncio front end for one ServeConfig; the only I/O of agent/l7."""

    def __init__(self, cfg: ServeConfig, counters: Counters | None = None,
                 cache: Cache | None = None, logs: Mapping[str, Submit] | None = None,
                 sample: Sampling | None = None) -> None:
        """Build the guard and load the certificates; ServeError lists problems.

        `logs` (zone -> its log shipper's submit), `sample`: where answered
        requests' records go (agent/l7/observe.py); None: metrics only.

        `cache`: a store that outlives this server (the daemon keeps one
        across reloads); without it, start() makes one and stop() empties it.
        Nothing is made on disk before start(), so a server built only to
        check a config leaves a running one's cache alone."""
        self.cfg = cfg
        self.guard = Guard(cfg)
        self.counters = counters or Counters(z.name for z in cfg.zones)
        self.limits = Limits(**cfg.http.model_dump(), idle_timeout=cfg.idle_timeout)
        self.observer = Observer(cfg.dc, self.counters, logs, sample)
        self._contexts = load_zone_contexts(cfg.certs_dir, self.guard.servable,
                                            cfg.tls_resumption)
        self._zone_of = {ctx: name for name, ctx in self._contexts.items()}
        countries = CountryTable(cfg.countries)
        # Shared by the zones: the challenge key and the cache store, both
        # in this process's memory only.
        self.challenge = Challenge()
        self.cache = cache
        self._own_cache = cache is None
        self._proxies = {}
        for z in cfg.zones:
            if z.name not in self.guard.servable:
                continue
            try:
                self._proxies[z.name] = ZoneProxy(cfg, z, self.counters, countries,
                                                  self.challenge)
            except (OSError, ssl.SSLError) as e:   # the origin's ca_file, say
                raise ServeError(f"zone {z.name}: its origin's TLS settings do not load: "
                                 f"{e}") from None
        self._front = tls_context(resumption=cfg.tls_resumption)
        self._front.sni_callback = self._on_sni
        self._listeners: list[socket.socket] = []
        self._plain: list[socket.socket] = []   # plain HTTP (cfg.plain_port)
        self._accepting: list[socket.socket] = []   # listeners with a reader in the loop
        self._connections: set[asyncio.Task[None]] = set()   # accepted, not yet open
        self._open: set[Http1Protocol] = set()                 # open connections
        self._status: asyncio.AbstractServer | None = None
        self._status_path = Path(cfg.status_socket) if cfg.status_socket else None
        self._retired: list[ZoneProxy] = []     # replaced by adopt(), closed later

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(address, port) of each TLS listener, with the port actually bound."""
        return [s.getsockname()[:2] for s in self._listeners]

    @property
    def plain_addresses(self) -> list[tuple[str, int]]:
        """(address, port) of each plain HTTP listener."""
        return [s.getsockname()[:2] for s in self._plain]

    async def start(self) -> None:
        """Bind every listener and the status socket, then accept."""
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(_quiet_exception_handler)
        try:
            if self.cache is None:
                try:
                    self.cache = Cache(self.cfg.cache_store)
                except CacheDirError as e:
                    raise ServeError(f"cache_store.disk_dir: {e}") from None
            for proxy in self._proxies.values():
                proxy.cache = self.cache
            defer = math.ceil(self.cfg.handshake_timeout)
            for address in self.cfg.listen:
                self._listeners.append(_listener(address, self.cfg.port, defer))
                if self.cfg.plain_port is not None:
                    self._plain.append(_listener(address, self.cfg.plain_port, defer))
            if self._status_path is not None:
                status_sock = _unix_listener(self._status_path)
                try:
                    self._status = await asyncio.start_unix_server(self._serve_status,
                                                                   sock=status_sock)
                except BaseException:
                    status_sock.close()
                    self._status_path.unlink(missing_ok=True)
                    raise
        except BaseException:
            await self.stop()
            raise
        for plain, group in ((False, self._listeners), (True, self._plain)):
            for sock in group:
                self._listen(sock, plain)
        # What start-up built (rules, tables, certificates) lives as long as
        # the server: out of the collector's way, it is not rescanned at every
        # collection that requests' short-lived objects trigger.
        gc.freeze()
        log.info("dc %s region %s: serving %s on %s", self.cfg.dc, self.cfg.region,
                 ", ".join(self.guard.servable),
                 ", ".join(f"[{a}]:{p}" for a, p in self.addresses))

    async def stop(self) -> None:
        """Stop accepting, end open connections, remove the status socket."""
        loop = asyncio.get_running_loop()
        for sock in self._accepting:
            loop.remove_reader(sock)
        self._accepting = []
        for sock in (*self._listeners, *self._plain):
            sock.close()
        self._listeners, self._plain = [], []
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        open_ = list(self._open)
        for protocol in open_:
            protocol.abort()  # the server is stopping: no goodbye
        await asyncio.gather(*(p.done for p in open_), return_exceptions=True)
        for proxy in [*self._proxies.values(), *self._retired]:
            await proxy.close()
        self._retired = []
        if self._own_cache and self.cache is not None:
            self.cache.close()  # its disk objects go; their key was only in memory
            self.cache = None
        if self._status is not None:
            self._status.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status.wait_closed(), STATUS_TIMEOUT)
            self._status = None
            with contextlib.suppress(FileNotFoundError):
                self._status_path.unlink()

    def can_adopt(self, cfg: ServeConfig) -> bool:
        """Whether `cfg` differs from this server's only where adopt() can
        follow without a restart: the zones."""
        return cfg.model_copy(update={"zones": self.cfg.zones}) == self.cfg

    def adopt(self, new: L7Server) -> None:
        """Serve `new`'s zones from now on, on this server's listeners and open
        connections, with its cache, counters and challenge key: what a
        network generation changes, with no connection refused or cut. Run
        on this server's loop; `new` was built with this server's counters
        and cache, and not started.

        A handshake picks its zone with the new contexts from here on; a
        request on an open connection is answered by the new zone settings,
        or 421 if its zone is gone. The replaced zones' origin pools close
        after RETIRE_GRACE, once requests still waiting on them are done."""
        if new.counters is not self.counters or not self.can_adopt(new.cfg):
            raise ValueError("adopt() takes a server built with this one's counters whose "
                             "config differs only in its zones")
        self.counters.add_zones(z.name for z in new.cfg.zones)
        for proxy in new._proxies.values():
            proxy.cache, proxy.challenge = self.cache, self.challenge
        # A handshake under way chose one of the old contexts: its zone, if
        # still served, is still found (only this one previous set is kept).
        for zone, ctx in self._contexts.items():
            if zone in new._proxies:
                new._zone_of.setdefault(ctx, zone)
        retired = list(self._proxies.values())
        self.cfg, self.guard, self.observer = new.cfg, new.guard, new.observer
        self._contexts, self._zone_of, self._proxies = new._contexts, new._zone_of, new._proxies
        self._retired += retired
        asyncio.get_running_loop().call_later(RETIRE_GRACE, self._close_retired, retired)

    def _close_retired(self, proxies: list[ZoneProxy]) -> None:
        for proxy in proxies:
            if proxy in self._retired:
                self._retired.remove(proxy)
                task = asyncio.create_task(proxy.close())
                self._connections.add(task)
                task.add_done_callback(self._connections.discard)

    def _listen(self, listener: socket.socket, plain: bool) -> None:
        if listener.fileno() < 0:  # closed by stop() while backing off
            return
        listener.setblocking(False)
        asyncio.get_running_loop().add_reader(listener, self._accept, listener, plain)
        self._accepting.append(listener)

    def _accept(self, listener: socket.socket, plain: bool) -> None:
        """The listener is readable: accept what is queued, up to a batch.

        One reader stays registered for the listener's life (an awaited
        sock_accept would add and remove it for every connection)."""
        family, kind = listener.family.value, listener.type.value
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = listener._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", e.strerror)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener)
                self._accepting.remove(listener)
                loop.call_later(ACCEPT_BACKOFF, self._listen, listener, plain)
                return
            conn = _AcceptedSocket(family, kind, 0, fd)
            # The client's address goes to the rules (firewall, rate limits)
            # and stays in memory; it is never logged.
            task = asyncio.create_task(self._connection(conn, plain, _socket_ip(peer[0])))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def _on_sni(self, ssl_obj: ssl.SSLObject, server_name: str | None,
                _ctx: ssl.SSLContext) -> int | None:
        """OpenSSL's servername callback: choose the zone's context or abort.

        Called for every ClientHello, with None when it has no SNI. The
        refusal is counted here, where its reason is known; the handshake
        then fails with CALLBACK_FAILED, which _handshake does not recount.
        """
        try:
            decision = self.guard.by_sni(server_name)
            if not decision.serve:
                self.counters.refused(Refusal(decision.reason))
                if decision.reason is Reason.UNKNOWN_SNI:
                    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            ssl_obj.context = self._contexts[decision.zone]
            return None
        except Exception as e:  # never let a bug continue the handshake on the front context
            log.error("SNI callback failed: %s", type(e).__name__)  # its message may quote the name
            self.counters.refused(Refusal.HANDSHAKE_ERROR)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR

    async def _connection(self, conn: socket.socket, plain: bool = False,
                          client: str = "") -> None:
        self.counters.accepted()
        if self.guard.checks_addresses:
            try:
                local = _socket_ip(conn.getsockname()[0])
            except (OSError, ValueError):  # reset before we looked: nothing to serve
                self.counters.refused(Refusal.HANDSHAKE_ERROR)
                _reset(conn)
                return
            if not self.guard.by_address(local).serve:
                self.counters.refused(Refusal.REGION_ADDRESS)
                _reset(conn)
                return
        # Once open, the protocol answers requests until the connection ends;
        # this task ends here (self._open holds the connection till then).
        await (self._plain_http(conn, client) if plain else self._handshake(conn, client))

    async def _handshake(self, conn: socket.socket, client: str) -> None:
        """TLS on the accepted socket; the SNI callback has picked the zone."""
        loop = asyncio.get_running_loop()
        timeout = self.cfg.handshake_timeout
        protocol = Http1Protocol(self.limits, self.counters, registry=self._open)
        try:
            # ssl_handshake_timeout bounds the handshake (no wait_for: it
            # would cost a task per connection).
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._front, ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=SHUTDOWN_TIMEOUT)
        except ssl.SSLError as e:
            if e.reason != "CALLBACK_FAILED":  # else counted by _on_sni with its reason
                self.counters.refused(Refusal.HANDSHAKE_ERROR)
            conn.close()
            return
        except (OSError, TimeoutError, EOFError):
            self.counters.refused(Refusal.HANDSHAKE_ERROR)
            conn.close()
            return
        ssl_obj = transport.get_extra_info("ssl_object")
        zone = self._zone_of.get(ssl_obj.context) if ssl_obj is not None else None
        if zone is None:  # cannot happen while _on_sni switches or refuses; fail closed
            self.counters.refused(Refusal.HANDSHAKE_ERROR)
            transport.abort()
            return
        version = ssl_obj.version()
        self.counters.handshake(version)
        protocol.observe = self.observer.bind(zone, client, version or "")
        protocol.start(lambda request: self._answer(request, zone, client, tls=True))

    async def _plain_http(self, conn: socket.socket, client: str) -> None:
        """Port 80: each request's Host picks the zone (as SNI does on 443);
        the zone redirects to HTTPS or is served in plain."""
        loop = asyncio.get_running_loop()
        # The zone of the request being answered, for its observer: a
        # connection answers its requests one at a time, in order, and
        # observes each before it hands the next to handle().
        answering: list[str | None] = [None]

        def observe(request: Request, response: Response, sent: int, seconds: float) -> None:
            if answering[0] is not None:   # a refused one is no zone's response
                self.observer.finished(answering[0], client, "", request, response, sent,
                                       seconds)

        protocol = Http1Protocol(self.limits, self.counters, registry=self._open,
                                 observe=observe)
        try:
            await loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            conn.close()
            return

        def handle(request: Request) -> Response | Awaitable[Response]:
            decision = self.guard.by_sni(host_name(request.host))
            answering[0] = decision.zone if decision.serve else None
            if not decision.serve:
                self.counters.refused(Refusal(decision.reason))
                return Response(421, b"this server does not serve that host here\n")
            if self.cfg.zone(decision.zone).plain_http == "redirect":
                path = request.target if request.target.startswith("/") else "/"
                location = f"https://{host_name(request.host)}{path}"
                return Response(301, b"", [("Location", location)])
            return self._answer(request, decision.zone, client, tls=False)

        protocol.start(handle)

    def _answer(self, request: Request, zone: str, client: str, tls: bool
                ) -> Response | Awaitable[Response]:
        """The connection-level checks, then the zone's path (agent/l7/proxy.py)."""
        if not _target_matches_host(request.target, request.host):
            self.counters.request_error(RequestError.MALFORMED)
            return Response(400, b"400 Bad Request\n", close=True)
        proxy = self._proxies.get(zone)
        if proxy is None or (tls and not self.guard.by_host(request.host, zone).serve):
            # (no proxy: the zone is no longer served here, since a new config)
            self.counters.refused(Refusal.MISDIRECTED)
            return Response(421, b"this connection does not serve that host\n")
        return proxy.handle(request, client, tls)

    async def _serve_status(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """One JSON command line in, one JSON line out, then close:
        {"cmd": "status"} (counters), or {"cmd": "purge", "zone": Z} with
        "url" (one URL, every variant) or "prefix" (a URL prefix), or
        neither (the whole zone)."""
        try:
            raw = await asyncio.wait_for(reader.readline(), STATUS_TIMEOUT)
            answer = self._command(json.loads(raw) if raw.strip() else {"cmd": "status"})
        except (OSError, TimeoutError, ValueError) as e:
            answer = {"error": f"not a command: {e}"}
        line = json.dumps(answer, sort_keys=True) + "\n"
        try:
            writer.write(line.encode())
            await asyncio.wait_for(writer.drain(), STATUS_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), STATUS_TIMEOUT)

    def _command(self, doc: object) -> dict[str, object]:
        cmd = doc.get("cmd") if isinstance(doc, dict) else None
        if cmd == "status":
            return {"dc": self.cfg.dc, "region": self.cfg.region, **self.counters.snapshot(),
                    "cache": self.cache.stats() if self.cache is not None else {}}
        if cmd != "purge":
            return {"error": f"unknown command {cmd!r} (status, purge)"}
        zone = doc.get("zone")
        if zone not in self._proxies or self.cache is None:
            return {"error": f"zone {zone!r} is not served here "
                             f"(zones: {', '.join(self._proxies) or 'none'})"}
        url, prefix = doc.get("url"), doc.get("prefix")
        if url is not None and prefix is not None:
            return {"error": "give url or prefix, not both"}
        if url is None and prefix is None:
            return {"purged": self.cache.purge_zone(zone)}
        parts = urlsplit(str(url if url is not None else prefix))
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            return {"error": f"{url or prefix!r} is not an http(s) URL"}
        if self.guard.by_sni(host).zone != zone:
            return {"error": f"{host} is not a hostname of zone {zone}"}
        if url is not None:
            return {"purged": self.cache.purge_url(zone, host, parts.path or "/", parts.query)}
        return {"purged": self.cache.purge_prefix(zone, host, parts.path or "/")}


# --------------------------------------------------------------------------- thread


def run_loop(main: Coroutine[object, object, None]) -> None:
    """Run on uvloop: its TCP and TLS paths cost less CPU per request."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


class ServerThread:
    """An L7Server on its own event loop in a daemon thread.

    For the synchronous agent daemon: `handle = run_in_thread(cfg)` returns
    once the server listens (or raises ServeError), `handle.stop()` ends it.
    """

    def __init__(self, cfg: ServeConfig, counters: Counters | None = None,
                 cache: Cache | None = None, logs: Mapping[str, Submit] | None = None,
                 sample: Sampling | None = None) -> None:
        # certificate problems raise here
        self.server = L7Server(cfg, counters, cache, logs, sample)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=f"privedge-l7-{cfg.dc}",
                                        daemon=True)

    @property
    def counters(self) -> Counters:
        return self.server.counters

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.server.addresses

    def start(self, timeout: float = 10.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ServeError(f"the L7 server did not start within {timeout:g}s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the server and join the thread; False if it did not end in time."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def adopt(self, new: L7Server, timeout: float = 10.0) -> None:
        """L7Server.adopt on the server's loop; returns once it is done."""
        async def adopt() -> None:
            self.server.adopt(new)

        if self._loop is None:
            raise ServeError("the L7 server is not running")
        future = asyncio.run_coroutine_threadsafe(adopt(), self._loop)
        try:
            future.result(timeout)
        except TimeoutError:
            if future.cancel():   # it never ran: the old zones are still served
                raise
            future.result()       # it is running or ran: its outcome is the truth

    def _run(self) -> None:
        run_loop(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(_quiet_exception_handler)
        self._stopping = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as e:  # handed to the thread that called start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.server.stop()


def run_in_thread(cfg: ServeConfig, counters: Counters | None = None,
                  timeout: float = 10.0, cache: Cache | None = None,
                  logs: Mapping[str, Submit] | None = None, sample: Sampling | None = None
                  ) -> ServerThread:
    """Start an L7Server in a thread; returns once it listens. Stop with .stop()."""
    return ServerThread(cfg, counters, cache, logs, sample).start(timeout)


# --------------------------------------------------------------------------- CLI


def _phase(name: str, detail: str) -> None:
    print(f"privedge-l7: [{name}] {detail}", flush=True)


async def _serve_until_signal(server: L7Server) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    _phase("listen", ", ".join(f"[{a}]:{p}" for a, p in server.addresses)
           + (f"; status {server.cfg.status_socket}" if server.cfg.status_socket else ""))
    _phase("ready", f"dc {server.cfg.dc} region {server.cfg.region}, serving "
                    f"{', '.join(server.guard.servable) or 'no zone'}")
    await stop.wait()
    await server.stop()
    _phase("exit", "listeners closed, status socket removed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.l7.server",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="serve config YAML")
    p.add_argument("--check", action="store_true",
                   help="validate the config and load the certificates; serve nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="privedge-l7: %(message)s")
    try:
        cfg = load_serve_config(args.config)
        _phase("config", f"{args.config}: {len(cfg.zones)} zones")
        server = L7Server(cfg)
        _phase("certs", f"{len(server.guard.servable)} zone certificates loaded from "
                        f"{cfg.certs}")
        if args.check:
            print(f"{args.config}: valid; nothing was started")
            return 0
        run_loop(_serve_until_signal(server))
        return 0
    except (ConfigError, ServeError) as e:
        print(f"privedge-l7: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
