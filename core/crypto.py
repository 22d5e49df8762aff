"""Envelope encryption for the log store: a master key wraps per-day data keys.

    init_master_key(path)                 privedge-core init-key: 32 random bytes, 0600
    master = load_master_key(path)        refuses a key others can read
    ring = KeyRing(master, data_dir / "keys")
    aead = ring.get(Partition("logs", "www", "2024-05-01"), create=True)
    blob = seal(aead, plaintext, aad); open_sealed(aead, blob, aad)
    ring.destroy(partition)               retention: the day's key is gone

Used by core/store.py. One data key (AES-256-GCM) per partition: (logs,
zone, UTC day) or (sample, UTC day). On disk a data key exists only wrapped
by the master key (AES-256-GCM, the partition's name as associated data, so
a key file copied to another partition does not unwrap). The master key
lives outside data_dir (core/config.py refuses otherwise): a copy of the
data directory alone decrypts nothing. Unwrapped keys are held in memory
only. Nonces are random 96-bit values; at one file per batch a day key
seals far fewer than the 2^32 messages NIST allows a random-nonce GCM key.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from control.pki import fsync_dir, write_all, write_file

KEY_BYTES = 32
NONCE_BYTES = 12
MASTER_HEADER = "privedge-core master key v1"
WRAP_MAGIC = b"PEK1"    # a wrapped data key file
SEAL_MAGIC = b"PEC1"    # a sealed data file


class KeyFileError(Exception):
    """A key cannot be made, read or used; the message says which and why."""


class DecryptError(Exception):
    """Authentication failed: wrong key, or the file was altered or moved."""


@dataclass(frozen=True, order=True)
class Partition:
    """Where records are stored: stream, zone (None for the sample), UTC day."""

    stream: str
    zone: str | None
    day: str

    @property
    def parts(self) -> tuple[str, ...]:
        """Path components under a root: logs/<zone>/<day> or sample/<day>."""
        return (self.stream, self.zone, self.day) if self.zone else (self.stream, self.day)

    def aad(self, purpose: str, *extra: str) -> bytes:
        return "\0".join(("privedge-core", purpose, self.stream, self.zone or "", self.day,
                          *extra)).encode()


# --------------------------------------------------------------------------- the master key


def init_master_key(path: Path) -> None:
    """Make a new master key file (0600, never overwriting one)."""
    make_dirs(path.parent)
    text = f"{MASTER_HEADER}\n{secrets.token_bytes(KEY_BYTES).hex()}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: exists; a new master key would make everything stored with "
                        "the old one unreadable, so it is never overwritten") from None
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def load_master_key(path: Path) -> bytes:
    """The 32 key bytes; KeyFileError if missing, malformed or readable by others."""
    try:
        st = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no master key; make one with `privedge-core init-key "
                        f"{path}`") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the master key ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read the "
                        f"master key; chmod 600 {path}")
    header, _, rest = text.partition("\n")
    try:
        key = bytes.fromhex(rest.strip())
    except ValueError:
        key = b""
    if header != MASTER_HEADER or len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: not a privedge-core master key (expected {MASTER_HEADER!r} "
                        f"and {KEY_BYTES} bytes in hex)")
    return key


# --------------------------------------------------------------------------- sealing


def seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return SEAL_MAGIC + nonce + aead.encrypt(nonce, plaintext, aad)


def open_sealed(aead: AESGCM, blob: bytes, aad: bytes) -> bytes:
    if blob[:4] != SEAL_MAGIC or len(blob) < 4 + NONCE_BYTES + 16:
        raise DecryptError("not a sealed privedge-core file")
    try:
        return aead.decrypt(blob[4:4 + NONCE_BYTES], blob[4 + NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptError("authentication failed (wrong key, or altered or moved)") from None


# --------------------------------------------------------------------------- files


def make_dirs(path: Path, mode: int = 0o700) -> None:
    """mkdir -p giving every level it makes `mode` (Path.mkdir(parents=True,
    mode=...) gives it to the last level only, the others get 0777 less the
    umask). Levels that exist are left as they are."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue   # made meanwhile by another thread
        os.chmod(d, mode)   # exactly `mode`, whatever the umask


def destroy_file(path: Path) -> bool:
    """Overwrite with zeros, fsync, unlink. The overwrite is best effort: on
    a journaling, copy-on-write or flash-backed file system the old blocks
    may survive (see core/README.md); what makes the key unusable is that
    the only other copy of its wrapping key is the master key, and the data
    key itself was never written unwrapped."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        write_all(fd, b"\0" * size)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------- data keys


class KeyRing:
    """Per-partition data keys: made on first use, wrapped on disk, cached
    unwrapped in memory; thread-safe."""

    def __init__(self, master: bytes, root: Path) -> None:
        self._wrap = AESGCM(master)
        self.root = root
        self._cache: dict[Partition, AESGCM] = {}
        self._lock = threading.Lock()

    def path(self, p: Partition) -> Path:
        return self.root.joinpath(*p.parts[:-1], p.day + ".key")

    def get(self, p: Partition, create: bool = False) -> AESGCM | None:
        """The partition's key; made (and written wrapped) if `create`, else
        None if there is none (never made, or destroyed by retention)."""
        with self._lock:
            aead = self._cache.get(p)
            if aead is not None:
                return aead
            path = self.path(p)
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                if not create:
                    return None
                key = AESGCM.generate_key(bit_length=256)
                nonce = secrets.token_bytes(NONCE_BYTES)
                wrapped = WRAP_MAGIC + nonce + self._wrap.encrypt(nonce, key, p.aad("key"))
                make_dirs(path.parent)
                write_file(path, wrapped, 0o600)
            else:
                if blob[:4] != WRAP_MAGIC:
                    raise KeyFileError(f"{path}: not a wrapped privedge-core key")
                try:
                    key = self._wrap.decrypt(blob[4:4 + NONCE_BYTES], blob[4 + NONCE_BYTES:],
                                             p.aad("key"))
                except InvalidTag:
                    raise KeyFileError(f"{path}: does not unwrap with this master key (another "
                                    "core's key, or the file was altered or moved)") from None
            aead = AESGCM(key)
            self._cache[p] = aead
            return aead

    def destroy(self, p: Partition) -> bool:
        """Forget the key in memory and destroy its file; True if a file was there."""
        with self._lock:
            self._cache.pop(p, None)
            return destroy_file(self.path(p))

    def forget(self) -> None:
        """Drop every unwrapped key from memory (at stop)."""
        with self._lock:
            self._cache.clear()

    def partitions(self) -> list[Partition]:
        """Every partition with a key file, from the names under root."""
        out = []
        for path in self.root.rglob("*.key"):
            rel = path.relative_to(self.root).parts
            day = rel[-1].removesuffix(".key")
            if rel[0] == "logs" and len(rel) == 3:
                out.append(Partition("logs", rel[1], day))
            elif rel[0] == "sample" and len(rel) == 2:
                out.append(Partition("sample", None, day))
        return sorted(out)


def check_master(master: bytes, path: Path, create: bool = True) -> None:
    """Refuse a master key other than the one data_dir was written with:
    path holds a token sealed by it, written on first use if `create`."""
    aead = AESGCM(master)
    aad = b"privedge-core\0master-check"
    if not path.exists():
        if create:
            make_dirs(path.parent)
            write_file(path, seal(aead, b"privedge-core master check", aad), 0o600)
        return
    try:
        open_sealed(aead, path.read_bytes(), aad)
    except DecryptError:
        raise KeyFileError(f"{path}: the data directory was written with another master key; "
                           "nothing in it would decrypt (wrong master_key path?)") from None
