"""Maglev consistent-hash lookup tables (Eisenbud et al., NSDI 2016, 3.4).

XDP steers a region's flows to one of its data centers by reading slot
``flow_hash % M`` of a table of M slots (M prime). Each slot holds an index
into the caller's list of backend names, or EMPTY when there is none.

The table is exactly what the paper's sequential loop gives. A backend's
``offset = h1 % M`` and ``skip = h2 % (M - 1) + 1`` come from two independent
hashes of its name, so its preference list, position p holding slot
``(offset + p * skip) % M``, is a permutation of the slots. Backends, sorted
by name, take turns (w turns in a row per round for weight w); a turn claims
the first still-free slot of the backend's list. Every turn claims one slot,
so with equal weights each backend gets floor(M/N) or ceil(M/N) slots.

That loop costs about M * ln(M) Python steps, so build() replays the same
turns in blocks with numpy:

  * A block is the next L turns (L about a quarter of the free slots). Each
    backend with turns in it lists its next free slots in preference order
    (its candidates): by scanning its list from where it stopped, or, once
    few slots are free, by computing each free slot's position in its list.
  * Guess that each turn takes its backend's next candidate, and check the
    guess: a turn is right if every candidate its backend skipped was picked
    by an earlier turn of the block and its own pick was not. Where the check
    fails, backends re-pick the candidates that looked free and the check
    repeats; three or four passes usually settle a whole block.
  * Turns before the first failing one are exact (by induction over time)
    and are committed; the next block starts after them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

EMPTY = 0xFFFFFFFF  # slot value when the region has no backend
DEFAULT_SIZE = 65537
# Slots, owners and turn times are kept in int32 and list arithmetic
# multiplies two values below M in int64; 2**31 - 1 is itself prime.
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
        dups = sorted(name for name, count in Counter(names).items() if count > 1)
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
    if weights is None:
        w = np.ones(n, np.int64)
    else:
        w = np.array([int(weights[i]) for i in order], np.int64)
    owner = _fill(np.ascontiguousarray(params[:, 0]), np.ascontiguousarray(params[:, 1]), w, size)
    return np.asarray(order, np.uint32)[owner]


# Tuning; none of these changes the result, only the time it takes.
_BLOCK_DIVISOR = 4      # a block is a quarter of the free slots' worth of turns ...
_MIN_BLOCK = 128        # ... but at least this many
_SLACK = 1.1            # list positions scanned, over those expected to be needed
_DENSE_MAX = 2.0        # scan lists while a scan is under this many times the free
                        # slots; past it, compute each free slot's list position
_SPARE = 2.0            # spare candidates per row: this times the expected ...
_SPARE_MIN = 2          # ... plus this
_MAX_PASSES = 40        # resolve passes per block before keeping the proven prefix
_INT32_MAX = np.iinfo(np.int32).max
_UNPICKED = _INT32_MAX  # in a block's scratch: "no turn of the block picks this slot"


class _Turns:
    """The fixed order of turns: round after round, each backend (name
    order) takes w consecutive turns."""

    def __init__(self, w: np.ndarray) -> None:
        self.w = w
        self.period = int(w.sum())
        self.first = np.cumsum(w) - w
        self.backend = np.repeat(np.arange(len(w)), w)
        self.sub = np.arange(self.period) - self.first[self.backend]

    def block(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Backend of turns start .. start+length-1, and for each the count
        of that backend's earlier turns in the block (its rank)."""
        q, r = np.divmod(start + np.arange(length), self.period)
        b = self.backend[r]
        wb = self.w[b]
        q0, r0 = divmod(start, self.period)
        rank = q * wb + self.sub[r] - (q0 * wb + np.clip(r0 - self.first[b], 0, wb))
        return b, rank


