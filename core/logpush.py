"""Logpush: a zone's stored records, pushed on to the customer's HTTPS endpoint.

    pushers = Logpush(store, config).start()   # one thread per job
    pushers.stats()                            # for /v1/stats
    pushers.stop()

Used by core/server.py. Each job of core/config.py's zones[*].logpush reads
the zone's chunks in the store's arrival order (store.subscribe tells it of
new ones; it never blocks the commit), keeps only the job's fields, samples
at its rate, and POSTs gzip NDJSON batches of at most max_records, at least
every max_seconds while records wait. Delivery is at least once: a batch is
retried with bounded exponential backoff until the endpoint answers 2xx,
and only then does the job's cursor move on. The cursor
(data_dir/logpush/<zone>/<job>.cursor: the store's seq, a day and a record
offset; no personal data) is written atomically, so a restart neither
loses records nor pushes a delivered batch again, except the one in flight
when the core stopped. A new job starts with what is stored after it first
runs: it does not push the zone's past days. Records swept by retention
before they could be pushed are counted as skipped.
"""

from __future__ import annotations

import collections
import gzip
import http.client
import json
import random
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core.config import CoreConfig, LogpushJob
from core.crypto import write_atomic
from core.store import ChunkRef, Store

USER_AGENT = "privedge-logpush/1"
STOP_JOIN = 15.0    # seconds stop() waits for a job's thread (a request in flight)


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


class Pusher:
    """One job of one zone, on its own thread."""

    def __init__(self, store: Store, zone: str, job: LogpushJob, state_dir: Path) -> None:
        self.store, self.zone, self.job = store, zone, job
        self.cursor_path = state_dir / zone / f"{job.name}.cursor"
        self._ctx = client_context(job)   # a bad ca_file fails here, at start
        url = urlsplit(job.url)
        self._host, self._port = url.hostname or "", url.port or 443
        self._target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._conn: http.client.HTTPSConnection | None = None
        self._rng = random.Random()
        self._cond = threading.Condition()
        self._queue: collections.deque[ChunkRef] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cursor = self._load_cursor()
        self.counters = {"records": 0, "batches": 0, "failures": 0, "skipped_chunks": 0}
        self.last_error = ""

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
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.cursor_path, pos.to_json())
        self.cursor = pos

    # ------------------------------------------------------------------- feeding

    def offer(self, ref: ChunkRef) -> None:
        """A chunk of this zone was committed (called under the store's lock)."""
        with self._cond:
            self._queue.append(ref)
            self._cond.notify()

    def _prime(self) -> None:
        """Queue what is on disk past the cursor, merged with what was offered
        since the job subscribed (a chunk may be in both)."""
        start = (self.cursor.seq, self.cursor.day)
        on_disk = self.store.chunks(self.zone, self.cursor.seq - 1)
        with self._cond:
            merged = sorted({r for r in [*on_disk, *self._queue] if (r.seq, r.day) >= start},
                            key=lambda r: (r.seq, r.day))
            self._queue = collections.deque(merged)

    # ------------------------------------------------------------------- running

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"logpush-{self.zone}-{self.job.name}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_JOIN)
            self._thread = None
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        try:
            self._prime()
            self._loop()
        except Exception as e:  # a thread's death must be visible, not silent
            self.last_error = f"stopped: {e!r}"
            print(f"privedge-core: logpush {self.zone}/{self.job.name}: {e!r}", file=sys.stderr)

    def _loop(self) -> None:
        job = self.job
        fields = job.fields
        dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
        buf: list[bytes] = []
        since = 0.0
        pos = self.cursor
        current: tuple[ChunkRef, list[bytes], int] | None = None
        while not self._stop.is_set():
            # Fill the buffer from the queue, up to max_records.
            while len(buf) < job.max_records:
                if current is None:
                    with self._cond:
                        ref = self._queue.popleft() if self._queue else None
                    if ref is None:
                        break
                    data = self.store.read_chunk(ref)
                    if data is None:   # swept before its turn
                        self.counters["skipped_chunks"] += 1
                        pos = Position(ref.seq, ref.day, ref.records)
                        continue
                    first = pos.offset if (ref.seq, ref.day) == (pos.seq, pos.day) else 0
                    current = (ref, data.split(b"\n")[:-1], first)
                ref, lines, idx = current
                while idx < len(lines) and len(buf) < job.max_records:
                    if job.sample_rate >= 1 or self._rng.random() < job.sample_rate:
                        rec = json.loads(lines[idx])
                        buf.append(dumps({k: rec[k] for k in fields}).encode() + b"\n")
                        if len(buf) == 1:
                            since = time.monotonic()
                    idx += 1
                pos = Position(ref.seq, ref.day, idx)
                current = None if idx >= len(lines) else (ref, lines, idx)
            waited = time.monotonic() - since
            if buf and (len(buf) >= job.max_records or waited >= job.max_seconds):
                if not self._deliver(buf):
                    return  # stopping; the cursor stays before this batch
                self.counters["records"] += len(buf)
                self.counters["batches"] += 1
                buf = []
                self._save_cursor(pos)
                continue
            if not buf and pos != self.cursor:
                self._save_cursor(pos)   # records sampled out, or chunks skipped
            with self._cond:
                if not self._queue and current is None and not self._stop.is_set():
                    self._cond.wait(job.max_seconds - waited if buf else 1.0)

    def _deliver(self, lines: list[bytes]) -> bool:
        """POST until a 2xx (True) or stop (False), backing off between tries."""
        body = gzip.compress(b"".join(lines), 6)
        delay = self.job.retry_initial
        while not self._stop.is_set():
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
        return False

    def _post(self, body: bytes) -> int:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(self._host, self._port,
                                                     timeout=self.job.timeout,
                                                     context=self._ctx)
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
            backlog = len(self._queue)
        return {**self.counters, "backlog_chunks": backlog, "cursor_seq": self.cursor.seq,
                "last_error": self.last_error}


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
        for ref in refs:
            for p in self.pushers.get(ref.zone or "", ()):
                p.offer(ref)

    def start(self) -> Logpush:
        for ps in self.pushers.values():
            for p in ps:
                p.start()
        return self

    def stop(self) -> None:
        for ps in self.pushers.values():
            for p in ps:
                p.stop()

    def stats(self) -> dict:
        return {zone: {p.job.name: p.stats() for p in ps} for zone, ps in self.pushers.items()}

    def __len__(self) -> int:
        return sum(len(ps) for ps in self.pushers.values())
