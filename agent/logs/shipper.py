"""One stream of records to one core, per core/PROTOCOL.md; memory only.

    shipper = Shipper(dc="dus", stream="logs", core="core",
                      url="https://198.18.0.10:8443", tls=TlsFiles(crt, key, ca),
                      tls_name="core.privedge.internal").start()
    shipper.submit(record)      # event loop: a tuple in records.FIELDS order
    shipper.stats()             # exact counts, any thread
    shipper.reload()            # SIGHUP: reissued certificates, next connection
    shipper.stop(5.0)           # flush (bounded), then end the threads

Who calls what: the L7 front end's event loop calls submit() (through
router.LogRouter); the daemon starts, reloads and stops; the metrics
collector reads stats().

Three stages, each bounded, none on disk (invariant 5):

  submit()    deque.append after a length and a size check: over
              max_pending_records, or over max_pending_bytes, the record is
              dropped and counted. The size is an estimate, a constant
              (RECORD_BYTES: the tuple, its numbers and short strings) plus
              the length of the strings a request can make long (host, path,
              user agent: up to the front end's head limit each); it bounds
              the memory of records waiting for the encoder when requests
              are large, where the count alone would allow 50,000 request
              heads. No lock, no encoding, no syscall (one Event.set per
              batch_records, to wake the encoder).
  encoder     thread: takes up to batch_records once that many are waiting,
              or batch_seconds after it first saw one waiting (it looks at
              least every TICK), encodes NDJSON, gzips, names the batch
              <dc>:<stream>:<boot>:<seq> and queues it. The queue is bounded
              in bytes (buffer_bytes): over it the oldest batch not in
              flight is dropped, its records counted as dropped.
  sender      thread: POSTs the oldest batch over one kept-alive mTLS
              connection, and retries it (same id, same body) with capped
              exponential backoff and jitter for as long as it runs. Two
              threads so that a core that hangs a connection for `timeout`
              seconds never stops encoding (the record queue stays small).

Accounting, exact at any snapshot: submitted = sent + dropped + rejected +
pending_records. `rejected` is the core's 400/413 plus records that
records.py refuses before they could spoil a batch.

stop() counts whatever is still pending as dropped, once no thread can
still decide it: at once for the record queue and the batches not in
flight, and for a batch in flight (or records being encoded) when its
thread ends: stop() aborts the sender's connection (shutdown() wakes a
connect the core never answers, a handshake, a send or a wait for the
answer), so that is normally within stop's timeout; a thread stuck past it
(in a name lookup, say) settles its part when it ends, at the latest after
`timeout`. An answer that arrives meanwhile still counts (200: sent); a
failure is not retried and not logged as a retry: its records are dropped.
So after stop() and the threads' end, pending_records is 0 and dropped is
submitted - sent - rejected.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import logging
import random
import secrets
import socket
import ssl
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agent.logs.records import ENCODERS, LOG_FIELDS, LOGS, STREAMS
from agent.metrics.server import TlsFiles
from agent.metrics.tls import client_context

log = logging.getLogger(__name__)

# <boot> of PROTOCOL.md: random per agent start (per process). <seq> comes
# from one counter per stream for the whole process, not per Shipper: the
# shippers of one stream to different cores share the <dc>:<stream>:<boot>
# prefix, and a router built again in the same process (tests, a future
# reload) must not repeat an id, which the core would answer as a
# duplicate, silently dropping the new batch.
BOOT = secrets.token_hex(8)
_SEQ = {stream: itertools.count(1) for stream in STREAMS}
PATHS = {stream: f"/v1/ingest/{stream}" for stream in STREAMS}
ENCODER, SENDER = "encode", "send"  # the threads' roles (and their names' last part)

# Measured on 2000-record batches of ~290-byte log lines: level 6 costs
# 1.7 µs a record against level 1's 0.65, and makes batches a quarter
# smaller (24 vs 32 bytes a record), so buffer_bytes rides out a longer
# outage. The whole path stays near 4% of a core at 5,000 records/s
# (bench-metadata: submit ~0.1 µs, encode + checks + gzip ~6 µs, TLS send
# 0.2 µs per record).
GZIP_LEVEL = 6
MAX_BATCH_BYTES = 8 << 20   # NDJSON per batch: far under the core's 64 MiB expanded limit
TICK = 0.25           # the encoder's longest sleep: how late a time-based batch may be
BACKOFF = (0.2, 5.0)  # first retry delay, cap (doubling, with jitter)
TIMEOUT = 20.0        # connect, send and answer, per attempt
ERROR_CHARS = 160
MAX_PENDING_BYTES = 64 << 20  # records not yet encoded (estimated: RECORD_BYTES + long strings)
# A record's memory besides its long strings' characters (sys.getsizeof,
# CPython 3.11): a log record's 12-slot tuple (136 bytes), time and bytes
# (52), the client's address text (~61) and the three long strings' headers
# (49 each) make ~396; the other strings are shared by many records. A
# sample record (pseudonym and period text instead) comes to ~350.
RECORD_BYTES = 400
_HOST, _PATH, _AGENT = (LOG_FIELDS.index(f) for f in ("host", "path", "user_agent"))


@dataclass(eq=False)
class Batch:
    id: str
    body: bytes        # gzip of NDJSON: what is sent, byte for byte, on every retry
    records: int
    first: int         # index (in take order) of its first record, for flush()
    attempts: int = field(default=0)


class _Connection(http.client.HTTPSConnection):
    """HTTPS to `host`, the certificate checked against `tls_name`: the URL
    may give the core's address while its certificate is checked by name.

    Its TCP socket is made here rather than by socket.create_connection, so
    that `raw` holds it before connect(): Shipper.stop() shuts it down to
    wake a connect that a core with a full accept queue never answers."""

    def __init__(self, host: str, port: int, tls_name: str, context: ssl.SSLContext,
                 timeout: float, halt: threading.Event) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.tls_name = tls_name
        self.used = False  # a kept-alive connection the core may have closed meanwhile
        self.halt = halt
        self.raw: socket.socket | None = None  # the TCP socket, from before its connect

    def connect(self) -> None:
        sock = self._tcp()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock  # stop() shuts it down during the handshake too
        self.sock = self._context.wrap_socket(sock,  # type: ignore[attr-defined]
                                              server_hostname=self.tls_name)

    def _tcp(self) -> socket.socket:
        """A connected socket to the first of host's addresses that answers."""
        error = OSError(f"{self.host}: no address")
        for family, kind, proto, _, address in socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM):
            sock = self.raw = socket.socket(family, kind, proto)
            try:
                if self.halt.is_set():  # after `raw` is set: stop() sees one or the other
                    raise OSError("the shipper is stopping")
                sock.settimeout(self.timeout)
                sock.connect(address)
            except OSError as e:
                sock.close()
                error = e
                continue
            return sock
        raise error

    def abort(self) -> None:
        """From another thread: wake whatever this connection waits for
        (connect, handshake, send, answer); it then fails with OSError.
        socket.socket's own shutdown, also for the TLS socket: SSLSocket's
        would drop its SSL object under the thread still using it."""
        for sock in (self.sock, self.raw):
            if sock is not None:
                with contextlib.suppress(OSError):  # closed or detached: nothing to wake
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text[:ERROR_CHARS]


