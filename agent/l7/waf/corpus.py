"""The WAF tuning corpora: YAML lists of requests labelled attack or benign.

    - id: sqli-001            # unique in the file
      kind: attack            # attack | benign
      category: sqli          # attacks: one of rules.CATEGORIES; benign: free text
      method: GET
      target: "/search?q=1%27%20OR%20%271%27%3D%271"   # the request-target as sent
      headers: [["Host", "shop.example.com"], ["User-Agent", "..."]]
      body: "..."             # optional, UTF-8 text

Shared by tests/waf_corpus (ours), bench/waf_heldout (written by someone
else, for figures only) and the L7 benchmark, which sends the same
requests over the wire. An entry without `headers` gets a Host header
(`example.com`), since an HTTP/1.1 request cannot go without one; give
`headers: []` for a request with no headers at all. Errors name the file,
the entry and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.l7.waf.rules import CATEGORIES

DEFAULT_HEADERS = (("Host", "example.com"),)
_FIELDS = {"id", "kind", "category", "method", "target", "headers", "body", "description",
           "note"}


class CorpusError(ValueError):
    """A corpus file is invalid; the message names the file, entry and field."""


@dataclass(frozen=True)
class CorpusEntry:
    id: str
    kind: str                                  # attack | benign
    category: str
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]       # as written (names keep their case)
    body: bytes = b""

    @property
    def is_attack(self) -> bool:
        return self.kind == "attack"

    @property
    def lower_headers(self) -> tuple[tuple[str, str], ...]:
        """The headers as the front end hands them on: lower-case names, in order."""
        return tuple((n.lower(), v) for n, v in self.headers)


def _entry(raw: object, index: int, source: str) -> CorpusEntry:
    at = f"{source}: entry [{index}]"
    if not isinstance(raw, dict):
        raise CorpusError(f"{at}: expected a mapping")
    eid = raw.get("id")
    if not isinstance(eid, str) or not eid:
        raise CorpusError(f"{at}: id: missing")
    at = f"{source}: {eid}"
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise CorpusError(f"{at}: {unknown[0]}: not a field")
    kind = raw.get("kind")
    if kind not in ("attack", "benign"):
        raise CorpusError(f"{at}: kind: {kind!r} is not attack or benign")
    category = str(raw.get("category", ""))
    if kind == "attack" and category not in CATEGORIES:
        raise CorpusError(f"{at}: category: {category!r} is not one of {', '.join(CATEGORIES)}")
    method, target = raw.get("method"), raw.get("target")
    if not isinstance(method, str) or not method:
        raise CorpusError(f"{at}: method: missing")
    if not isinstance(target, str) or not target:
        raise CorpusError(f"{at}: target: missing")
    if "headers" in raw:
        pairs = raw["headers"] or []
        if not isinstance(pairs, list) or not all(
                isinstance(p, list | tuple) and len(p) == 2 and
                all(isinstance(x, str) for x in p) for p in pairs):
            raise CorpusError(f"{at}: headers: expected a list of [name, value] string pairs")
        headers = tuple((n, v) for n, v in pairs)
    else:
        headers = DEFAULT_HEADERS
    body = raw.get("body", "")
    if body is None:
        body = ""
    if not isinstance(body, str):
        raise CorpusError(f"{at}: body: expected text")
    return CorpusEntry(eid, kind, category, method, target, headers, body.encode("utf-8"))


def load_corpus(path: Path | str) -> list[CorpusEntry]:
    path = Path(path)
    try:
        doc = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as e:
        raise CorpusError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CorpusError(f"{path.name}: not YAML: {e}") from None
    if not isinstance(doc, list):
        raise CorpusError(f"{path.name}: expected a list of entries")
    entries = [_entry(raw, i, path.name) for i, raw in enumerate(doc)]
    seen: set[str] = set()
    for e in entries:
        if e.id in seen:
            raise CorpusError(f"{path.name}: {e.id}: id: duplicate")
        seen.add(e.id)
    return entries


def load_corpora(directory: Path | str) -> list[CorpusEntry]:
    """attacks.yaml and benign.yaml of a directory, ids unique across both."""
    directory = Path(directory)
    entries = []
    for name in ("attacks.yaml", "benign.yaml"):
        if (directory / name).exists():
            entries += load_corpus(directory / name)
    ids = [e.id for e in entries]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise CorpusError(f"{directory}: id {dup[0]} is in both files")
    return entries
