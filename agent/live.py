"""Apply a changed rule set to the live generation in place, without a swap.

For small changes (`deny add`, `deny remove`, allowlist edits, expiry
sweeps): a whole generation for one prefix would cost a second per change.
The new rule set is compiled against the live exact table, and the
difference is written in an order that never lets a packet see less than
the old or the new rules intend:

    1 exact table: moves, deletes, inserts, each one aligned 4-byte store
    2 tries: entries added or changed
    3 summary: changed words (one 8-byte store each)
    4 tries: entries removed

Everything that can fail (parsing, capacity) fails while compiling, before
step 1, so a refused change writes nothing.
"""

from __future__ import annotations

import ctypes
from collections import defaultdict

import numpy as np

from agent import abi
from agent import libbpf as lb
from agent.compile import Clock, compile_rules, exact_hashes
from agent.generation import close_all, live_inner_fds, lpm4_arrays, lpm6_arrays, mapped
from agent.maps import INNER
from agent.node import Node
from agent.rules import RuleSet

TRIES = ("d4lpm", "d6lpm", "a4lpm", "a6lpm", "b4lpm", "b6lpm")
EXPIRY_SLACK_NS = 1_000_000_000  # clock re-pairing jitter is not a change


class ExactPlan:
    """Placer that plans changes to a copy of the live exact table.

    Keeps the table invariant: an address sits in its h2 bucket only while
    its h1 bucket is full; deleting from a full h1 pulls an address that
    overflowed from it back in (one store), then clears its old slot.
    """

    def __init__(self, table: np.ndarray, shift: int) -> None:
        self.t = table.copy()
        self.shift = shift
        self.writes: list[tuple[int, int, int]] = []  # (bucket, slot, value) in order
        self.moved = 0
        self.overflow: dict[int, list[tuple[int, int]]] = defaultdict(list)
        b, s = np.nonzero(self.t)
        h1, _ = exact_hashes(self.t[b, s], shift)
        for home, bucket, slot in zip(h1.tolist(), b.tolist(), s.tolist(), strict=True):
            if home != bucket:
                self.overflow[home].append((bucket, slot))

    def _write(self, bucket: int, slot: int, value: int) -> None:
        self.t[bucket, slot] = value
        self.writes.append((bucket, slot, value))

    def _free(self, bucket: int) -> int:
        free = np.nonzero(self.t[bucket] == 0)[0]
        return int(free[0]) if len(free) else -1

    def insert(self, a: int) -> bool:
        h1, h2 = (int(x[0]) for x in exact_hashes(np.array([a], np.uint32), self.shift))
        slot = self._free(h1)
        if slot >= 0:
            self._write(h1, slot, a)
            return True
        slot = self._free(h2)
        if slot >= 0:
            self._write(h2, slot, a)
            self.overflow[h1].append((h2, slot))
            return True
        return False

    def delete(self, a: int) -> None:
        h1, h2 = (int(x[0]) for x in exact_hashes(np.array([a], np.uint32), self.shift))
        hit = np.nonzero(self.t[h1] == a)[0]
        if len(hit):
            slot = int(hit[0])
            if self.overflow[h1]:
                b2, s2 = self.overflow[h1].pop()
                self._write(h1, slot, int(self.t[b2, s2]))
                self._write(b2, s2, 0)
                self.moved += 1
            else:
                self._write(h1, slot, 0)
            return
        hit = np.nonzero(self.t[h2] == a)[0]
        if len(hit):
            self._write(h2, int(hit[0]), 0)
            self.overflow[h1].remove((h2, int(hit[0])))

    def __call__(self, desired: np.ndarray) -> tuple[None, int, np.ndarray]:
        present = np.sort(self.t[self.t != 0])
        want = np.sort(desired)
        for a in _missing_from(present, want).tolist():
            self.delete(a)
        spill = [a for a in _missing_from(want, present).tolist() if not self.insert(a)]
        return None, self.shift, np.array(spill, np.uint32)


