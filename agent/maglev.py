"""Maglev consistent-hash lookup tables (Eisenbud et al., NSDI 2016, 3.4).

XDP steers a region's flows to one of its data centers by reading slot
``flow_hash % M`` of a table of M slots (M prime). Each slot holds an index
into the caller's list of backend names, or EMPTY when there is none.

The table is what the paper's sequential algorithm gives: backend i has
``offset = h1 % M`` and ``skip = h2 % (M - 1) + 1`` from two independent
hashes of its name, so its preference list ``(offset + j * skip) % M`` is a
permutation of the slots. Backends, sorted by name, take turns (w turns per
round for weight w); in each turn a backend claims the first slot of its list
that is still free. Every turn claims exactly one slot, so with equal
weights each backend ends with floor(M/N) or ceil(M/N) slots.

The sequential loop costs about M * ln(M) Python steps, too slow for the
agent, so ``build`` simulates it in blocks of turns with numpy and is exact:

  * For each backend taking part in a block, list its next free slots as
    seen at the start of the block (its "optimistic" picks).
  * Walk the block's turns in order. A pick is exactly what the sequential
    loop would claim, as long as no earlier turn of the block picked the
    same slot: the slots a backend skipped were taken before the block, and
    within the block only earlier picks can take slots. So every turn before
    the first repeated (or unknown) pick is committed; the block ends there
    and the next one starts at that turn.

A block of about 2*sqrt(free) turns usually ends at its first collision (the
birthday bound), so a build takes a few hundred blocks of small array work.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

EMPTY = 0xFFFFFFFF  # slot value when the region has no backend
DEFAULT_SIZE = 65537
# Slot numbers are multiplied in int64 (a product of two values < M), and
# indices must stay below EMPTY; 2**31 - 1 is itself prime.
MAX_SIZE = 2**31 - 1

# Two blake2b personalisations give two independent hashes of one name.
_PERSON_OFFSET = b"privedge-mgl-off"
_PERSON_SKIP = b"privedge-mgl-skp"

# Deterministic Miller-Rabin witnesses for every n < 3.3e24.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """True if n is prime (exact for any table size one could configure)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def name_hashes(name: str) -> tuple[int, int]:
    """Two independent 64-bit hashes of a backend name (offset, skip).

    blake2b, not hash(): every process and machine must build the same table.
    """
    data = name.encode("utf-8")
    h1 = hashlib.blake2b(data, digest_size=8, person=_PERSON_OFFSET).digest()
    h2 = hashlib.blake2b(data, digest_size=8, person=_PERSON_SKIP).digest()
    return int.from_bytes(h1, "little"), int.from_bytes(h2, "little")


def permutation_params(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a name's preference list in a table of `size` slots."""
    h1, h2 = name_hashes(name)
    return h1 % size, h2 % (size - 1) + 1


def _check(names: Sequence[str], size: int, weights: Sequence[int] | None) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"table size {size!r} is not an integer")
    if not is_prime(size):
        raise ValueError(f"table size {size} is not prime (Maglev needs a prime, e.g. 65537)")
    if size > MAX_SIZE:
        raise ValueError(f"table size {size} is above the maximum {MAX_SIZE}")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"backend name {name!r} is not a string")
    if len(names) > size:
        raise ValueError(f"{len(names)} backends do not fit a table of {size} slots")
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dups = sorted({n for n in names if n in seen or seen.add(n)})
        raise ValueError(f"backend names repeat: {', '.join(dups)}")
    if weights is not None:
        if len(weights) != len(names):
            raise ValueError(f"{len(weights)} weights for {len(names)} backends")
        for name, w in zip(names, weights, strict=True):
            if isinstance(w, bool) or not isinstance(w, int | np.integer) or w < 1:
                raise ValueError(f"backend {name}: weight {w!r} must be an integer >= 1")


def _mod_inverse(a: np.ndarray, m: int) -> np.ndarray:
    """a ** (m - 2) % m, i.e. 1/a mod the prime m, for every element."""
    result = np.ones_like(a)
    base = a % m
    e = m - 2
    while e:
        if e & 1:
            result = result * base % m
        base = base * base % m
        e >>= 1
    return result


def build(names: Sequence[str], size: int, weights: Sequence[int] | None = None) -> np.ndarray:
    """The Maglev table: `size` uint32 slots, each an index into `names`.

    The order of `names` does not change which name owns which slot. With no
    names every slot is EMPTY. Raises ValueError if `size` is not prime,
    names repeat, there are more names than slots or a weight is below 1.
    """
    _check(names, size, weights)
    n = len(names)
    if n == 0:
        return np.full(size, EMPTY, np.uint32)
    # Turns go in name order, so the caller's order cannot matter.
    order = sorted(range(n), key=names.__getitem__)
    params = np.array([permutation_params(names[i], size) for i in order], np.int64)
    w = np.ones(n, np.int64) if weights is None else np.array([weights[i] for i in order],
                                                               np.int64)
    owner = _fill(params[:, 0].copy(), params[:, 1].copy(), w, size)
    return np.asarray(order, np.uint32)[owner]


