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
compressed NDJSON sealed with AES-256-GCM under its day key, with every
part of its path as associated data: stream, zone, day, seq, batch id and
record count. A chunk moved to another zone or day, or renamed (another
seq, batch or count), does not decrypt. No name or journal line holds
personal data.

Commit protocol: a batch takes its seq once it has been checked; its chunks
are sealed (the seq is in their associated data), written and fsynced
under temporary names outside the lock; then, under it and in seq order
(a commit waits for the seqs before its own to commit or fail), they are
renamed to their final names and the batch's journal line is appended and
fsynced: the journal line is the commit. A journal append that fails is cut
back to where it began, so a half line never joins the next commit's; if
even that fails the store refuses writes until it is opened again. Commits
are serial and in seq order, so after a crash only chunks with a seq above
the journal's highest can be uncommitted; open() deletes them, and the
edge's retry stores the batch again. A batch id seen in the journals (the
last JOURNAL_DAYS days of arrivals) is answered as a duplicate.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
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

from control.pki import fsync_dir, write_all, write_file
from core.batch import BatchId
from core.config import MAX_RETENTION_DAYS, CoreConfig
from core.crypto import (
    DecryptError,
    KeyFileError,
    KeyRing,
    Partition,
    check_master,
    make_dirs,
    open_sealed,
    seal,
)
from core.records import Parsed, Rules, day_number, day_of, dump_records, parse_batch

JOURNAL_DAYS = 3        # arrival days of batch ids kept for duplicate checks (today + 2)
CLOSE_WAIT = 5.0        # seconds close() waits for ingests in flight
_CHUNK_RE = re.compile(r"^(\d{12})\.([a-z0-9-]+)\.([0-9a-f]{16})\.(\d+)\.(\d+)\.pec$")
_JOURNAL_RE = re.compile(r"^(\d{1,12}) (\S+) (\d+)$")