def _missing_from(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elements of sorted `a` not in sorted `b` (by binary search)."""
    if len(b) == 0:
        return a
    i = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return a[b[i] != a]


def _trie_diff(fd: int, kind: str, keys: np.ndarray, vals: np.ndarray, cap: int):
    """(upserts as (key, value) bytes, deletes as key bytes) from live to desired.

    Keys compare as raw bytes (numpy void), sorted and binary-searched.
    """
    spec = INNER[kind]
    ks = spec.key_size
    raw_k, raw_v, n = lb.map_lookup_all(fd, ks, spec.value_size, cap, what=spec.name)
    live_k = np.frombuffer(raw_k, f"V{ks}", count=n)
    live_v = np.frombuffer(raw_v, "<u8", count=n)
    want_k = np.ascontiguousarray(keys).view(f"V{ks}")
    want_v = vals["expires_ns"].astype(np.uint64)
    order = np.argsort(live_k)
    live_k, live_v = live_k[order], live_v[order]
    if n:
        i = np.minimum(np.searchsorted(live_k, want_k), n - 1)
        found = live_k[i] == want_k
        old = np.where(found, live_v[i], 0)
    else:
        found = np.zeros(len(want_k), bool)
        old = np.zeros(len(want_k), np.uint64)
    drift = np.abs(old.astype(np.int64) - want_v.astype(np.int64)) > EXPIRY_SLACK_NS
    changed = ~found | drift | ((old == 0) != (want_v == 0))
    ups = [(k.tobytes(), int(v)) for k, v in zip(want_k[changed], want_v[changed], strict=True)]
    w_sorted = np.sort(want_k)
    if len(w_sorted):
        j = np.minimum(np.searchsorted(w_sorted, live_k), len(w_sorted) - 1)
        gone = w_sorted[j] != live_k
    else:
        gone = np.ones(n, bool)
    return ups, [k.tobytes() for k in live_k[gone]]


def apply_live(node: Node, rules: RuleSet,
               clock: Clock | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Bring the live generation to `rules`: (what changed, the compiled counts)."""
    kinds = ("params", "d4sum", "d4exact", *TRIES)
    fds = live_inner_fds(node, kinds)
    try:
        params = abi.Params.from_buffer_copy(
            lb.map_lookup(fds["params"], ctypes.c_uint32(0), ctypes.sizeof(abi.Params)))
        buckets = lb.map_info(fds["d4exact"]).max_entries
        bsize = INNER["d4exact"].value_size
        with mapped(fds["d4exact"], buckets, bsize, write=False) as mm:
            view = np.frombuffer(mm, np.uint32, count=buckets * abi.EXACT_SLOTS)
            plan = ExactPlan(view.reshape(buckets, abi.EXACT_SLOTS), params.exact_shift)
            del view  # the plan works on its own copy
        # Compiling may refuse the change; nothing has been written yet.
        c = compile_rules(rules, int(params.generation), clock, placer=plan)
        diffs = {}
        for kind in TRIES:
            t = getattr(c, kind)
            keys, vals = lpm4_arrays(t) if kind[1] == "4" else lpm6_arrays(t)
            diffs[kind] = _trie_diff(fds[kind], kind, keys, vals,
                                     lb.map_info(fds[kind]).max_entries)
        # 1 exact table
        with mapped(fds["d4exact"], buckets, bsize, write=True) as mm:
            table = np.frombuffer(mm, np.uint32, count=buckets * abi.EXACT_SLOTS).reshape(
                buckets, abi.EXACT_SLOTS)
            for bucket, slot, value in plan.writes:
                table[bucket, slot] = value
            del table
        # 2 trie additions and changes
        for kind in TRIES:
            for key, value in diffs[kind][0]:
                lb.map_update(fds[kind], key, ctypes.c_uint64(value), what=INNER[kind].name)
        # 3 summary words
        with mapped(fds["d4sum"], abi.SUM_WORDS, 8, write=True) as mm:
            words = np.frombuffer(mm, np.uint64, count=abi.SUM_WORDS)
            changed = np.nonzero(words != c.summary)[0]
            words[changed] = c.summary[changed]
            del words
        # 4 trie removals
        for kind in TRIES:
            for key in diffs[kind][1]:
                lb.map_delete(fds[kind], key, what=INNER[kind].name)
    finally:
        close_all(fds)
    return {"exact_writes": len(plan.writes), "exact_moved": plan.moved,
            "summary_words": len(changed),
            "trie_upserts": sum(len(d[0]) for d in diffs.values()),
            "trie_deletes": sum(len(d[1]) for d in diffs.values())}, c.counts
