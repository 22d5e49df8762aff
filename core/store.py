"""The log store: validated batches, encrypted at rest, kept only as long as allowed.

    store = Store(config, load_master_key(config.master_key)).open()
    store.ingest(BatchId.parse(header), ndjson)   # IngestResult; RecordError → 400
    for chunk in store.read_day("logs", "www", "2024-05-01"): ...
    store.sweep()                                  # retention: data and day keys go
    store.close()

Used by core/server.py (HTTP), core/logpush.py (it reads what was stored,
in arrival order) and core/cli.py (sweep). Layout under data_dir:

    keys/logs/<zone>/<day>.key   data key of (logs, zone, day), wrapped by the master key
    keys/sample/<day>.key        data key of (sample, day)
    logs/<zone>/<day>/<seq>.<dc>.<boot>.<bseq>.<n>.pec   one sealed chunk of a batch
    sample/<day>/<seq>.<dc>.<boot>.<bseq>.<n>.pec
    journal/<day>.log            committed batches: "<seq> <batch id> <records>"
    journal/floor                the highest seq of journals already removed
    master.check                 proves the master key is the one the data was written with

`seq` numbers commits in arrival order (logpush cursors count in it); n is
the chunk's record count (for stats without decrypting). A chunk is zlib
compressed NDJSON sealed with AES-256-GCM under its day key, with stream,
zone, day and batch id as associated data: a chunk moved to another zone,
day or name does not decrypt. No name or journal line holds personal data.

Commit protocol: chunks are written and fsynced under temporary names
outside the lock, then, under it, renamed to their final names and the
batch's journal line is appended and fsynced: the journal line is the
commit. Commits are serial, so after a crash only chunks with a seq above
the journal's highest can be uncommitted; open() deletes them, and the
edge's retry stores the batch again. A batch id seen in the journals (the
last JOURNAL_DAYS days of arrivals) is answered as a duplicate.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.batch import BatchId
from core.config import MAX_RETENTION_DAYS, CoreConfig
from core.crypto import (
    DecryptError,
    KeyFileError,
    KeyRing,
    Partition,
    check_master,
    fsync_dir,
    open_sealed,
    seal,
    write_all,
    write_atomic,
)
from core.records import Parsed, Rules, day_number, day_of, dump_records, parse_batch

JOURNAL_DAYS = 3        # arrival days of batch ids kept for duplicate checks (today + 2)
CLOSE_WAIT = 5.0        # seconds close() waits for ingests in flight
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CHUNK_RE = re.compile(r"^(\d{12})\.([a-z0-9-]+)\.([0-9a-f]{16})\.(\d+)\.(\d+)\.pec$")


class StoreLocked(Exception):
    """Another process has the data directory open."""


class StoreUnavailable(Exception):
    """The store cannot write now (disk full, closing): 503, the edge retries."""


@dataclass(frozen=True, order=True)
class ChunkRef:
    """One stored chunk: a batch's records of one partition."""

    seq: int
    day: str
    zone: str | None
    stream: str
    batch: BatchId
    records: int

    @property
    def partition(self) -> Partition:
        return Partition(self.stream, self.zone, self.day)

    @property
    def name(self) -> str:
        b = self.batch
        return f"{self.seq:012d}.{b.dc}.{b.boot}.{b.seq}.{self.records}.pec"

    @classmethod
    def from_name(cls, p: Partition, name: str) -> ChunkRef | None:
        m = _CHUNK_RE.match(name)
        if not m:
            return None
        return cls(int(m[1]), p.day, p.zone, p.stream,
                   BatchId(m[2], p.stream, m[3], int(m[4])), int(m[5]))


@dataclass(frozen=True)
class IngestResult:
    stored: int            # records stored now (0 for a duplicate)
    duplicate: bool
    expired: int = 0       # records dropped: already past retention when they came


@dataclass
class SweepReport:
    removed: list[Partition] = field(default_factory=list)   # data and key gone
    keys_destroyed: int = 0
    journals_removed: int = 0