class Shipper:
    """Records of one stream to one core; see the module docstring."""

    def __init__(self, *, dc: str, stream: str, url: str, tls: TlsFiles, core: str = "core",
                 tls_name: str | None = None, batch_records: int = 2000,
                 batch_seconds: float = 2.0, buffer_bytes: int = 64 << 20,
                 max_pending_records: int = 50_000,
                 max_pending_bytes: int = MAX_PENDING_BYTES, gzip_level: int = GZIP_LEVEL,
                 timeout: float = TIMEOUT, backoff: tuple[float, float] = BACKOFF,
                 boot: str = BOOT) -> None:
        if stream not in ENCODERS:
            raise ValueError(f"stream {stream!r}: must be one of {', '.join(STREAMS)}")
        if ":" in dc or not dc:
            raise ValueError(f"dc {dc!r}: must be a non-empty name without ':' (batch ids)")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"core {core}: url {url!r}: expected https://HOST[:PORT]")
        if batch_records < 1 or batch_seconds <= 0 or buffer_bytes < 1 \
                or max_pending_records < 1 or max_pending_bytes < 1 \
                or not 0 <= gzip_level <= 9:
            raise ValueError(f"core {core}: batch_records, batch_seconds, buffer_bytes, "
                             "max_pending_records and max_pending_bytes must be positive, "
                             "gzip_level 0-9")
        self.dc, self.stream, self.core = dc, stream, core
        self.tls = tls
        self._host, self._port = parts.hostname, parts.port or 443
        self._tls_name = tls_name or parts.hostname
        self._path = PATHS[stream]
        self._encode = ENCODERS[stream]
        self._prefix = f"{dc}:{stream}:{boot}:"
        self._batch_records, self._batch_seconds = batch_records, batch_seconds
        self._buffer_bytes, self._max_pending = buffer_bytes, max_pending_records
        self._gzip_level, self._timeout, self._backoff = gzip_level, timeout, backoff
        self._tick = min(TICK, batch_seconds / 4)
        self._context = client_context(tls)
        self._context_gen = 0

        # Written by submit() only (the event loop): no lock needed to be exact.
        self._records: deque[tuple] = deque()
        self._overflow = 0
        self._in_bytes = 0         # estimated bytes of every record queued (record_bytes)
        self._max_bytes = max_pending_bytes
        self._long = stream == LOGS  # only a log record has long strings
        self._wake = threading.Event()

        # Everything below is guarded by _cv.
        self._cv = threading.Condition()
        self._taken = 0            # records moved from _records to the encoder
        self._encoding = 0         # records the encoder holds right now
        self._encoding_first: int | None = None
        self._flush_to = 0         # the encoder cuts partial batches until _taken reaches it
        self._batches: deque[Batch] = deque()
        self._batched = 0          # records in _batches
        self._bytes = 0            # body bytes in _batches
        self._inflight: Batch | None = None  # never dropped: an answer may be on its way
        self._sent = self._batches_sent = self._dropped = self._rejected = self._retries = 0
        self._last_error = ""
        self._out_bytes = 0        # estimated bytes of records taken off _records
        self._live: set[str] = set()  # roles of the threads still running

        self._halt = threading.Event()
        self._conn: _Connection | None = None
        self._conn_gen = 0
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ event loop

    def submit(self, record: tuple) -> None:
        """Queue one record (a tuple in records.FIELDS[stream] order); O(1).
        Call it from one thread (the event loop): the drop count has one writer.
        Its size is record_bytes(record), written out here to spare a call."""
        if self._long:
            try:
                size = RECORD_BYTES + len(record[_HOST]) + len(record[_PATH]) \
                    + len(record[_AGENT])
            except (IndexError, TypeError):
                size = RECORD_BYTES  # malformed: the encoder refuses it, alone
        else:
            size = RECORD_BYTES
        records = self._records
        if len(records) < self._max_pending \
                and self._in_bytes - self._out_bytes + size <= self._max_bytes:
            self._in_bytes += size
            records.append(record)
            if len(records) == self._batch_records:
                self._wake.set()  # once per batch: the encoder need not wait for a tick
        else:
            self._overflow += 1

    def record_bytes(self, record: tuple) -> int:
        """submit()'s size estimate of a record (they must agree exactly: the
        queue's size is what submit added minus what was taken)."""
        if not self._long:
            return RECORD_BYTES
        try:
            return RECORD_BYTES + len(record[_HOST]) + len(record[_PATH]) \
                + len(record[_AGENT])
        except (IndexError, TypeError):
            return RECORD_BYTES

    # ------------------------------------------------------------------ control

    def start(self) -> Shipper:
        name = f"privedge-logs-{self.stream}-{self.core}"
        roles = ((self._encode_loop, ENCODER), (self._send_loop, SENDER))
        self._threads = [
            threading.Thread(target=self._guard(loop, role), name=f"{name}-{role}",
                             daemon=True)
            for loop, role in roles]
        with self._cv:
            self._live.update(role for _, role in roles)
        for t in self._threads:
            t.start()
        return self

    def _guard(self, loop: Callable[[], None], role: str) -> Callable[[], None]:
        """Run a thread's loop; a bug in it is logged, counted and survived
        (the records the encoder held are dropped, so the counts stay exact).
        A thread ending after stop() counts what it leaves as dropped."""
        def run() -> None:
            try:
                while not self._halt.is_set():
                    try:
                        loop()
                    except Exception as e:
                        log.exception("log shipper %s/%s: %s", self.stream, self.core, role)
                        with self._cv:
                            self._last_error = f"internal error: {_short(e)}"[:ERROR_CHARS]
                            if role == ENCODER:
                                self._dropped += self._encoding
                                self._encoding, self._encoding_first = 0, None
                            else:
                                self._inflight = None
                            self._cv.notify_all()
                        self._halt.wait(1.0)
                    else:
                        return
            finally:
                with self._cv:
                    self._live.discard(role)
                    if self._halt.is_set():
                        self._settle()
                    self._cv.notify_all()
        return run

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        return tuple(self._threads)

    def reload(self, tls: TlsFiles | None = None) -> None:
        """Load the (reissued) certificate, key and CA; the next connection
        uses them, and the kept-alive one is replaced after its current batch.
        Raises, keeping the current context, if they do not load."""
        context = client_context(tls or self.tls)
        with self._cv:
            self.tls = tls or self.tls
            self._context = context
            self._context_gen += 1

    def flush(self, timeout: float) -> bool:
        """Wait until every record submitted before this call is acked or
        accounted for (dropped, rejected); False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._cv:
            target = self._taken + len(self._records)
            self._flush_to = max(self._flush_to, target)
        self._wake.set()
        with self._cv:
            while not self._flushed(target):
                left = deadline - time.monotonic()
                if left <= 0 or not self._running():
                    return self._flushed(target)
                self._cv.wait(min(left, 0.5))
        return True

    def _flushed(self, target: int) -> bool:
        # _batches is ordered by `first`, and only ever loses members.
        return (self._taken >= target
                and (self._encoding_first is None or self._encoding_first >= target)
                and (not self._batches or self._batches[0].first >= target))

    def _running(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads) \
            and not self._halt.is_set()

    def stop(self, timeout: float = 5.0, flush_first: bool = True) -> None:
        """Flush for at most `timeout` (not if `flush_first` is False: the
        caller flushed already), end the threads, count what is left as
        dropped (see the module docstring for a thread that outlives
        `timeout`); later submissions are counted as dropped too."""
        deadline = time.monotonic() + timeout
        if flush_first and self._running():
            self.flush(timeout)
        self._max_pending = 0  # submit() now only counts
        self._halt.set()
        self._wake.set()
        with self._cv:
            self._cv.notify_all()
        conn = self._conn
        if conn is not None:
            conn.abort()  # wake a sender blocked on the core: its attempt fails at once
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        with self._cv:
            self._settle()
            self._cv.notify_all()
            sender_done = SENDER not in self._live
        if sender_done:
            self._close()  # else the sender closes it: never close a socket in use

    def _settle(self) -> None:
        """Under _cv, once halted: count as dropped what no running thread
        will still decide: the record queue, every batch but the one a live
        sender has in flight (its answer decides), and the records a finished
        encoder held. Idempotent: stop() and each thread's end call it."""
        left = len(self._records)
        take = self._records.popleft
        size = 0
        for _ in range(left):  # not clear(): a late submit() stays counted, as pending
            size += self.record_bytes(take())
        self._out_bytes += size
        self._taken += left
        self._dropped += left
        keep = self._inflight if SENDER in self._live else None
        for batch in self._batches:
            if batch is not keep:
                self._dropped += batch.records
        self._batches = deque([keep] if keep is not None else [])
        self._batched = keep.records if keep is not None else 0
        self._bytes = len(keep.body) if keep is not None else 0
        if ENCODER not in self._live:
            self._dropped += self._encoding
            self._encoding, self._encoding_first = 0, None

    def stats(self) -> dict[str, int | str]:
        """Exact counts (a consistent snapshot); last_error is the most recent
        failure since the last acked batch, '' when healthy."""
        with self._cv:
            queued, overflow = len(self._records), self._overflow
            return {
                "submitted": self._taken + queued + overflow,
                "sent": self._sent,
                "batches_sent": self._batches_sent,
                "dropped": self._dropped + overflow,
                "rejected": self._rejected,
                "pending_records": queued + self._encoding + self._batched,
                "pending_bytes": self._bytes,
                "retries": self._retries,
                "last_error": self._last_error,
            }

    # ------------------------------------------------------------------ encoder thread

    def _encode_loop(self) -> None:
        first_seen: float | None = None  # when the encoder first saw records waiting
        while not self._halt.is_set():
            waiting = len(self._records)
            now = time.monotonic()
            if waiting == 0:
                first_seen = None
            else:
                if first_seen is None:
                    first_seen = now
                if (waiting >= self._batch_records or self._taken < self._flush_to
                        or now - first_seen >= self._batch_seconds):
                    self._cut(min(waiting, self._batch_records))
                    first_seen = now if self._records else None
                    continue
            wait = self._tick if first_seen is None else \
                min(self._tick, first_seen + self._batch_seconds - now)
            self._wake.wait(max(wait, 0.0))
            self._wake.clear()

    def _cut(self, n: int) -> None:
        """Take up to n records, encode and queue them as one batch (or more,
        if they exceed MAX_BATCH_BYTES)."""
        with self._cv:
            n = min(n, len(self._records))  # stop() may have emptied it since
            if n == 0:
                return
            take = self._records.popleft
            records = [take() for _ in range(n)]
            self._out_bytes += sum(map(self.record_bytes, records))
            first = self._taken
            self._taken += n
            self._encoding, self._encoding_first = n, first
        batches: list[Batch] = []
        lines: list[str] = []
        size = bad = 0
        start = first
        error = ""
        encode = self._encode
        for i, record in enumerate(records):
            try:
                line = encode(record)
            except ValueError as e:  # records.RecordError: names the field, not the value
                bad += 1
                error = f"record refused before sending: {e}"[:ERROR_CHARS]
                continue
            lines.append(line)
            size += len(line) + 1
            if size >= MAX_BATCH_BYTES:
                batches.append(self._batch(lines, start))
                lines, size, start = [], 0, first + i + 1
        if lines:
            batches.append(self._batch(lines, start))
        with self._cv:
            self._rejected += bad
            if error:
                self._last_error = error
            for batch in batches:
                self._queue(batch)
            self._encoding, self._encoding_first = 0, None
            self._cv.notify_all()

    def _batch(self, lines: list[str], first: int) -> Batch:
        lines.append("")  # every line ends with a newline
        data = "\n".join(lines).encode()  # ASCII: the encoder escapes the rest
        body = zlib.compress(data, self._gzip_level, wbits=31)  # 31: a gzip member
        return Batch(self._prefix + str(next(_SEQ[self.stream])), body, len(lines) - 1, first)

    def _queue(self, batch: Batch) -> None:
        """Append under _cv; drop the oldest batches not in flight while over
        buffer_bytes (the new one too, if it alone is too big)."""
        self._batches.append(batch)
        self._batched += batch.records
        self._bytes += len(batch.body)
        while self._bytes > self._buffer_bytes:
            i = 1 if self._batches[0] is self._inflight else 0
            if i >= len(self._batches):
                break  # only the batch in flight is left: its answer decides
            victim = self._batches[i]
            del self._batches[i]
            self._batched -= victim.records
            self._bytes -= len(victim.body)
            self._dropped += victim.records

    # ------------------------------------------------------------------ sender thread

    def _send_loop(self) -> None:
        failures = 0
        while not self._halt.is_set():
            with self._cv:
                while not self._batches and not self._halt.is_set():
                    self._cv.wait(1.0)
                if self._halt.is_set():
                    break
                batch = self._inflight = self._batches[0]
                gen = self._context_gen
            status, error = self._attempt(batch, gen)
            halted = self._halt.is_set()
            with self._cv:
                self._inflight = None
                batch.attempts += 1
                done = status in (200, 400, 413)
                if done or halted:
                    # It was [0] and in flight: nothing removed it (_queue and
                    # _settle spare the batch in flight of a live sender).
                    self._batches.popleft()
                    self._batched -= batch.records
                    self._bytes -= len(batch.body)
                if status == 200:
                    self._sent += batch.records
                    self._batches_sent += 1
                    self._last_error = ""
                elif done:
                    self._rejected += batch.records
                    self._last_error = f"HTTP {status}: core rejected batch {batch.id}"
                elif halted:  # stopped: not retried, so dropped (and no retry warning)
                    self._dropped += batch.records
                    self._last_error = error
                else:
                    self._retries += 1
                    self._last_error = error
                self._cv.notify_all()
            if status in (400, 413):
                log.warning("core %s rejected batch %s (%d records): HTTP %d", self.core,
                            batch.id, batch.records, status)
            if status in (200, 400, 413):
                if failures:
                    log.warning("core %s: reachable again after %d failed attempts", self.core,
                                failures)
                failures = 0
                continue
            if halted or self._halt.is_set():
                break  # stopped: the batch is dropped (above, or by _settle), not retried
            if failures == 0:
                log.warning("core %s: %s; retrying batch %s", self.core, error, batch.id)
            failures += 1
            self._halt.wait(self._delay(failures))
        self._close()

    def _delay(self, failures: int) -> float:
        """Exponential backoff with jitter: half fixed, half random, capped."""
        first, cap = self._backoff
        ceiling = min(cap, first * 2 ** min(failures - 1, 30))
        return ceiling / 2 + random.random() * ceiling / 2  # jitter only, not a secret

    def _attempt(self, batch: Batch, gen: int) -> tuple[int, str]:
        """(HTTP status, '') or (0, why) for a connection failure. A kept-alive
        connection that fails is retried once at once on a new one: the core
        may have closed it while idle, and a batch id makes a repeat safe."""
        for _ in range(2):
            conn = self._connection(gen)
            reused = conn.used
            try:
                conn.request("POST", self._path, body=batch.body, headers={
                    "Content-Type": "application/x-ndjson",
                    "Content-Encoding": "gzip",
                    "Content-Length": str(len(batch.body)),
                    "X-Privedge-Batch": batch.id,
                })
                answer = conn.getresponse()
                answer.read()  # the whole answer, so the connection can carry the next
                conn.used = True
                if answer.status >= 500 or answer.status == 403:
                    return answer.status, f"HTTP {answer.status} from core {self.core}"
                if answer.status not in (200, 400, 413):  # not in the protocol: retry
                    return answer.status, f"HTTP {answer.status} (unexpected) from core " \
                        f"{self.core}"
                return answer.status, ""
            except (OSError, http.client.HTTPException) as e:
                self._close()
                if not reused or self._halt.is_set():
                    return 0, _short(e)
        return 0, "unreachable"  # the loop returns; keeps type checkers content

    def _connection(self, gen: int) -> _Connection:
        if self._conn is not None and gen != self._conn_gen:
            self._close()  # reloaded certificates: a new handshake with them
        if self._conn is None:
            self._conn = _Connection(self._host, self._port, self._tls_name, self._context,
                                     self._timeout, self._halt)
            self._conn_gen = gen
        return self._conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __repr__(self) -> str:
        return f"Shipper(stream={self.stream!r}, core={self.core!r})"