def is_day(name: str) -> bool:
    """Whether a file name is a UTC day, YYYY-MM-DD (2024-13-45 is not)."""
    try:
        day_number(name)
    except ValueError:
        return False
    return True


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

    @property
    def aad(self) -> bytes:
        """Associated data of the chunk's seal: all of its path."""
        return self.partition.aad("data", str(self.batch), str(self.seq), str(self.records))

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
        self._idle = threading.Condition(self._lock)   # in flight, seq turns
        self._inflight = 0
        self._closed = True
        self._broken: str | None = None        # why writes are refused until reopened
        self._lock_fd: int | None = None
        self._seen: dict[tuple[str, str, str], _Seqs] = {}
        self._next_seq = 1                     # the next seq to hand out
        self._turn = 1                         # the lowest seq not yet committed or failed
        self._done_early: set[int] = set()     # seqs above _turn already done
        self._journal: tuple[str, int] | None = None   # (day, fd) being appended to
        self._journal_errors: list[tuple[str, int]] = []   # (file, line) malformed at open
        self._strays: set[str] = set()         # names under data_dir that are not a day
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
            make_dirs(self.root / sub)
        os.chmod(self.root, 0o700)
        self._take_lock()
        try:
            check_master(self._master, self.root / "master.check")
            shutil.rmtree(self.root / "trash", ignore_errors=True)
            committed = self._load_journals()
            # A malformed journal line may have been the last commit: its
            # chunks are then kept rather than deleted (see _drop_uncommitted).
            high = self._drop_uncommitted(committed, keep=bool(self._journal_errors))
            self._next_seq = self._turn = max(committed, high) + 1
            self._broken = None
        except BaseException:
            self.close()
            raise
        self._closed = False
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse new ingests, wait (bounded) for those in flight, forget keys.
        An ingest still sealing when the wait ends finds the store closed
        at its commit and removes its files (StoreUnavailable)."""
        with self._idle:
            self._closed = True
            self._idle.notify_all()   # commits waiting for their turn give up
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
        """Every commit up to this seq is done: its chunks are on disk (or it
        failed and has none). 0 before the first."""
        with self._lock:
            return self._turn - 1

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store open while writing something of one's own under
        data_dir (a logpush cursor): StoreUnavailable if it is closed; close()
        waits (bounded) for the block to end."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    # ----------------------------------------------------------------------- retention

    def retention_days(self, zone: str | None) -> int:
        if zone is None:
            return self.config.sample_retention_days
        z = self.config.zones.get(zone)
        # A zone gone from the config keeps the longest retention any zone may have.
        return z.retention_days if z is not None else MAX_RETENTION_DAYS

    def _expired(self, p: Partition, today: int) -> bool:
        return day_number(p.day) <= today - self.retention_days(p.zone)

    def _stray(self, rel: str) -> None:
        """A name that should be a day and is not (not ours): left alone, counted."""
        with self._lock:
            if rel in self._strays:
                return
            self._strays.add(rel)
        print(f"privedge-core: {self.root}/{rel}: not a day (YYYY-MM-DD); left alone",
              file=sys.stderr)

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
            if self._closed or self._broken:
                raise StoreUnavailable(self._broken or "the store is closing")
            if self._is_duplicate(batch):
                self._duplicates[stream] += 1
                return IngestResult(0, True)
            self._inflight += 1
        try:
            parsed = parse_batch(stream, body, self._rules(batch.dc, self.clock()))
            with self._lock:
                if self._closed:
                    raise StoreUnavailable("the store is closing")
                seq = self._next_seq
                self._next_seq += 1   # burnt if this commit fails: seqs never repeat
            try:
                return self._commit(seq, batch, parsed, self._prepare(seq, batch, parsed))
            finally:
                with self._lock:
                    if seq >= self._turn and seq not in self._done_early:
                        self._done(seq)   # failed or a duplicate: burnt
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _done(self, seq: int) -> None:
        """seq is committed or failed: the next seq may commit (under the lock)."""
        if seq != self._turn:
            self._done_early.add(seq)
            return
        self._turn += 1
        while self._turn in self._done_early:
            self._done_early.remove(self._turn)
            self._turn += 1
        self._idle.notify_all()

    def _prepare(self, seq: int, batch: BatchId, parsed: Parsed
                 ) -> list[tuple[Partition, Path, int]]:
        """Seal each partition's records into a temporary file (fsynced)."""
        prepared: list[tuple[Partition, Path, int]] = []
        try:
            for (zone, day), records in sorted(parsed.groups.items(),
                                               key=lambda kv: (kv[0][0] or "", kv[0][1])):
                p = Partition(batch.stream, zone, day)
                aead = self.keys.get(p, create=True)
                assert aead is not None
                ref = ChunkRef(seq, day, zone, batch.stream, batch, len(records))
                blob = seal(aead, zlib.compress(dump_records(records), 1), ref.aad)
                directory = self.root.joinpath(*p.parts)
                make_dirs(directory)
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

    def _commit(self, seq: int, batch: BatchId, parsed: Parsed,
                prepared: list[tuple[Partition, Path, int]]) -> IngestResult:
        stream = batch.stream
        with self._lock:
            # In seq order, so that a reader that has seen seq N has seen
            # every commit before it (logpush pages by seq).
            self._idle.wait_for(lambda: self._turn == seq or self._closed)
            if self._closed or self._broken:
                # close() gave up waiting for this ingest: nothing may be
                # written now (the journal is closed, the flock released).
                for _, tmp, _ in prepared:
                    tmp.unlink(missing_ok=True)
                raise StoreUnavailable(self._broken or "the store is closing")
            if self._is_duplicate(batch):   # a concurrent retry committed first
                for _, tmp, _ in prepared:
                    tmp.unlink(missing_ok=True)
                self._duplicates[stream] += 1
                return IngestResult(0, True)
            now = self.clock()
            today = int(now // 86400)
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
                raise StoreUnavailable(f"cannot commit: {e.strerror or type(e).__name__}"
                                       ) from None
            self._done(seq)   # before the subscribers hear of it: high_seq includes it
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
        """Append and fsync one commit line (under the lock). On failure the
        file is cut back to where the line began, so no half line is left
        for the next commit to be glued onto; if that fails too, the journal
        is closed and writes are refused (StoreUnavailable) until open()."""
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
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            write_all(fd, line.encode())
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                os.close(fd)
                self._journal = None
                self._broken = (f"a failed journal append ({e.strerror or type(e).__name__}) "
                                "could not be undone; writes are refused until restart")
                print(f"privedge-core: journal/{day}.log: {self._broken}", file=sys.stderr)
            raise

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
            if not is_day(path.stem):
                self._stray(f"journal/{path.name}")
                continue
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A torn last line: that commit never finished (its answer
                # comes after the fsync, so it was never acknowledged); cut
                # it off so the next append starts on a line of its own.
                keep = data.rfind(b"\n") + 1
                os.truncate(path, keep)
                data = data[:keep]
            for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                m = _JOURNAL_RE.match(line)
                try:
                    seq, batch = int(m[1]), BatchId.parse(m[2])  # type: ignore[index]
                except (ValueError, TypeError):
                    # Not a torn end: a commit line that cannot be read. Said
                    # by position only, and counted (/v1/stats journal_errors).
                    self._journal_errors.append((path.name, n))
                    print(f"privedge-core: journal/{path.name} line {n}: malformed (not "
                          "<seq> <batch id> <records>); chunks are kept and batch ids "
                          "taken from their names", file=sys.stderr)
                    continue
                high = max(high, seq)
                self._seen.setdefault((batch.dc, batch.stream, batch.boot), _Seqs()
                                      ).add(batch.seq)
        return high

    def _days(self, parent: Path) -> Iterator[Path]:
        """The day directories in parent, sorted; other names are strays."""
        for ddir in sorted(parent.iterdir()):
            if not ddir.is_dir():
                continue
            if is_day(ddir.name):
                yield ddir
            else:
                self._stray(str(ddir.relative_to(self.root)))

    def _partitions_on_disk(self) -> Iterator[tuple[Partition, Path]]:
        for zdir in sorted((self.root / "logs").iterdir()):
            if zdir.is_dir():
                for ddir in self._days(zdir):
                    yield Partition("logs", zdir.name, ddir.name), ddir
        for ddir in self._days(self.root / "sample"):
            yield Partition("sample", None, ddir.name), ddir

    def _drop_uncommitted(self, committed: int, keep: bool) -> int:
        """Remove temporary files, and chunks above the last committed seq;
        the highest seq of a chunk left. With `keep` (a journal line could
        not be read, and may have been the last commit) chunks above it are
        kept rather than deleted (a batch stored twice is better than an
        acknowledged one lost), and the batch ids in every chunk's name are
        taken as committed, standing in for the line that was lost."""
        high = committed
        for p, ddir in self._partitions_on_disk():
            for entry in os.scandir(ddir):
                m = _CHUNK_RE.match(entry.name)
                if entry.name.startswith(".tmp."):
                    os.unlink(entry.path)
                elif m and keep:
                    high = max(high, int(m[1]))
                    self._seen.setdefault((m[2], p.stream, m[3]), _Seqs()).add(int(m[4]))
                elif m and int(m[1]) > committed:
                    os.unlink(entry.path)
        return high

    # ----------------------------------------------------------------------- reading

    def chunks(self, zone: str, after_seq: int, upto_seq: int,
               limit: int) -> tuple[list[ChunkRef], int]:
        """A page of a zone's stored chunks with after_seq < seq <= upto_seq,
        in (seq, day) order, and the seq up to which it is complete (upto_seq,
        or less when there were more than `limit`). A page never holds part
        of a seq's chunks (a batch's chunks of one zone are a few days' at
        most, far fewer than `limit`). Memory is O(limit), whatever is on disk."""
        zdir = self.root / "logs" / zone
        if not zdir.is_dir():
            return [], upto_seq

        def refs() -> Iterator[ChunkRef]:
            for ddir in zdir.iterdir():
                if not is_day(ddir.name):
                    continue
                p = Partition("logs", zone, ddir.name)
                try:
                    names = os.listdir(ddir)
                except (FileNotFoundError, NotADirectoryError):
                    continue   # swept meanwhile
                for name in names:
                    ref = ChunkRef.from_name(p, name)
                    if ref is not None and ref.seq > after_seq and (
                            upto_seq is None or ref.seq <= upto_seq):
                        yield ref

        def key(r: ChunkRef) -> tuple[int, str]:
            return (r.seq, r.day)

        page = heapq.nsmallest(limit + 1, refs(), key=key)
        if len(page) <= limit:
            return page, upto_seq
        last = page[-1].seq   # it may go on past the page: left for the next one
        whole = [r for r in page if r.seq != last]
        if not whole:          # more than `limit` chunks of one seq: not made by ingest
            return page, last
        return whole, whole[-1].seq

    def partition_gone(self, p: Partition) -> bool:
        """Whether the partition's key is gone (swept, or never made)."""
        return self.keys.get(p) is None

    def read_chunk(self, ref: ChunkRef) -> bytes | None:
        """A chunk's NDJSON; None if it is gone (swept: file or key), or the
        store is closed (its keys are forgotten and stay so)."""
        if self._closed:
            return None
        p = ref.partition
        aead = self.keys.get(p)
        if aead is None:
            return None
        try:
            blob = self.root.joinpath(*p.parts, ref.name).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return zlib.decompress(open_sealed(aead, blob, ref.aad))
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
        # Listed outside the lock (strays are noted under it).
        parts = list(self._partitions_on_disk())
        keyed = []
        for p in self.keys.partitions():
            if is_day(p.day):
                keyed.append(p)
            else:
                self._stray(str(self.keys.path(p).relative_to(self.root)))
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            today = int(self.clock() // 86400)
            for p, ddir in parts:
                if self._expired(p, today) and ddir.is_dir():
                    if self.keys.destroy(p):
                        report.keys_destroyed += 1
                    # Renamed away under the lock (instant); removed after it.
                    t = self.root / "trash" / secrets.token_hex(8)
                    make_dirs(t.parent)
                    os.rename(ddir, t)
                    trash.append(t)
                    report.removed.append(p)
            for p in keyed:   # keys of days that never got data
                if self._expired(p, today) and self.keys.destroy(p):
                    report.keys_destroyed += 1
            report.journals_removed = self._sweep_journals(today)
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)
        return report

    def _sweep_journals(self, today: int) -> int:
        jdir = self.root / "journal"
        old = [p for p in jdir.glob("*.log")
               if is_day(p.stem) and day_number(p.stem) <= today - JOURNAL_DAYS]
        if not old:
            return 0
        if self._journal is not None and any(p.stem == self._journal[0] for p in old):
            os.close(self._journal[1])
            self._journal = None
        # Seqs must keep growing when the journals that knew them are gone:
        # the highest committed (a seq handed out and not committed has no
        # chunk that could be mistaken for committed after a crash).
        write_file(jdir / "floor", f"{self._turn - 1}\n".encode(), 0o600)
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
                "journal_errors": len(self._journal_errors),
                "stray_entries": len(self._strays),
                "writes_refused": self._broken is not None,
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
