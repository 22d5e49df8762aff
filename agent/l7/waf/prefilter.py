"""Prefilters derived from a rule's own patterns, so most rules never run.

Running every rule's regex over every value would cost tens of
microseconds a value in Python (an alternation of words is tried at every
position). But a regex cannot match without certain literals:
`<\\s*script[\\s/>]` needs "script" and "<", a quote-breaking SQL rule
needs a quote, a shell rule one of ; | & ` $. So each pattern is first
split at its top-level '|' into alternatives (`split_alternatives`), and
for each alternative `needs()` walks the parsed regex: every item of a
sequence must be present in a match, so each item with a derivable
requirement (a set of literals, one of which must occur) is a filter.

  primary    the cheapest requirement, indexed: a special character
             (punctuation, control or non-ASCII: the engine finds which of
             those a value holds with one regex scan and wakes all rules
             needing them at once) or a few words ("union"), tested with `in`
  also       up to MAX_ALSO more requirements of the same alternative,
             tested with `in` before its regex runs (php-functions is woken
             by "(", then asks for one of its function names)

An alternative nothing can be derived from (a case-insensitive scope, a
negated class, an optional part only) gets None and always runs. The
analysis is conservative: it only ever names literals that every match
contains. It reads CPython's own regex parser (re._parser); if that is
missing or fails, the rule simply always runs.
"""

from __future__ import annotations

from dataclasses import dataclass

try:                                        # CPython 3.11+
    from re import _constants as _c
    from re import _parser as _p
except ImportError:                         # pragma: no cover - other interpreters
    _p = _c = None

MAX_WORDS = 12                              # more words than this are no filter
MAX_ALSO = 3
MAX_ALSO_WORDS = 48                         # a second check may be a longer list
WEAK = 1.5                                  # a requirement costing more is no filter
_COMMON = frozenset(".-/,:_=();")          # punctuation that ordinary values are full of

Lits = frozenset[str]


def is_special(ch: str) -> bool:
    """Characters the engine scans for: anything but letters, digits and space."""
    return not (ch.isascii() and (ch.isalnum() or ch == " "))


@dataclass(frozen=True)
class Need:
    chars: frozenset[str]                   # primary: one of these characters, or
    words: tuple[str, ...]                  # one of these substrings
    also: tuple[tuple[str, ...], ...] = ()  # and then one of each of these


