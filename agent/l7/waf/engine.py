"""The WAF engine: anomaly scoring over rules indexed by what they need.

A zone's `Waf` is compiled once from the shared rule set and its settings:
rules above the paranoia level and rules excepted everywhere are dropped,
and the rest are indexed per collection (args, headers, ...; rules for one
name, like headers:user-agent, in a sub-index of their own) by what each
top-level alternative of their patterns needs (prefilter.py): a punctuation
or control character, or a word. For each value the engine

  1. finds the special characters it holds with one regex scan and looks up
     the alternatives those wake (cached per set of characters),
  2. finds the words it holds with one regex, a trie of all the index's
     words (most values hold none, and then that is all),
  3. runs only the woken alternatives, each after a quick `in` test of the
     other literals it needs.

Most rules never run on most values. A value that is plain (ASCII without
'%', '&', '\\' or NUL) is scanned raw: decoding cannot change it, and the
other transformations cannot create a special character (cmd_line's line
break to ';' is indexed under the line break too) nor, mostly, a word (see
_Index.build). Any other value is scanned after each of its chains.
Transformation results are cached per value by chain prefix, so rules that
decode alike decode once. tests/unit/test_waf.py checks against running
every pattern on every value that the index never hides a match.

`inspect` sums the scores of the rules that match (each rule counts once
per request, at its first matching target) and blocks at the zone's
threshold. The verdict names rule ids, categories and targets ("args:q",
"headers:user-agent"), never a value: a name that is not a plain token is
reported as its collection alone.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.l7.waf.inputs import Inputs, parse
from agent.l7.waf.prefilter import Need, needs
from agent.l7.waf.rules import Rule, RuleSet, Target, default_rules
from agent.l7.waf.settings import WafException, WafSettings
from agent.l7.waf.transforms import IDENTITY_ON_PLAIN, TRANSFORMS, is_plain

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\]]{1,64}$")
_NAMED = ("args", "cookies", "headers", "files", "files_content")
_CACHE_MAX = 4096                       # candidate sets kept per collection
CLEAN_MEMO = 16384                      # hashes of values known to match nothing
CLEAN_REQUESTS = 16384                  # hashes of whole requests that matched nothing


def hashes_are_secret() -> bool:
    """Is this process's str/bytes hash keyed by a random seed? The memos
    trust that nobody can make an attack collide with a remembered clean
    hash; with PYTHONHASHSEED fixed, anyone could compute the hashes."""
    return os.environ.get("PYTHONHASHSEED", "random") == "random"
_NONE: frozenset[str] = frozenset()
Chain = tuple[str, ...]


@dataclass(frozen=True)
class Match:
    rule_id: str
    category: str
    target: str


@dataclass(frozen=True)
class WafVerdict:
    blocked: bool
    score: int
    matches: tuple[Match, ...] = ()


PASS = WafVerdict(False, 0)


def target_label(collection: str, name: str) -> str:
    """What a verdict may say about where a rule matched: never a value."""
    if collection in _NAMED and _SAFE_NAME.match(name):
        return f"{collection}:{name}"
    return collection


@functools.lru_cache(maxsize=4096)
def _needs(alternative: str) -> Need | None:
    return needs(alternative)


def _plain_chain(chain: Chain) -> Chain:
    return tuple(t for t in chain if t not in IDENTITY_ON_PLAIN)


@dataclass(frozen=True)
class _Entry:
    """One top-level alternative of one rule's patterns, over one target."""

    rule: Rule
    target: Target
    search: Callable[[str], re.Match | None]
    chain: Chain
    plain: Chain                                    # the chain for a plain value
    also: tuple[tuple[str, ...], ...]               # more literals it needs, each a choice


