"""The disk spill: cache objects evicted from memory, AES-256-GCM encrypted.

DESIGN.md invariant 5: nothing but encrypted cache objects is written to
disk on an edge. So:

  keys       two random 256-bit keys made when the store is created, held
             only in this process's memory, never written anywhere: one
             for AES-256-GCM, one for HMAC-SHA256 file names
  file name  hex HMAC-SHA256 of the cache key: reveals nothing (not the
             zone, host, URL or header values), yet the same key always
             finds its file
  content    12-byte random nonce + ciphertext of the whole stored object
             (key, headers, body, timing), with the cache key as associated
             data: a file swapped under another's name, or altered by one
             bit, fails authentication; it is then deleted and is a miss
  writes     to a temporary name (O_EXCL, mode 0600), then renamed into
             place, so a reader never sees half a file; the directory is
             made 0700
  bound      `max_bytes` of files, the oldest written evicted first (an
             object read moves back to memory and leaves the disk); an
             object bigger than the bound is not written

At start the directory is emptied of every object a previous process
wrote: that process's keys are gone, so its files can never be read again.
Anything else found there (a file not named like an object) stops the
start instead, so a mistyped disk_dir never deletes someone's files.

The index (which keys have a file, their sizes, LRU order) is in memory.
Calls are synchronous file I/O; the front end's one event loop thread owns
the store, so no lock is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
TAG_BYTES = 16
TMP_PREFIX = ".tmp-"
_OBJECT_NAME = re.compile(r"\A[0-9a-f]{64}\Z")
_TMP_NAME = re.compile(r"\A\.tmp-[0-9a-f]{32}\Z")


class CacheDirError(ValueError):
    """The disk directory cannot be the cache's (not a directory, or not its own)."""


class DiskStore:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._name_key = secrets.token_bytes(32)
        self._index: OrderedDict[bytes, int] = OrderedDict()   # cache key → file size
        self.bytes = 0
        self.evictions = 0        # removed to stay under max_bytes
        self.rejected = 0         # failed authentication (tampered, swapped, truncated)
        self.errors = 0           # writes or reads the file system refused
        self.purged_at_start = _prepare(self.dir)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[bytes]:
        return list(self._index)

    def name(self, key: bytes) -> str:
        return hmac.new(self._name_key, key, hashlib.sha256).hexdigest()

    def put(self, key: bytes, plaintext: bytes) -> list[bytes] | None:
        """Write one object; returns the keys evicted to make room, or None
        when it was not written (too big for the bound, or a write error)."""
        size = NONCE_BYTES + len(plaintext) + TAG_BYTES
        if size > self.max_bytes:
            return None
        self.delete(key)
        evicted = []
        while self._index and self.bytes + size > self.max_bytes:
            old, _ = next(iter(self._index.items()))
            self.delete(old)
            self.evictions += 1
            evicted.append(old)
        nonce = secrets.token_bytes(NONCE_BYTES)
        data = nonce + self._aead.encrypt(nonce, plaintext, key)
        final = self.dir / self.name(key)
        tmp = self.dir / f"{TMP_PREFIX}{secrets.token_hex(16)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except OSError:
            self.errors += 1
            _unlink(tmp)
            return None
        self._index[key] = size
        self.bytes += size
        return evicted

    def take(self, key: bytes) -> bytes | None:
        """Read, verify and remove one object (it moves back to memory).
        None when absent, unreadable or failing authentication."""
        if key not in self._index:
            return None
        path = self.dir / self.name(key)
        try:
            data = path.read_bytes()
        except OSError:
            self.errors += 1
            data = b""
        self.delete(key)
        try:
            return self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], key)
        except (InvalidTag, ValueError):
            self.rejected += 1
            return None

    def delete(self, key: bytes) -> bool:
        size = self._index.pop(key, None)
        if size is None:
            return False
        self.bytes -= size
        _unlink(self.dir / self.name(key))
        return True

    def clear(self) -> int:
        n = len(self._index)
        for key in list(self._index):
            self.delete(key)
        return n


def _unlink(path: Path) -> None:
    # A file that cannot be removed stays encrypted under a key that dies
    # with the process, and the next start empties the directory.
    with contextlib.suppress(OSError):
        path.unlink()


def _prepare(path: Path) -> int:
    """Make the directory (0700) or empty it of a previous process's objects;
    returns how many were deleted."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass                              # not a directory: said below
    except OSError as e:
        raise CacheDirError(f"cache disk_dir {path}: cannot create it: "
                            f"{e.strerror or e}") from None
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise CacheDirError(f"cache disk_dir {path}: not a directory (nor may it be a "
                            "symlink to one)")
    os.chmod(path, 0o700)
    ours, foreign = [], []
    with os.scandir(path) as it:
        for e in it:
            own = (_OBJECT_NAME.match(e.name) or _TMP_NAME.match(e.name)) and \
                e.is_file(follow_symlinks=False)
            (ours if own else foreign).append(e.name)
    if foreign:
        raise CacheDirError(f"cache disk_dir {path}: holds {len(foreign)} entries that are "
                            f"not cache objects (e.g. {sorted(foreign)[0]!r}); give the cache "
                            "a directory of its own")
    for name in ours:
        _unlink(path / name)
    return len(ours)