def _fill(off: np.ndarray, skip: np.ndarray, w: np.ndarray, m: int) -> np.ndarray:
    """Run the sequential turns in blocks; returns slot -> backend (name order)."""
    n_round = int(w.sum())                     # turns in one round
    first = np.cumsum(w) - w                   # a backend's first turn in a round
    turn_backend = np.repeat(np.arange(len(w)), w)
    turn_sub = np.arange(n_round) - first[turn_backend]
    owner = np.full(m, -1, np.int64)
    ptr = np.zeros(len(w), np.int64)           # next list position to look at
    inv: np.ndarray | None = None              # 1/skip mod m, once needed
    slack = 1.5
    filled = 0                                 # = turns taken: each claims one slot
    while filled < m:
        free = m - filled
        length = min(free, 2 * math.isqrt(free) + 8)
        t = filled + np.arange(length)
        q, r = np.divmod(t, n_round)
        b = turn_backend[r]
        # How many turns each backend has had before this block and before
        # each of its turns in it: rank = its index among its block turns.
        q0, r0 = divmod(filled, n_round)
        before = q0 * w[b] + np.clip(r0 - first[b], 0, w[b])
        rank = q * w[b] + turn_sub[r] - before
        act, row = np.unique(b, return_inverse=True)
        need = int(rank.max()) + 1
        width = int(need * m / free * slack) + 16
        if len(act) * width <= len(act) * free * 4 and width < m:
            pick, pos = _picks_window(act, need, width, off, skip, ptr, owner, m)
        else:
            if inv is None:
                inv = _mod_inverse(skip, m)
            pick, pos = _picks_free(act, need, off, inv, owner, m)
        slot = pick[row, rank]
        # End the block at the first pick an earlier turn already took, or
        # at the first the window could not see.
        bad = slot < 0
        by_slot = np.argsort(slot, kind="stable")
        sorted_slot = slot[by_slot]
        bad[by_slot[1:]] |= sorted_slot[1:] == sorted_slot[:-1]
        end = int(np.argmax(bad)) if bad.any() else length
        if end == 0:
            slack *= 2                          # the window was too short
            continue
        owner[slot[:end]] = b[:end]
        # Positions grow with rank, so the max is each backend's last claim.
        np.maximum.at(ptr, b[:end], pos[row[:end], rank[:end]] + 1)
        filled += end
    return owner


def _picks_window(act: np.ndarray, need: int, width: int, off: np.ndarray, skip: np.ndarray,
                  ptr: np.ndarray, owner: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Next `need` free slots of each active backend, scanning `width` list
    positions from its pointer; -1 where the window held too few."""
    pos = ptr[act, None] + np.arange(width)
    slots = (off[act, None] + pos * skip[act, None]) % m
    free = owner[slots] < 0
    nth = np.cumsum(free, axis=1)
    rows, cols = np.nonzero(free & (nth <= need))
    k = nth[rows, cols] - 1
    pick = np.full((len(act), need), -1, np.int64)
    at = np.zeros((len(act), need), np.int64)
    pick[rows, k] = slots[rows, cols]
    at[rows, k] = pos[rows, cols]
    return pick, at


def _picks_free(act: np.ndarray, need: int, off: np.ndarray, inv: np.ndarray,
                owner: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Next `need` free slots of each active backend, from every free slot's
    position in its list; cheap once few slots are left.

    Positions before a backend's pointer are all taken, so the smallest
    positions among the free slots are its next picks.
    """
    free = np.flatnonzero(owner < 0)
    pos = (free[None, :] - off[act, None]) % m * inv[act, None] % m
    if need < len(free):
        idx = np.argpartition(pos, need - 1, axis=1)[:, :need]
        part = np.take_along_axis(pos, idx, axis=1)
        idx = np.take_along_axis(idx, np.argsort(part, axis=1), axis=1)
    else:
        idx = np.argsort(pos, axis=1)[:, :need]
    return free[idx], np.take_along_axis(pos, idx, axis=1)


def relabel(table: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Map a table's indices through `ids` (e.g. region list -> network DC
    list); EMPTY stays EMPTY. Tables built from different name lists must be
    relabelled to common ids before they are compared."""
    lookup = np.append(np.asarray(ids, np.uint32), np.uint32(EMPTY))
    return lookup[np.where(table == EMPTY, len(ids), table)]


def moved_fraction(before: np.ndarray, after: np.ndarray) -> float:
    """Fraction of slots whose owner differs between two tables.

    Both must label owners the same way (see relabel): an index means a name
    only together with the list it was built from.
    """
    if before.shape != after.shape:
        raise ValueError(f"tables differ in size: {before.shape} vs {after.shape}")
    if before.size == 0:
        return 0.0
    return float(np.count_nonzero(before != after)) / before.size