def _trie(words: list[str]) -> str:
    """One regex for a set of words, as a trie (a(?:bc|d)), so the regex engine
    tries a handful of first characters at each position instead of every word."""
    root: dict = {}
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = [re.escape(ch) + emit(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(root)


@dataclass(frozen=True)
class _Words:
    """Words to look for in a value. One regex (a trie of them all) says whether
    any is there (most values hold none); if so, the same trie as a look-ahead
    at every position finds the longest word starting there, which stands for
    the shorter words it starts with too."""

    gate: re.Pattern
    each: re.Pattern
    ids: dict[str, tuple[int, ...]]                 # a word -> entries it and its prefixes wake
    shortest: int

    @classmethod
    def build(cls, words: dict[str, list[int]]) -> _Words:
        trie = _trie(list(words))
        ids = {w: tuple(sorted({i for p, v in words.items() if w.startswith(p) for i in v}))
               for w in words}
        return cls(re.compile(trie), re.compile(f"(?=({trie}))"), ids, min(map(len, words)))

    def find(self, v: str, out: list[int]) -> None:
        if len(v) >= self.shortest and self.gate.search(v) is not None:
            ids = self.ids
            for w in self.each.findall(v):
                out += ids[w]


@dataclass
class _Index:
    """The rules over one collection (or one name in it), indexed by the
    characters and words they need."""

    collection: str
    entries: tuple[_Entry, ...]
    chains: tuple[Chain, ...]                       # distinct, shortest first
    always: tuple[int, ...]                         # entries with no usable need
    by_char: dict[str, tuple[int, ...]]             # special character -> entries
    words: tuple[tuple[Chain, _Words], ...]         # per chain
    plain_all: _Words | None                        # a plain value that no chain changes but
                                                    # for case: every word, on it lower-cased
    plain_words: _Words | None                      # other plain values: the words no chain
    plain_rest: tuple[tuple[Chain, _Words], ...]    # can make, on it lower-cased; the rest
    scan: re.Pattern                                # finds any indexed character
    named: dict[str, _Index]                        # rules for one name only (headers:user-agent)
    matching: tuple[tuple[re.Pattern, _Index], ...]  # rules for the names a regex finds
    cache: dict[frozenset[str], tuple[int, ...]] = field(default_factory=dict)
    flat: tuple[tuple, ...] = ()                    # the entries as tuples, for the hot loop

    def __post_init__(self) -> None:
        self.flat = tuple((e.rule.id, e.rule.category, e.search, e.chain, e.plain, e.also)
                          for e in self.entries)

    @classmethod
    def build(cls, collection: str, targets: list[tuple[Rule, Target]],
              sub: bool = False) -> _Index:
        named: dict[str, list[tuple[Rule, Target]]] = {}
        matching: dict[re.Pattern, list[tuple[Rule, Target]]] = {}
        rest = []
        for rule, target in targets:
            if target.name is not None and not sub:
                named.setdefault(target.name, []).append((rule, target))
            elif target.name_re is not None and not sub:
                matching.setdefault(target.name_re, []).append((rule, target))
            else:
                rest.append((rule, target))
        entries: list[_Entry] = []
        always: list[int] = []
        by_char: dict[str, set[int]] = {}
        by_word: dict[Chain, dict[str, list[int]]] = {}
        for rule, target in rest:
            for alternative in rule.alternatives:
                need = _needs(alternative)
                i = len(entries)
                entries.append(_Entry(rule, target, _compile(alternative).search, rule.transforms,
                                      _plain_chain(rule.transforms), need.also if need else ()))
                if need is None:
                    always.append(i)
                    continue
                chars = set(need.chars)
                if ";" in chars and "cmd_line" in rule.transforms:   # it makes ';' of line breaks
                    chars.add("\n")
                for c in chars:
                    by_char.setdefault(c, set()).add(i)
                for w in need.words:
                    by_word.setdefault(rule.transforms, {}).setdefault(w, []).append(i)
        chars = "".join(sorted(by_char))
        words = tuple((chain, _Words.build(ws))
                      for chain, ws in sorted(by_word.items(), key=lambda x: len(x[0])))
        # A plain value's transformations only lower-case it, fold whitespace, read
        # SQL comments as a space and fold '//' and '/./': none can make a word
        # without whitespace (or, after normalise_path, without '/') that its
        # lower-cased self lacks. So those words are tested once, on that; the
        # rest (and cmd_line's, which drops quotes) on their own chain's result.
        # A plain value that no chain changes at all (_unchanged) takes every
        # word in one test.
        merged: dict[str, list[int]] = {}
        others: dict[Chain, dict[str, list[int]]] = {}
        every: dict[str, list[int]] = {}
        cased = False
        for chain, ws in by_word.items():
            for w, ids in ws.items():
                every.setdefault(w, []).extend(ids)
                cased = cased or not ({"lowercase", "cmd_line"} & set(chain))
                if "lowercase" in chain and "cmd_line" not in chain and \
                        "remove_whitespace" not in chain and not any(c.isspace() for c in w) \
                        and not ("normalise_path" in chain and "/" in w):
                    merged.setdefault(w, []).extend(ids)
                else:
                    others.setdefault(_plain_chain(chain), {}).setdefault(w, []).extend(ids)
        return cls(collection, tuple(entries),
                   tuple(sorted({e.chain for e in entries}, key=len)),
                   tuple(always), {c: tuple(sorted(v)) for c, v in by_char.items()}, words,
                   _Words.build(every) if every and not cased else None,
                   _Words.build(merged) if merged else None,
                   tuple((c, _Words.build(ws)) for c, ws in sorted(others.items())),
                   re.compile(f"[{re.escape(chars)}]" if chars else "(?!)"),
                   {n: cls.build(collection, ts, sub=True) for n, ts in named.items()},
                   tuple((rx, cls.build(collection, ts, sub=True)) for rx, ts in matching.items()))

    def candidates(self, specials: frozenset[str]) -> tuple[int, ...]:
        found = self.cache.get(specials)
        if found is None:
            woken = set(self.always)
            for c in specials:
                woken.update(self.by_char.get(c, ()))
            found = tuple(sorted(woken))
            if len(self.cache) >= _CACHE_MAX:       # a bound, not an LRU: refilling is cheap
                self.cache.clear()
            self.cache[specials] = found
        return found


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern)


@dataclass(frozen=True)
class _Exception:
    ids: frozenset[str]
    path_prefix: str
    collection: str | None
    name: str | None

    def covers(self, collection: str, name: str) -> bool:
        if self.collection is None:
            return True
        return self.collection == collection and (self.name is None or
                                                  self.name == name.lower())


class Waf:
    """One zone's compiled WAF; immutable after construction, shared by reference
    (the candidate caches fill as it runs, on the front end's one thread)."""

    def __init__(self, settings: WafSettings, rules: RuleSet | None = None) -> None:
        self.settings = settings
        self.rules = rules or default_rules()
        everywhere: set[str] = set()
        conditional = []
        for exc in settings.exceptions:
            ids = self._resolve(exc)
            if exc.path_prefix == "/" and exc.target is None:
                everywhere |= ids
                continue
            collection, name = None, None
            if exc.target is not None:
                collection, _, name = exc.target.partition(":")
                name = name.lower() or None
            conditional.append(_Exception(frozenset(ids), exc.path_prefix, collection, name))
        self._exceptions = tuple(conditional)
        active = [r for r in self.rules.rules
                  if r.paranoia <= settings.paranoia and r.id not in everywhere]
        self._checks = tuple(r for r in active if r.check is not None)
        per_collection: dict[str, list[tuple[Rule, Target]]] = {}
        for rule in active:
            for target in rule.targets:
                per_collection.setdefault(target.collection, []).append((rule, target))
        self._indexes = tuple(_Index.build(c, e) for c, e in per_collection.items())
        self._scores = {r.id: r.score for r in active}
        self._clean: dict[int, None] = {}
        self._clean_requests: dict[int, None] = {}
        self._memo = hashes_are_secret()

    def _resolve(self, exc: WafException) -> set[str]:
        by_id = self.rules.by_id
        unknown = [r for r in exc.rules if r not in by_id]
        if unknown:
            raise ValueError(f"unknown rule id(s): {', '.join(unknown)}")
        cats = set(exc.categories)
        return set(exc.rules) | {r.id for r in self.rules.rules if r.category in cats}

    def forget(self) -> None:
        """Empty the memos of clean values and requests (benchmarks: every
        request unseen, as an attacker's are)."""
        self._clean.clear()
        self._clean_requests.clear()

    @property
    def rule_ids(self) -> tuple[str, ...]:
        """The rules this zone runs (paranoia and everywhere-exceptions applied)."""
        return tuple(self._scores)

    def inspect(self, method: str, target: str, headers: Sequence[tuple[str, str]],
                body: bytes) -> WafVerdict:
        """Score one request; headers have lower-case names, in order."""
        if not self.settings.enabled:
            return PASS
        # The verdict is a function of the request alone: one seen before
        # that matched nothing (the same object fetched again and again)
        # passes again. Remembered by a salted hash only, never by value.
        if type(headers) is not tuple:
            headers = tuple(headers)
        key = hash((method, target, headers, body)) if self._memo else None
        if key in self._clean_requests:
            return PASS
        inp = parse(method, target, headers, body)
        skip: set[str] = set()
        targeted: list[_Exception] = []
        if self._exceptions:
            path = inp.normalised_path
            for exc in self._exceptions:
                if path.startswith(exc.path_prefix):
                    if exc.collection is None:
                        skip |= exc.ids
                    else:
                        targeted.append(exc)
        hits: dict[str, Match] = {}
        self._run_checks(inp, skip, targeted, hits)
        for index in self._indexes:
            items = inp.values.get(index.collection)
            if items:
                self._scan(index, items, skip, targeted, hits)
        if not hits and key is not None:
            clean = self._clean_requests
            if len(clean) >= CLEAN_REQUESTS:
                del clean[next(iter(clean))]   # the oldest
            clean[key] = None
            return PASS
        score = sum(self._scores[rid] for rid in hits)
        return WafVerdict(score >= self.settings.threshold, score, tuple(hits.values()))

    def _scan(self, index: _Index, items: list[tuple[str, str]], skip: set[str],
              targeted: list[_Exception], hits: dict[str, Match]) -> None:
        cls = type(self)
        named, matching = index.named, index.matching
        clean = self._clean
        for name, value in items:
            if not value:
                continue
            # Most values (Host, User-Agent, a path) repeat across requests
            # and match nothing: remember that, by a salted hash only (no
            # value is kept), when no exception or earlier hit shaped it.
            key = hash((index.collection, name, value)) \
                if self._memo and not (hits or skip or targeted) else None
            if key is not None and key in clean:
                continue
            cache: dict[Chain, str] = {(): value}
            plain = is_plain(value)
            if index.entries:
                cls._scan_value(index, name, value, plain, cache, skip, targeted, hits)
            if named:
                sub = named.get(name.lower())
                if sub is not None:
                    cls._scan_value(sub, name, value, plain, cache, skip, targeted, hits)
            for name_re, sub in matching:
                if name_re.search(name):
                    cls._scan_value(sub, name, value, plain, cache, skip, targeted, hits)
            if key is not None and not hits:
                if len(clean) >= CLEAN_MEMO:
                    del clean[next(iter(clean))]   # the oldest
                clean[key] = None

    @staticmethod
    def _scan_value(index: _Index, name: str, value: str, plain: bool,
                    cache: dict[Chain, str], skip: set[str], targeted: list[_Exception],
                    hits: dict[str, Match]) -> None:
        if plain:
            found = index.scan.findall(value)
            specials = frozenset(found) if found else _NONE
        else:
            found = []
            for chain in index.chains:
                v = cache.get(chain)
                found += index.scan.findall(v if v is not None
                                            else _transformed(value, chain, cache))
            specials = frozenset(found)
        woken = index.candidates(specials)
        extra: list[int] = []
        if plain and index.plain_all is not None and _unchanged(value):
            index.plain_all.find(value.lower(), extra)
        elif plain:
            if index.plain_words is not None:
                index.plain_words.find(value.lower(), extra)
            for chain, words in index.plain_rest:
                if words.shortest <= len(value):
                    v = cache.get(chain)
                    words.find(v if v is not None else _transformed(value, chain, cache), extra)
        else:
            for chain, words in index.words:
                v = cache.get(chain)
                words.find(v if v is not None else _transformed(value, chain, cache), extra)
        if extra:
            woken = sorted(set(woken).union(extra))
        entries = index.flat
        for i in woken:
            rid, category, search, chain, plain_chain, also = entries[i]
            if rid in hits or rid in skip:
                continue
            key = plain_chain if plain else chain
            v = cache.get(key)
            if v is None:
                v = _transformed(value, key, cache)
            if also and not _has_all(v, also):
                continue
            if search(v) is None:
                continue
            if targeted and any(rid in x.ids and x.covers(index.collection, name)
                                for x in targeted):
                continue
            hits[rid] = Match(rid, category, target_label(index.collection, name))

    def _run_checks(self, inp: Inputs, skip: set[str], targeted: list[_Exception],
                    hits: dict[str, Match]) -> None:
        for rule in self._checks:
            if rule.id in skip:
                continue
            where = _CHECKS[rule.check](inp, rule.limit)
            if where is None:
                continue
            collection, name = where
            if targeted and any(rule.id in e.ids and e.covers(collection, name)
                                for e in targeted):
                continue
            hits[rule.id] = Match(rule.id, rule.category, target_label(collection, name))


_CHANGES = re.compile(r"['\"^$\t\n\r\x0b\x0c]|//|/\./|  ")


def _unchanged(value: str) -> bool:
    """Whether every chain leaves this plain value as it is, but for case: no
    quote, caret, '$' or line break for cmd_line, no '//' or '/./' for
    normalise_path, no whitespace but single spaces to fold."""
    return _CHANGES.search(value) is None


def _has_all(v: str, also: tuple[tuple[str, ...], ...]) -> bool:
    for choice in also:
        for lit in choice:
            if lit in v:
                break
        else:
            return False
    return True


def _transformed(value: str, chain: Chain, cache: dict[Chain, str]) -> str:
    """The value through `chain`, reusing (and filling) the cache of its prefixes."""
    n = len(chain)
    while n and chain[:n] not in cache:
        n -= 1
    out = cache[chain[:n]]
    for i in range(n, len(chain)):
        out = TRANSFORMS[chain[i]](out)
        cache[chain[:i + 1]] = out
    return out


# -- structural checks: each returns where it found the anomaly, or None -----------------


def _host_missing(inp: Inputs, _limit: int | None) -> tuple[str, str] | None:
    return ("headers", "host") if inp.host is None or not inp.host.strip() else None


def _body_on_get(inp: Inputs, _limit: int | None) -> tuple[str, str] | None:
    return ("body", "") if inp.has_body and inp.method in ("GET", "HEAD") else None


def _body_invalid(inp: Inputs, _limit: int | None) -> tuple[str, str] | None:
    return ("body", "") if inp.body_error is not None else None


def _args_count(inp: Inputs, limit: int | None) -> tuple[str, str] | None:
    return ("args", "") if inp.arg_count > (limit or 0) else None


def _arg_length(inp: Inputs, limit: int | None) -> tuple[str, str] | None:
    """Query arguments and cookies (names and values): bodies may be long."""
    limit = limit or 0
    for name, value in inp.query_args:
        if len(value) > limit or len(name) > limit:
            return ("args", name)
    for name, value in inp.values.get("cookies", ()):
        if len(value) > limit or len(name) > limit:
            return ("cookies", name)
    return None


def _truncated(inp: Inputs, _limit: int | None) -> tuple[str, str] | None:
    return ("body", "") if inp.truncated else None


def _header_conflict(inp: Inputs, _limit: int | None) -> tuple[str, str] | None:
    """Framing headers twice, Content-Length beside Transfer-Encoding, or a
    Transfer-Encoding other than chunked: how request smuggling starts."""
    seen: set[str] = set()
    for name, value in inp.framing:
        if name in seen:
            return ("headers", name)
        seen.add(name)
        if name == "transfer-encoding" and value.strip().lower() != "chunked":
            return ("headers", name)
    if "transfer-encoding" in seen and "content-length" in seen:
        return ("headers", "transfer-encoding")
    return None


def _header_length(inp: Inputs, limit: int | None) -> tuple[str, str] | None:
    name, value = inp.longest_header
    return ("headers", name) if len(value) > (limit or 0) else None


_CHECKS = {"host_missing": _host_missing, "body_on_get": _body_on_get,
           "body_invalid": _body_invalid, "args_count": _args_count,
           "arg_length": _arg_length, "truncated": _truncated,
           "header_conflict": _header_conflict, "header_length": _header_length}