def split_alternatives(pattern: str) -> list[str]:
    """The pattern's top-level alternatives (a|b(c|d) -> a, b(c|d))."""
    parts, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]" or (i > 0 and pattern[i - 1] == "[")
        elif ch == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "^":
                i += 1
            if pattern[i + 1:i + 2] == "]":     # a ']' first in a class is a literal
                i += 1
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return parts


def _char_cost(c: str) -> float:
    if c in _COMMON:
        return 0.3
    return 0.02 if c.isascii() and c.isprintable() else 0.005


def _representation(lits: Lits) -> tuple[frozenset[str], tuple[str, ...]]:
    """A literal with a rare special character is stood for by that character
    (the scan tests all characters at once); any other literal is a word,
    tested alone, unless there are too many words: then common punctuation
    stands in for those that have some."""
    chars, words = set(), []
    for lit in lits:
        rare = [c for c in lit if is_special(c) and c not in _COMMON]
        if rare:
            chars.add(rare[0])
        elif len(lit) == 1 and is_special(lit):
            chars.add(lit)
        else:
            words.append(lit)
    if len(words) > MAX_WORDS:
        for lit in [w for w in words if any(is_special(c) for c in w)]:
            words.remove(lit)
            chars.add(next(c for c in lit if is_special(c)))
    return frozenset(chars), tuple(sorted(words))


def _cost(lits: Lits) -> float:
    chars, words = _representation(lits)
    if len(words) > MAX_WORDS:
        return 9.0
    cost = sum(_char_cost(c) for c in chars)
    # short words are in many ordinary values, so they filter little (but a
    # pair of punctuation, like "..", "${" or "<?", is rare)
    return cost + sum(0.1 if len(w) == 2 and all(map(is_special, w)) else
                      {1: 9.0, 2: 0.6, 3: 0.3, 4: 0.1}.get(len(w), 0.04) for w in words)


def _also_cost(lits: Lits) -> float:
    """How good a second check a requirement makes: few, long literals (a lone
    letter, digit or space is in nearly every value, so no check at all)."""
    if len(lits) > MAX_ALSO_WORDS or any(len(x) == 1 and not is_special(x) for x in lits):
        return 9.0
    return sum({1: 0.5, 2: 0.3, 3: 0.1}.get(len(x), 0.04) for x in lits)


def _candidates(items: list, icase: bool) -> list[Lits]:
    """The requirements of a sequence: every item's must hold, so each is one."""
    cands, run = [], []
    for op, av in items:
        if op is _c.LITERAL and not (icase and chr(av).isalpha()):
            run.append(chr(av))
            continue
        if op is _c.MAX_REPEAT and av[0] >= 1 and len(av[2]) == 1 and \
                av[2][0][0] is _c.LITERAL and not icase:
            run.append(chr(av[2][0][1]) * min(av[0], 4))   # \.\.+ needs ".."
            cands.append(frozenset(["".join(run)]))
            run = []
            continue
        if run:
            cands.append(frozenset(["".join(run)]))
            run = []
        need = _item(op, av, icase)
        if need is not None:
            cands.append(need)
    if run:
        cands.append(frozenset(["".join(run)]))
    return cands


def _best(cands: list[Lits]) -> Lits | None:
    best, best_cost = None, WEAK
    for lits in cands:
        cost = _cost(lits)
        if cost < best_cost:
            best, best_cost = lits, cost
    return best


def _seq(items: list, icase: bool) -> Lits | None:
    return _best(_candidates(items, icase))


def _item(op, av, icase: bool) -> Lits | None:
    if op is _c.LITERAL:
        return None if icase and chr(av).isalpha() else frozenset([chr(av)])
    if op is _c.IN:
        chars = set()
        for sub, val in av:
            if sub is _c.LITERAL:
                chars.add(chr(val))
            elif sub is _c.RANGE and val[1] - val[0] < 128:
                chars.update(chr(x) for x in range(val[0], val[1] + 1))
            else:                           # NEGATE, CATEGORY, wide ranges
                return None
        if icase and any(c.isalpha() for c in chars):
            return None
        return frozenset(chars)
    if op is _c.SUBPATTERN:
        _group, add_flags, del_flags, sub = av
        if add_flags & _c.SRE_FLAG_IGNORECASE:
            icase = True
        elif del_flags & _c.SRE_FLAG_IGNORECASE:
            icase = False
        return _seq(list(sub), icase)
    if op is _c.BRANCH:
        out: set[str] = set()
        for branch in av[1]:
            need = _seq(list(branch), icase)
            if need is None:
                return None
            out |= need
        return frozenset(out)
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)):
        lo, _hi, sub = av
        sub = list(sub)
        if lo >= 2 and len(sub) == 1 and sub[0][0] is _c.LITERAL and not icase:
            return frozenset([chr(sub[0][1]) * min(lo, 4)])     # \.{2,} needs ".."
        return _seq(sub, icase) if lo >= 1 else None
    if op is getattr(_c, "ATOMIC_GROUP", None):
        return _seq(list(av), icase)
    return None                             # AT, ANY, NOT_LITERAL, ASSERT*, GROUPREF, ...


def needs(pattern: str) -> Need | None:
    """What a value must hold for one alternative to match; None: always run it."""
    if _p is None:
        return None
    try:
        items = list(_p.parse(pattern))
    except Exception:                       # the analysis is optional: always run
        return None
    cands = _candidates(items, False)
    primary = _best(cands)
    if primary is None:
        return None
    chars, words = _representation(primary)
    if len(words) > MAX_WORDS:
        return None
    also = sorted((c for c in cands if c != primary and _also_cost(c) < WEAK),
                  key=_also_cost)[:MAX_ALSO]
    return Need(chars, words, tuple(tuple(sorted(a, key=len, reverse=True)) for a in also))
