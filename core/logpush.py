"""Logpush: a zone's stored records, pushed on to the customer's HTTPS endpoint.

    pushers = Logpush(store, config).start()   # one thread per job
    pushers.stats()                            # for /v1/stats
    pushers.stop()

Used by core/server.py. Each job of core/config.py's zones[*].logpush reads
the zone's chunks in the store's commit (seq) order, keeps only the job's
fields, samples at its rate, and POSTs gzip NDJSON batches of at most
max_records, at least every max_seconds while records wait. Delivery is at
least once: a batch is retried with bounded exponential backoff until the
endpoint answers 2xx, and only then does the job's cursor move on. The
cursor (data_dir/logpush/<zone>/<job>.cursor: the store's seq, a day and a
record offset; no personal data) is written atomically, so a restart
neither loses records nor pushes a delivered batch again, except the one in
flight when the core stopped. A new job starts with what is stored after it
first runs: it does not push the zone's past days.

What a job holds is bounded whatever the outage: store.subscribe tells it
only the highest seq committed with records of its zone (it never blocks
the commit), and the job lists the store's chunks after its cursor a page
(PAGE chunks) at a time, when it needs more. A chunk swept by retention
before its turn is skipped (skipped_chunks); records of a batch being
retried whose day is swept meanwhile are dropped from it (skipped_records).

stop() tells every job at once, cuts their connections (a request in flight
ends now, its batch not acknowledged), and waits for all of them together
at most STOP_JOIN seconds. No cursor is written once the store is closed.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import http.client
import json
import random
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from control.pki import write_file
from control.tlshttp import failure_summary
from core.config import CoreConfig, LogpushJob
from core.crypto import Partition, make_dirs
from core.store import ChunkRef, Store, StoreUnavailable

USER_AGENT = "privedge-logpush/1"
STOP_JOIN = 5.0     # seconds stop() waits for all the jobs' threads, together
PAGE = 256          # chunks listed from the store at a time (at least 16: see Store.chunks)


@dataclass(frozen=True, order=True)
class Position:
    """The next record to push: record `offset` of chunk (seq, day); every
    chunk before (seq, day) is done."""

    seq: int
    day: str
    offset: int

    def to_json(self) -> bytes:
        return json.dumps({"seq": self.seq, "day": self.day, "offset": self.offset}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Position:
        d = json.loads(data)
        return cls(int(d["seq"]), str(d["day"]), int(d["offset"]))


def client_context(job: LogpushJob) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(job.ca_file) if job.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _HTTPS(http.client.HTTPSConnection):
    """Its TLS socket is `sock` from before the handshake (http.client's
    assigns it after), so that stop() can cut a handshake that hangs."""

    def __init__(self, host: str, port: int, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.tls = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)   # TCP
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host,
                                         do_handshake_on_connect=False)
        self.sock.do_handshake()


class Pusher:
    """One job of one zone, on its own thread."""

    def __init__(self, store: Store, zone: str, job: LogpushJob, state_dir: Path) -> None:
        self.store, self.zone, self.job = store, zone, job
        self.cursor_path = state_dir / zone / f"{job.name}.cursor"
        self._ctx = client_context(job)   # a bad ca_file fails here, at start
        url = urlsplit(job.url)
        self._host, self._port = url.hostname or "", url.port or 443
        self._target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._conn: _HTTPS | None = None
        self._rng = random.Random()
        self._cond = threading.Condition()
        self._offered = 0      # the highest seq committed with records of this zone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = {"records": 0, "batches": 0, "failures": 0, "skipped_chunks": 0,
                         "skipped_records": 0}
        self.last_error = ""
        self._listed = 0       # chunks listed and not yet read (for stats)
        self._buffered = 0     # records read and not yet acknowledged
        self._caught_up = False
        self.cursor = self._load_cursor()

    def _load_cursor(self) -> Position:
        try:
            return Position.from_json(self.cursor_path.read_bytes())
        except FileNotFoundError:
            # A new job pushes what is stored from now on; written at once so
            # that a restart before its first push does not move "now".
            pos = Position(self.store.high_seq + 1, "", 0)
            self._save_cursor(pos)
            return pos
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.cursor_path}: not a logpush cursor ({e}); remove it to "
                             "start the job from now") from None

    def _save_cursor(self, pos: Position) -> None:
        try:
            with self.store.writing():   # never once the store is closed
                make_dirs(self.cursor_path.parent)
                write_file(self.cursor_path, pos.to_json(), 0o600)
        except StoreUnavailable:
            return   # stopping: the cursor on disk stays before what is not saved
        self.cursor = pos

    # ------------------------------------------------------------------- feeding

    def offer(self, seq: int) -> None:
        """A commit with records of this zone (called under the store's lock:
        takes only this job's own lock, briefly)."""
        with self._cond:
            if seq > self._offered:
                self._offered = seq
            self._cond.notify()

    def _page(self, listed: int, pos: Position) -> tuple[collections.deque[ChunkRef], int]:
        """The next chunks after seq `listed` (and at or after the position),
        and the seq the listing is complete up to."""
        high = self.store.high_seq   # read first: every commit up to it is on disk
        refs, upto = self.store.chunks(self.zone, listed, high, PAGE)
        start = (pos.seq, pos.day)
        return collections.deque(r for r in refs if (r.seq, r.day) >= start), upto

    # ------------------------------------------------------------------- running

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"logpush-{self.zone}-{self.job.name}")
        self._thread.start()

    def signal_stop(self) -> None:
        """Tell the job to stop, and cut a request in flight (its batch stays
        unacknowledged: the cursor does not move past it)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            # The plain socket's shutdown, not SSLSocket's: that one would also
            # drop its TLS state under the thread using it. OSError: closed meanwhile.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def join(self, deadline: float) -> None:
        """Wait for the thread until `deadline` (time.monotonic()), then close."""
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if not self._thread.is_alive():
                self._thread = None
                if self._conn is not None:
                    self._conn.close()

    def stop(self) -> None:
        self.signal_stop()
        self.join(time.monotonic() + STOP_JOIN)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a thread's death must be visible, not silent
            # By type and place only: a message could quote a record.
            self.last_error = f"stopped: {failure_summary(e)}"
            print(f"privedge-core: logpush {self.zone}/{self.job.name}: {self.last_error}",
                  file=sys.stderr)

    def _loop(self) -> None:
        job = self.job
        fields = job.fields
        dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
        buf: list[tuple[str, bytes]] = []   # (the chunk's day, the line to push)
        since = 0.0
        pos = self.cursor
        page: collections.deque[ChunkRef] = collections.deque()
        listed = pos.seq - 1   # every commit up to this seq has been listed
        first = True           # what was stored before the job started: list once
        current: tuple[ChunkRef, list[bytes], int] | None = None
        while not self._stop.is_set():
            # Fill the buffer from the listed chunks, listing more as needed.
            while len(buf) < job.max_records:
                if current is None:
                    if not page:
                        with self._cond:
                            offered = self._offered
                        if not first and offered <= listed:
                            break
                        first = False
                        page, listed = self._page(listed, pos)
                        if not page:
                            continue   # more may have been offered meanwhile
                    ref = page.popleft()
                    data = self.store.read_chunk(ref)
                    if data is None:   # swept before its turn
                        self.counters["skipped_chunks"] += 1
                        pos = Position(ref.seq, ref.day, ref.records)
                        continue
                    first_rec = pos.offset if (ref.seq, ref.day) == (pos.seq, pos.day) else 0
                    current = (ref, data.split(b"\n")[:-1], first_rec)
                ref, lines, idx = current
                while idx < len(lines) and len(buf) < job.max_records:
                    if job.sample_rate >= 1 or self._rng.random() < job.sample_rate:
                        rec = json.loads(lines[idx])
                        buf.append((ref.day, dumps({k: rec[k] for k in fields}).encode()
                                    + b"\n"))
                        if len(buf) == 1:
                            since = time.monotonic()
                    idx += 1
                pos = Position(ref.seq, ref.day, idx)
                current = None if idx >= len(lines) else (ref, lines, idx)
            self._listed, self._buffered = len(page) + (current is not None), len(buf)
            waited = time.monotonic() - since
            if buf and (len(buf) >= job.max_records or waited >= job.max_seconds):
                if not self._deliver(buf):
                    return  # stopping; the cursor stays before this batch
                if buf:   # else every record of it was swept while it was retried
                    self.counters["records"] += len(buf)
                    self.counters["batches"] += 1
                buf = []
                self._buffered = 0
                self._save_cursor(pos)
                continue
            if not buf and pos != self.cursor:
                self._save_cursor(pos)   # records sampled out, or chunks skipped
            with self._cond:
                more = self._offered > listed or bool(page) or current is not None
                self._caught_up = not more and not buf
                if not more and not self._stop.is_set():
                    self._cond.wait(job.max_seconds - waited if buf else 1.0)

    def _deliver(self, buf: list[tuple[str, bytes]]) -> bool:
        """POST until a 2xx (True) or stop (False), backing off between tries.
        Records of a day swept meanwhile are dropped from `buf` (counted);
        if none is left, True: there is nothing to deliver."""
        body = b""
        delay = self.job.retry_initial
        while not self._stop.is_set():
            if not body:
                body = gzip.compress(b"".join(line for _, line in buf), 6)
            try:
                status = self._post(body)
                if 200 <= status < 300:
                    self.last_error = ""
                    return True
                self.last_error = f"HTTP {status}"
            except (OSError, http.client.HTTPException) as e:
                self.last_error = f"{type(e).__name__}: {e}"
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            self.counters["failures"] += 1
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.job.retry_max)
            gone = {day for day in {d for d, _ in buf}
                    if self.store.partition_gone(Partition("logs", self.zone, day))}
            if gone:
                kept = [x for x in buf if x[0] not in gone]
                self.counters["skipped_records"] += len(buf) - len(kept)
                buf[:] = kept
                self._buffered = len(buf)
                body = b""
                if not buf:
                    return True
        return False

    def _post(self, body: bytes) -> int:
        if self._conn is None:
            self._conn = _HTTPS(self._host, self._port, self.job.timeout, self._ctx)
        headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip",
                   "User-Agent": USER_AGENT, **self.job.headers}
        self._conn.request("POST", self._target, body=body, headers=headers)
        resp = self._conn.getresponse()
        resp.read()
        if resp.will_close:
            self._conn.close()
            self._conn = None
        return resp.status

    def stats(self) -> dict:
        with self._cond:
            offered = self._offered
        return {**self.counters, "cursor_seq": self.cursor.seq, "offered_seq": offered,
                "listed_chunks": self._listed, "buffered_records": self._buffered,
                "caught_up": self._caught_up, "last_error": self.last_error}


class Logpush:
    """Every job of every zone; subscribes to the store's commits."""

    def __init__(self, store: Store, config: CoreConfig) -> None:
        state = config.data_dir / "logpush"
        self.pushers: dict[str, list[Pusher]] = {
            zone: [Pusher(store, zone, job, state) for job in z.logpush]
            for zone, z in config.zones.items() if z.logpush}
        if self.pushers:
            store.subscribe(self._offer)   # before the jobs look at the disk

    def _offer(self, refs: list[ChunkRef]) -> None:
        for zone in {ref.zone for ref in refs}:
            for p in self.pushers.get(zone or "", ()):
                p.offer(refs[0].seq)   # a commit's chunks share its seq

    def start(self) -> Logpush:
        for ps in self.pushers.values():
            for p in ps:
                p.start()
        return self

    def stop(self) -> None:
        """Every job told first (and its request cut), then all waited for
        against one deadline: stopping takes at most STOP_JOIN seconds in all."""
        jobs = [p for ps in self.pushers.values() for p in ps]
        for p in jobs:
            p.signal_stop()
        deadline = time.monotonic() + STOP_JOIN
        for p in jobs:
            p.join(deadline)

    def stats(self) -> dict:
        return {zone: {p.job.name: p.stats() for p in ps} for zone, ps in self.pushers.items()}

    def __len__(self) -> int:
        return sum(len(ps) for ps in self.pushers.values())