class _Seqs:
    """The seqs seen of one agent boot's stream, one bit each. A boot's seqs
    are dense from 1 (with gaps where its other core took a batch, which is
    why this is a bitmap and not a list of ranges). A seq past MAX_BITS (a
    broken agent) goes to a set instead, so it cannot claim the memory."""

    MAX_BITS = 1 << 27   # a 16 MiB bitmap: 134 million batches of one boot

    def __init__(self) -> None:
        self._bits = bytearray()
        self._far: set[int] = set()

    def __contains__(self, n: int) -> bool:
        if n >= self.MAX_BITS:
            return n in self._far
        i = n >> 3
        return i < len(self._bits) and bool(self._bits[i] & (1 << (n & 7)))

    def add(self, n: int) -> None:
        if n >= self.MAX_BITS:
            self._far.add(n)
            return
        i = n >> 3
        if i >= len(self._bits):   # grow by doubling: amortised O(1) per batch
            size = min(max(i + 1, 2 * len(self._bits), 64), self.MAX_BITS >> 3)
            self._bits.extend(bytes(size - len(self._bits)))
        self._bits[i] |= 1 << (n & 7)


def _counter() -> dict[str, int]:
    return {"records": 0, "batches": 0}


class Store:
    """Thread-safe: ingests from many request threads, reads, sweeps."""

    def __init__(self, config: CoreConfig, master: bytes,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.root = config.data_dir
        self.clock = clock
        self._master = master
        self.keys = KeyRing(master, self.root / "keys")
        self._lock = threading.Lock()          # commits, sweeps, counters
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._closed = True
        self._lock_fd: int | None = None
        self._seen: dict[tuple[str, str, str], _Seqs] = {}
        self._next_seq = 1
        self._journal: tuple[str, int] | None = None   # (day, fd) being appended to
        self._subscribers: list[Callable[[list[ChunkRef]], None]] = []
        self._since = clock()
        self._stored: dict[str, dict[str, dict[str, int]]] = {"logs": {}, "sample": {}}
        self._duplicates = {"logs": 0, "sample": 0}
        self._rejected: dict[str, dict[str, int]] = {"logs": {}, "sample": {}}
        self._expired_count = {"logs": 0, "sample": 0}
        self._unreadable = 0

    # ----------------------------------------------------------------------- lifecycle

    def open(self) -> Store:
        """Create the layout, check the master key, recover from a crash."""
        for sub in ("keys", "logs", "sample", "journal"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self._take_lock()
        try:
            check_master(self._master, self.root / "master.check")
            shutil.rmtree(self.root / "trash", ignore_errors=True)
            committed = self._load_journals()
            self._next_seq = committed + 1
            self._drop_uncommitted(committed)
        except BaseException:
            self.close()
            raise
        self._closed = False
        return self

    def close(self) -> None:
        """Refuse new ingests, wait (bounded) for those in flight, forget keys."""
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: self._inflight == 0, timeout=CLOSE_WAIT)
            if self._journal is not None:
                os.close(self._journal[1])
                self._journal = None
        self.keys.forget()
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = None

    def _take_lock(self) -> None:
        # One process per data directory: recovery and sweeps assume nobody
        # else is half way through a commit.
        path = self.root / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(f"{path}: another privedge-core has {self.root} open (a running "
                              "server sweeps it itself every sweep_interval)") from None
        self._lock_fd = fd

    def subscribe(self, fn: Callable[[list[ChunkRef]], None]) -> None:
        """fn(chunks) after each commit, under the store's lock: it must not block."""
        with self._lock:
            self._subscribers.append(fn)

    @property
    def high_seq(self) -> int:
        """The seq of the last commit (0 before the first)."""
        with self._lock:
            return self._next_seq - 1

    # ----------------------------------------------------------------------- retention

    def retention_days(self, zone: str | None) -> int:
        if zone is None:
            return self.config.sample_retention_days
        z = self.config.zones.get(zone)
        # A zone gone from the config keeps the longest retention any zone may have.
        return z.retention_days if z is not None else MAX_RETENTION_DAYS

    def _expired(self, p: Partition, today: int) -> bool:
        return day_number(p.day) <= today - self.retention_days(p.zone)

    # ----------------------------------------------------------------------- ingest

    def _rules(self, dc: str, now: float) -> Rules:
        zones = self.config.zones
        return Rules(dc=dc, now=now, zones=zones,
                     log_region=lambda z: zones[z].log_region, region=self.config.region,
                     retention_days=self.retention_days)

    def _is_duplicate(self, batch: BatchId) -> bool:
        seqs = self._seen.get((batch.dc, batch.stream, batch.boot))
        return seqs is not None and batch.seq in seqs

    def ingest(self, batch: BatchId, body: bytes) -> IngestResult:
        """Validate, split by partition, seal and commit a batch (gunzipped
        NDJSON). RecordError: nothing stored. StoreUnavailable: retry later."""
        stream = batch.stream
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closing")
            if self._is_duplicate(batch):
                self._duplicates[stream] += 1
                return IngestResult(0, True)
            self._inflight += 1
        try:
            parsed = parse_batch(stream, body, self._rules(batch.dc, self.clock()))
            return self._commit(batch, parsed, self._prepare(batch, parsed))
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _prepare(self, batch: BatchId, parsed: Parsed) -> list[tuple[Partition, Path, int]]:
        """Seal each partition's records into a temporary file (fsynced)."""
        prepared: list[tuple[Partition, Path, int]] = []
        try:
            for (zone, day), records in sorted(parsed.groups.items(),
                                               key=lambda kv: (kv[0][0] or "", kv[0][1])):
                p = Partition(batch.stream, zone, day)
                aead = self.keys.get(p, create=True)
                assert aead is not None
                blob = seal(aead, zlib.compress(dump_records(records), 1),
                            p.aad("data", str(batch)))
                directory = self.root.joinpath(*p.parts)
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = directory / f".tmp.{secrets.token_hex(8)}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                prepared.append((p, tmp, len(records)))
                try:
                    write_all(fd, blob)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except (OSError, KeyFileError) as e:
            for _, tmp, _ in prepared:
                tmp.unlink(missing_ok=True)
            why = f"cannot write {e.filename or ''}: {e.strerror}" if isinstance(e, OSError) \
                else str(e)
            raise StoreUnavailable(why) from None
        return prepared

    def _commit(self, batch: BatchId, parsed: Parsed,
                prepared: list[tuple[Partition, Path, int]]) -> IngestResult:
        stream = batch.stream
        with self._lock:
            if self._is_duplicate(batch):   # a concurrent retry committed first
                for _, tmp, _ in prepared:
                    tmp.unlink(missing_ok=True)
                self._duplicates[stream] += 1
                return IngestResult(0, True)
            now = self.clock()
            today = int(now // 86400)
            seq = self._next_seq
            self._next_seq += 1   # burnt even if this commit fails: seqs never repeat
            refs: list[ChunkRef] = []
            expired = parsed.expired
            try:
                for p, tmp, n in prepared:
                    if self._expired(p, today):  # the day ended while we sealed
                        tmp.unlink(missing_ok=True)
                        expired += n
                        continue
                    ref = ChunkRef(seq, p.day, p.zone, stream, batch, n)
                    os.rename(tmp, tmp.with_name(ref.name))
                    refs.append(ref)
                for d in {tmp.parent for _, tmp, _ in prepared}:
                    if d.exists():
                        fsync_dir(d)
                stored = sum(r.records for r in refs)
                self._append_journal(now, f"{seq} {batch} {stored}\n")
            except OSError as e:
                for ref in refs:
                    self.root.joinpath(*ref.partition.parts, ref.name).unlink(missing_ok=True)
                for _, tmp, _ in prepared:
                    tmp.unlink(missing_ok=True)
                raise StoreUnavailable(f"cannot commit: {e.strerror}") from None
            self._seen.setdefault((batch.dc, stream, batch.boot), _Seqs()).add(batch.seq)
            self._expired_count[stream] += expired
            for ref in refs:
                c = self._stored[stream].setdefault(ref.zone or "all", _counter())
                c["records"] += ref.records
            for zone in {ref.zone or "all" for ref in refs}:   # a batch counts once per zone
                self._stored[stream][zone]["batches"] += 1
            for fn in self._subscribers:
                fn(refs)
        return IngestResult(stored, False, expired)

    def _append_journal(self, now: float, line: str) -> None:
        day = day_of(now)
        if self._journal is None or self._journal[0] != day:
            if self._journal is not None:
                os.close(self._journal[1])
                self._journal = None
            path = self.root / "journal" / f"{day}.log"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._journal = (day, fd)
            fsync_dir(path.parent)
        fd = self._journal[1]
        write_all(fd, line.encode())
        os.fsync(fd)

    def note_rejected(self, stream: str, status: int) -> None:
        """Count a refused batch (400, 403, 413) for /v1/stats."""
        with self._lock:
            r = self._rejected.setdefault(stream, {})
            r[str(status)] = r.get(str(status), 0) + 1

    # ----------------------------------------------------------------------- recovery

    def _load_journals(self) -> int:
        """Fill the duplicate index; the highest committed seq."""
        jdir = self.root / "journal"
        floor_file = jdir / "floor"
        high = int(floor_file.read_text().strip() or 0) if floor_file.exists() else 0
        for path in sorted(jdir.glob("*.log")):
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A torn last line: that commit never finished; cut it off so
                # the next append starts on a line of its own.
                keep = data.rfind(b"\n") + 1
                os.truncate(path, keep)
                data = data[:keep]
            for line in data.decode("utf-8", "replace").splitlines():
                parts = line.split(" ")
                try:
                    seq, batch = int(parts[0]), BatchId.parse(parts[1])
                except (ValueError, IndexError):
                    print(f"privedge-core: {path}: skipping a malformed line", file=sys.stderr)
                    continue
                high = max(high, seq)
                self._seen.setdefault((batch.dc, batch.stream, batch.boot), _Seqs()
                                      ).add(batch.seq)
        return high

    def _partitions_on_disk(self) -> Iterator[tuple[Partition, Path]]:
        for zdir in sorted((self.root / "logs").iterdir()):
            if zdir.is_dir():
                for ddir in sorted(zdir.iterdir()):
                    if _DAY_RE.match(ddir.name) and ddir.is_dir():
                        yield Partition("logs", zdir.name, ddir.name), ddir
        for ddir in sorted((self.root / "sample").iterdir()):
            if _DAY_RE.match(ddir.name) and ddir.is_dir():
                yield Partition("sample", None, ddir.name), ddir

    def _drop_uncommitted(self, committed: int) -> None:
        """Remove temporary files, and chunks above the last committed seq."""
        for _, ddir in self._partitions_on_disk():
            for entry in os.scandir(ddir):
                m = _CHUNK_RE.match(entry.name)
                if entry.name.startswith(".tmp.") or (m and int(m[1]) > committed):
                    os.unlink(entry.path)

    # ----------------------------------------------------------------------- reading

    def chunks(self, zone: str, after_seq: int) -> list[ChunkRef]:
        """A zone's stored chunks with seq > after_seq, in (seq, day) order."""
        out: list[ChunkRef] = []
        zdir = self.root / "logs" / zone
        if not zdir.is_dir():
            return out
        for ddir in zdir.iterdir():
            if not _DAY_RE.match(ddir.name):
                continue
            p = Partition("logs", zone, ddir.name)
            try:
                names = os.listdir(ddir)
            except FileNotFoundError:
                continue   # swept meanwhile
            for name in names:
                ref = ChunkRef.from_name(p, name)
                if ref is not None and ref.seq > after_seq:
                    out.append(ref)
        return sorted(out, key=lambda r: (r.seq, r.day))

    def read_chunk(self, ref: ChunkRef) -> bytes | None:
        """A chunk's NDJSON; None if it is gone (swept: file or key)."""
        p = ref.partition
        aead = self.keys.get(p)
        if aead is None:
            return None
        try:
            blob = self.root.joinpath(*p.parts, ref.name).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return zlib.decompress(open_sealed(aead, blob, p.aad("data", str(ref.batch))))
        except DecryptError as e:
            with self._lock:
                self._unreadable += 1
            print(f"privedge-core: {'/'.join(p.parts)}/{ref.name}: {e}", file=sys.stderr)
            return None

    def read_day(self, stream: str, zone: str | None, day: str) -> Iterator[bytes]:
        """A partition's records as NDJSON pieces, in arrival order."""
        p = Partition(stream, zone, day)
        ddir = self.root.joinpath(*p.parts)
        try:
            names = sorted(os.listdir(ddir))
        except FileNotFoundError:
            return
        for name in names:
            ref = ChunkRef.from_name(p, name)
            if ref is not None and (data := self.read_chunk(ref)) is not None:
                yield data

    # ----------------------------------------------------------------------- retention sweep

    def sweep(self) -> SweepReport:
        """Delete every expired partition: its day key first (then nothing of
        it decrypts, wherever copies of its files are), then its files.

        Deleting a file unlinks it; on a journaling or copy-on-write file
        system, or an SSD, its blocks may stay readable to someone with the
        raw device until reused. That is why the key goes: a data key exists
        on disk only wrapped by the master key, and its wrapped copy is
        overwritten and unlinked. Someone who kept both the master key and a
        copy of the wrapped day key from before the sweep (or recovers its
        old blocks) can still decrypt copies of that day; protect the master
        key accordingly, and rotate it to retire old wrapped copies.
        """
        report = SweepReport()
        trash: list[Path] = []
        with self._lock:
            today = int(self.clock() // 86400)
            for p, ddir in list(self._partitions_on_disk()):
                if self._expired(p, today):
                    if self.keys.destroy(p):
                        report.keys_destroyed += 1
                    # Renamed away under the lock (instant); removed after it.
                    t = self.root / "trash" / secrets.token_hex(8)
                    t.parent.mkdir(exist_ok=True, mode=0o700)
                    os.rename(ddir, t)
                    trash.append(t)
                    report.removed.append(p)
            for p in self.keys.partitions():   # keys of days that never got data
                if self._expired(p, today) and self.keys.destroy(p):
                    report.keys_destroyed += 1
            report.journals_removed = self._sweep_journals(today)
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)
        return report

    def _sweep_journals(self, today: int) -> int:
        jdir = self.root / "journal"
        old = [p for p in jdir.glob("*.log")
               if _DAY_RE.match(p.stem) and day_number(p.stem) <= today - JOURNAL_DAYS]
        if not old:
            return 0
        if self._journal is not None and any(p.stem == self._journal[0] for p in old):
            os.close(self._journal[1])
            self._journal = None
        # Seqs must keep growing when the journals that knew them are gone.
        write_atomic(jdir / "floor", f"{self._next_seq - 1}\n".encode())
        for p in old:
            p.unlink()
        return len(old)

    # ----------------------------------------------------------------------- stats

    def stats(self) -> dict:
        """Counters since start, and what is on disk now (from names only)."""
        with self._lock:
            out: dict = {
                "since": self._since,
                "received": {s: {z: dict(c) for z, c in zones.items()}
                             for s, zones in self._stored.items()},
                "duplicates": dict(self._duplicates),
                "rejected": {s: dict(r) for s, r in self._rejected.items()},
                "expired_on_arrival": dict(self._expired_count),
                "unreadable_chunks": self._unreadable,
            }
        disk: dict[str, dict] = {"logs": {}, "sample": {}}
        for p, ddir in self._partitions_on_disk():
            files = records = size = 0
            try:
                entries = list(os.scandir(ddir))
            except FileNotFoundError:
                continue
            for entry in entries:
                m = _CHUNK_RE.match(entry.name)
                if m:
                    files += 1
                    records += int(m[5])
                    with contextlib.suppress(FileNotFoundError):  # swept meanwhile
                        size += entry.stat().st_size
            day = {"batches": files, "records": records, "bytes": size}
            if p.zone is None:
                disk["sample"][p.day] = day
            else:
                disk["logs"].setdefault(p.zone, {})[p.day] = day
        out["stored"] = disk
        return out
