"""The managed rules file: loaded, checked and compiled once per process.

The format (agent/l7/waf/rules.yaml is the reference; a maintainer adds a
rule by appending an entry):

    - id: sqli-union-select          # unique; what verdicts and exceptions name
      category: sqli                 # one of CATEGORIES
      paranoia: 1                    # 1..4: runs when the zone's level is >= this
      score: critical                # critical 5, error 4, warning 3, notice 2, or 1..100
      targets: [args, cookies, headers:user-agent, args:/^(page|file)$/]
      transforms: [url_decode, lowercase]      # names from transforms.TRANSFORMS
      patterns: ['\\bunion\\s+select\\b']      # Python regexes; any one matching
      description: UNION SELECT joins a query of the attacker's own

or, instead of `patterns` and `transforms`, a built-in structural check:

      check: arg_length              # one of CHECKS (engine.py says what each looks at)
      limit: 4096                    # for the checks that take one

A target is a collection (inputs.py lists them), `collection:name` for one
name (case-insensitive), or `collection:/regex/` for the names the regex
finds. Besides `rules`, the file may hold `anchors`, a place for the YAML
anchors (shared transformation chains and target lists) that rules refer to.

Patterns must not use global inline flags ((?i) at the start): lower-case
the value with the `lowercase` transform, or scope the flag as (?i:...).
A rule's patterns are joined into one alternation, so backreferences and
named groups are allowed only in a rule with one pattern. Every problem is
an error that names the file, the rule id and the field, e.g.
    rules.yaml: rule xss-script-tag: patterns[0]: not a regular expression: ...
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.l7.waf.prefilter import split_alternatives
from agent.l7.waf.transforms import TRANSFORMS

CATEGORIES = ("sqli", "xss", "lfi", "rfi", "rce", "php", "java", "scanner", "protocol")
SEVERITIES = {"critical": 5, "error": 4, "warning": 3, "notice": 2}
COLLECTIONS = ("method", "uri", "path", "args", "args_names", "cookies", "cookies_names",
               "headers", "headers_names", "files", "files_content", "form", "body", "text")
# check name -> whether it takes a limit
CHECKS = {"host_missing": False, "body_on_get": False, "body_invalid": False,
          "args_count": True, "arg_length": True, "truncated": False, "header_conflict": False,
          "header_length": True}
DEFAULT_RULES = Path(__file__).resolve().parent / "rules.yaml"
_GROUP_REFS = re.compile(r"\\[1-9]|\(\?P[<=]")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_FIELDS = {"id", "category", "paranoia", "score", "targets", "transforms", "patterns",
           "check", "limit", "description"}


class RulesError(ValueError):
    """The rules file is invalid; the message names the file, rule and field."""


@dataclass(frozen=True)
class Target:
    collection: str
    name: str | None = None                    # exact, lower-cased
    name_re: re.Pattern | None = None

    def accepts(self, name: str) -> bool:
        if self.name is not None:
            return name.lower() == self.name
        if self.name_re is not None:
            return self.name_re.search(name) is not None
        return True


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    paranoia: int
    score: int
    description: str
    targets: tuple[Target, ...] = ()
    transforms: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    regex: re.Pattern | None = None            # the patterns as one alternation
    alternatives: tuple[str, ...] = ()         # their top-level alternatives, one by one
    check: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    source: str

    @functools.cached_property
    def by_id(self) -> dict[str, Rule]:
        return {r.id: r for r in self.rules}


def _target(text: object, where: str) -> Target:
    if not isinstance(text, str) or not text:
        raise RulesError(f"{where}: {text!r} is not a target")
    collection, colon, name = text.partition(":")
    if collection not in COLLECTIONS:
        raise RulesError(f"{where}: {collection!r} is not a collection "
                         f"(known: {', '.join(COLLECTIONS)})")
    if not colon:
        return Target(collection)
    if len(name) >= 2 and name.startswith("/") and name.endswith("/"):
        try:
            return Target(collection, name_re=re.compile(name[1:-1], re.IGNORECASE))
        except re.error as e:
            raise RulesError(f"{where}: not a regular expression: {e}") from None
    if not name:
        raise RulesError(f"{where}: an empty name after {collection}:")
    return Target(collection, name=name.lower())


def _score(value: object, where: str) -> int:
    if isinstance(value, str) and value in SEVERITIES:
        return SEVERITIES[value]
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100:
        return value
    raise RulesError(f"{where}: {value!r} is not a score (critical, error, warning, notice "
                     "or 1..100)")


def _strings(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{where}: expected a list of strings")
    return tuple(value)


def _rule(entry: object, index: int, source: str) -> Rule:
    if not isinstance(entry, dict):
        raise RulesError(f"{source}: rules[{index}]: expected a mapping")
    rid = entry.get("id")
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise RulesError(f"{source}: rules[{index}]: id: {rid!r} is not an id "
                         "(a-z 0-9 _ . -, up to 64)")
    at = f"{source}: rule {rid}"
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise RulesError(f"{at}: {unknown[0]}: not a field (fields: {', '.join(sorted(_FIELDS))})")
    category = entry.get("category")
    if category not in CATEGORIES:
        raise RulesError(f"{at}: category: {category!r} is not one of {', '.join(CATEGORIES)}")
    paranoia = entry.get("paranoia", 1)
    if not isinstance(paranoia, int) or isinstance(paranoia, bool) or not 1 <= paranoia <= 4:
        raise RulesError(f"{at}: paranoia: {paranoia!r} is not 1, 2, 3 or 4")
    if "score" not in entry:
        raise RulesError(f"{at}: score: missing")
    score = _score(entry["score"], f"{at}: score")
    description = entry.get("description", "")
    if not isinstance(description, str) or not description.strip():
        raise RulesError(f"{at}: description: missing (say what the rule catches)")
    common = {"id": rid, "category": category, "paranoia": paranoia, "score": score,
              "description": " ".join(description.split())}
    if "check" in entry:
        return _check_rule(entry, at, common)
    if "patterns" not in entry:
        raise RulesError(f"{at}: patterns: missing (or give a check)")
    if "limit" in entry:
        raise RulesError(f"{at}: limit: only a check takes a limit")
    targets = tuple(_target(t, f"{at}: targets[{i}]")
                    for i, t in enumerate(_strings(entry.get("targets"), f"{at}: targets")))
    if not targets:
        raise RulesError(f"{at}: targets: at least one is needed")
    transforms = _strings(entry.get("transforms", []), f"{at}: transforms")
    for i, t in enumerate(transforms):
        if t not in TRANSFORMS:
            raise RulesError(f"{at}: transforms[{i}]: {t!r} is not a transformation "
                             f"(known: {', '.join(TRANSFORMS)})")
    patterns = _strings(entry["patterns"], f"{at}: patterns")
    if not patterns:
        raise RulesError(f"{at}: patterns: at least one is needed")
    for i, p in enumerate(patterns):
        try:
            re.compile(p)
        except re.error as e:
            raise RulesError(f"{at}: patterns[{i}]: not a regular expression: {e}") from None
        if p.startswith("(?") and re.match(r"\(\?[aiLmsux]+\)", p):
            raise RulesError(f"{at}: patterns[{i}]: global inline flags are not allowed "
                             "(use a transform, or scope them: (?i:...))")
    if len(patterns) > 1 and any(_GROUP_REFS.search(p) for p in patterns):
        raise RulesError(f"{at}: patterns: a rule with backreferences or named groups has "
                         "one pattern (the patterns are joined into one alternation)")
    # Joined with a bare '|', the weakest operator, so the meaning is the same.
    regex = re.compile("|".join(patterns))
    if any(_GROUP_REFS.search(p) for p in patterns):
        alternatives = patterns
    else:
        alternatives = tuple(a for p in patterns for a in split_alternatives(p))
    return Rule(**common, targets=targets, transforms=transforms, patterns=patterns,
                regex=regex, alternatives=alternatives)


def _check_rule(entry: dict, at: str, common: dict) -> Rule:
    check = entry["check"]
    if check not in CHECKS:
        raise RulesError(f"{at}: check: {check!r} is not a check (known: {', '.join(CHECKS)})")
    for name in ("patterns", "transforms", "targets"):
        if name in entry:
            raise RulesError(f"{at}: {name}: a check rule has no {name}")
    limit = entry.get("limit")
    if CHECKS[check]:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise RulesError(f"{at}: limit: check {check} needs a limit >= 1, got {limit!r}")
    elif limit is not None:
        raise RulesError(f"{at}: limit: check {check} takes no limit")
    return Rule(**common, check=check, limit=limit)


def parse_rules(text: str, source: str = "rules.yaml") -> RuleSet:
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise RulesError(f"{source}: not YAML: {e}") from None
    entries = doc.get("rules") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise RulesError(f"{source}: expected a mapping with a list under 'rules'")
    extra = sorted(set(doc) - {"rules", "anchors"})
    if extra:
        raise RulesError(f"{source}: {extra[0]}: not a top-level key (rules, anchors)")
    rules, seen = [], set()
    for i, entry in enumerate(entries):
        rule = _rule(entry, i, source)
        if rule.id in seen:
            raise RulesError(f"{source}: rule {rule.id}: id: duplicate (rules[{i}])")
        seen.add(rule.id)
        rules.append(rule)
    return RuleSet(tuple(rules), source)


def load_rules(path: Path | str) -> RuleSet:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RulesError(f"{path}: cannot read: {e.strerror}") from None
    return parse_rules(text, path.name)


@functools.lru_cache(maxsize=1)
def default_rules() -> RuleSet:
    """The shipped rules, loaded once per process and shared by every zone."""
    return load_rules(DEFAULT_RULES)