class _Lists:
    """Backends' preference lists: slot at position p is (off + p*skip) % m."""

    def __init__(self, off: np.ndarray, skip: np.ndarray, m: int) -> None:
        self.off, self.skip, self.m = off, skip, m
        self.skip32 = skip.astype(np.int32)      # m <= MAX_SIZE < 2**31
        self.inv: np.ndarray | None = None

    def slots(self, rows: np.ndarray, pos0: np.ndarray, span: int) -> np.ndarray:
        """(len(rows), span) slots at positions pos0 .. pos0+span-1."""
        m = self.m
        start = (self.off[rows] + pos0 % m * self.skip[rows]) % m
        if (span + 1) * m <= _INT32_MAX:   # int32 is ~3x faster, where it cannot overflow
            step = np.arange(span, dtype=np.int32) * self.skip32[rows][:, None]
            return (start.astype(np.int32)[:, None] + step) % np.int32(m)
        return (start[:, None] + np.arange(span) * self.skip[rows][:, None]) % m

    def positions(self, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """(len(rows), len(slots)) list position of each slot: (s - off) / skip."""
        m = self.m
        if self.inv is None:
            self.inv = _mod_inverse(self.skip, m)
        return (slots[None, :] - self.off[rows][:, None]) % m * self.inv[rows][:, None] % m

    def candidates(self, rows: np.ndarray, ptr: np.ndarray, owner: np.ndarray, free: int,
                   width: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's next `width` free slots in list order and their positions,
        as (len(rows), width + 1) arrays; the last column is the sentinel m."""
        m = self.m
        cols = width + 1
        out = np.full(len(rows) * cols, m, np.int64)
        where = np.zeros(len(rows) * cols, np.int64)
        span = int(width * m / free * _SLACK) + 4
        if span > free * _DENSE_MAX:
            # Few free slots: place each in every list instead of scanning.
            fs = np.flatnonzero(owner[:m] == -1)
            pos = self.positions(rows, fs)
            if width < free:
                idx = np.argpartition(pos, width - 1, axis=1)[:, :width]
                part = np.take_along_axis(pos, idx, axis=1)
                idx = np.take_along_axis(idx, np.argsort(part, axis=1), axis=1)
            else:
                idx = np.argsort(pos, axis=1)
            out.reshape(-1, cols)[:, :width] = fs[idx]
            where.reshape(-1, cols)[:, :width] = np.take_along_axis(pos, idx, axis=1)
            return out.reshape(-1, cols), where.reshape(-1, cols)
        # Scan each list from its pointer; rows that found too few scan on.
        # Every free slot lies within m positions of the pointer, so this ends.
        todo = np.arange(len(rows))
        start = ptr[rows]
        have = np.zeros(len(rows), np.int64)
        while len(todo):
            slots = self.slots(rows[todo], start[todo], span)
            ok = owner[slots] == -1
            nth = np.cumsum(ok, axis=1, dtype=np.int32) + have[todo][:, None].astype(np.int32)
            sel = np.flatnonzero(ok & (nth <= width))
            i = sel // span
            dst = todo[i] * cols + nth.ravel()[sel] - 1
            out[dst] = slots.ravel()[sel]
            where[dst] = start[todo][i] + sel % span
            have[todo] = np.minimum(nth[:, -1], width)
            start[todo] += span
            todo = todo[have[todo] < width]
            if len(todo):
                span = int((width - have[todo]).max() * m / free * 2) + 4
        return out.reshape(-1, cols), where.reshape(-1, cols)


def _rows(b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Backends with a turn in the block, and each turn's row among them."""
    if len(b) >= n:
        return np.arange(n), b
    mark = np.zeros(n, bool)
    mark[b] = True
    return np.flatnonzero(mark), (np.cumsum(mark) - 1)[b]


def _resolve(row: np.ndarray, rank: np.ndarray, cand: np.ndarray, need: int,
             scratch: np.ndarray, m: int) -> tuple[np.ndarray, int]:
    """Which candidate each turn of a block claims, and how many turns (a
    prefix) are proven to claim what the sequential loop would.

    A guess is checked against itself: a turn is right if every candidate its
    row skipped since its previous turn was picked by an earlier turn and its
    own pick was not. The first turn that fails ends the proven prefix (all
    turns before it are exact, by induction over time). Otherwise each row
    re-picks the candidates that looked free and the check repeats. A few
    passes usually prove the whole block; after _MAX_PASSES the proven
    prefix is kept. It is never empty: the first turn always takes its row's
    first candidate.
    """
    length = len(row)
    nr, cols = cand.shape
    width = cols - 1
    tau = np.arange(length, dtype=np.int32)
    # Time of each row's k-th turn; `length` where it has no such turn.
    when = np.full(nr * (need + 1), length, np.int32)
    when[row * (need + 1) + rank] = tau
    when_row = (np.arange(nr) * (need + 1))[:, None]
    flat = cand.ravel()
    head = cand[:, :width]
    at = row * cols
    guess = rank.astype(np.int64)     # first guess: nobody gets in anyone's way
    proven, end = guess, 0
    for _ in range(_MAX_PASSES):
        slot = flat[at + guess]
        np.minimum.at(scratch, slot, tau)
        first = scratch[head]         # earliest turn that picks each candidate
        scratch[slot] = _UNPICKED
        taken = np.zeros(nr * cols, bool)
        taken[at + guess] = True
        taken = taken.reshape(nr, cols)[:, :width]
        # Under this guess, the turn of its row that reaches each candidate.
        reach = when[when_row + (np.cumsum(taken, axis=1, dtype=np.int32) - taken)]
        looks_free = first >= reach
        unknown = guess == width      # the row ran out of candidates
        limit = int(np.argmax(unknown)) if unknown.any() else length
        wrong = (taken != looks_free) & (reach < limit)
        if not wrong.any():
            return guess, limit
        proven, end = guess, int(reach[wrong].min())
        nth = np.cumsum(looks_free, axis=1, dtype=np.int32)
        sel = np.flatnonzero(looks_free & (nth <= need))
        nxt = np.full(nr * need, width, np.int64)
        nxt[sel // width * need + nth.ravel()[sel] - 1] = sel % width
        guess = nxt[row * need + rank]
    return proven, end


def _fill(off: np.ndarray, skip: np.ndarray, w: np.ndarray, m: int) -> np.ndarray:
    """Run the turns block by block; returns slot -> backend (name order)."""
    turns = _Turns(w)
    lists = _Lists(off, skip, m)
    owner = np.full(m + 1, -1, np.int32)        # slot m is the sentinel: never free
    owner[m] = -2
    scratch = np.full(m + 1, _UNPICKED, np.int32)  # per-slot earliest pick, kept clean
    ptr = np.zeros(len(w), np.int64)             # list positions before it are all taken
    filled = 0                                   # = turns taken: each claims one slot
    while filled < m:
        free = m - filled
        length = min(free, max(_MIN_BLOCK, free // _BLOCK_DIVISOR))
        b, rank = turns.block(filled, length)
        rows, row = _rows(b, len(w))
        need = int(rank.max()) + 1
        # Spare candidates for those that other turns of the block take first.
        width = min(free, need + int(need * length / free * _SPARE) + _SPARE_MIN)
        cand, where = lists.candidates(rows, ptr, owner, free, width)
        pick, end = _resolve(row, rank, cand, need, scratch, m)
        if end < 1:   # cannot happen (see _resolve); never loop forever if it did
            raise RuntimeError("maglev: a block proved no turn")
        at = row[:end] * (width + 1) + pick[:end]
        owner[cand.ravel()[at]] = b[:end]
        # Positions grow with rank, so the max is each backend's last claim.
        np.maximum.at(ptr, b[:end], where.ravel()[at] + 1)
        filled += end
    return owner[:m]


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
