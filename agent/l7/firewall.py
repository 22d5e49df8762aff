"""Firewall rules: a small expression language over request fields.

    ip.src in {192.0.2.0/24 2001:db8::/32} and not http.request.method eq "GET"
    http.host eq "shop.example.eu" and http.request.uri.path matches "^/admin"
    ip.geoip.country in {"KP" "RU"} or http.user_agent contains "sqlmap"
    http.request.headers["x-debug"] ne "" and http.cookie has "session"

Grammar (keywords and fields are lower case; strings are "double quoted"
with \\" and \\\\ escapes):

    expr    := term ("or" term)*
    term    := factor ("and" factor)*
    factor  := "not" factor | "(" expr ")" | test
    test    := field op value | field "in" "{" value* "}" | field "has" string
    op      := eq | ne | contains | matches | lt | le | gt | ge
    field   := ip.src | ip.geoip.country | http.request.method | http.host
             | http.request.uri | http.request.uri.path | http.request.uri.query
             | http.user_agent | http.request.headers["name"] | http.cookie
    value   := string | number | address or CIDR (for ip.src)

Every expression is parsed and type-checked when the config is loaded;
an error names the column and what was expected there. A rule is an
expression and an action: block, challenge, allow (skip the rest of the
security stages), log (count, go on) or skip (skip the rest of the
firewall rules). Rules run in order; the first block, challenge, allow or
skip decides. Nothing here keeps a request or logs it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Action = Literal["block", "challenge", "allow", "log", "skip"]
ACTIONS: tuple[str, ...] = ("block", "challenge", "allow", "log", "skip")
MAX_EXPRESSION = 4096
MAX_SET = 10_000


class RuleError(ValueError):
    """An expression that does not parse or type-check; says where and why."""

    def __init__(self, expression: str, column: int, why: str) -> None:
        super().__init__(f"column {column}: {why}\n  {expression}\n  {' ' * (column - 1)}^")
        self.column, self.why = column, why


@dataclass(slots=True)  # per request: frozen ones cost more to build
class RequestView:
    """What rules may look at; built once per request by the pipeline."""

    src: str                                  # client address
    method: str
    host: str
    path: str
    query: str
    headers: Mapping[str, str]                # lower-case names
    cookies: frozenset[str] = frozenset()     # cookie names only
    country: str = ""                         # from the configured table

    @property
    def uri(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src)


# -- tokens ----------------------------------------------------------------------------

_TOKEN = re.compile(r'''
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<header>http\.request\.headers\[\s*"(?:[^"\\]|\\.)*"\s*\])
  | (?P<punct>[(){}])
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<word>[A-Za-z0-9_.:/*-]+)
''', re.VERBOSE)

_SYMBOLIC = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    col: int


def _tokens(expr: str) -> list[_Tok]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise RuleError(expr, pos + 1, f"unexpected character {expr[pos]!r}")
        if m.lastgroup != "ws":
            out.append(_Tok(m.lastgroup, m.group(), pos + 1))
        pos = m.end()
    out.append(_Tok("end", "", len(expr) + 1))
    return out


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


# -- fields ----------------------------------------------------------------------------

Getter = Callable[[RequestView], object]

STRING_FIELDS: dict[str, Getter] = {
    "http.request.method": lambda r: r.method,
    "http.host": lambda r: r.host.lower(),
    "http.request.uri": lambda r: r.uri,
    "http.request.uri.path": lambda r: r.path,
    "http.request.uri.query": lambda r: r.query,
    "http.user_agent": lambda r: r.headers.get("user-agent", ""),
    "ip.geoip.country": lambda r: r.country,
}
FIELDS = (*STRING_FIELDS, "ip.src", 'http.request.headers["name"]', "http.cookie")

Predicate = Callable[[RequestView], bool]


# -- the parser ------------------------------------------------------------------------


class _Parser:
    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.toks = _tokens(expr)
        self.i = 0

    def error(self, tok: _Tok, why: str) -> RuleError:
        return RuleError(self.expr, tok.col, why)

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def word(self, *words: str) -> bool:
        if self.tok.kind == "word" and self.tok.text in words:
            self.i += 1
            return True
        return False

    def parse(self) -> Predicate:
        if self.tok.kind == "end":
            raise self.error(self.tok, "empty expression")
        p = self.expr_()
        if self.tok.kind != "end":
            raise self.error(self.tok, f"expected 'and', 'or' or the end, got {self.tok.text!r}")
        return p

    def expr_(self) -> Predicate:
        parts = [self.term()]
        while self.word("or"):
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else (lambda r, ps=tuple(parts): any(p(r) for p in ps))

    def term(self) -> Predicate:
        parts = [self.factor()]
        while self.word("and"):
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else (lambda r, ps=tuple(parts): all(p(r) for p in ps))

    def factor(self) -> Predicate:
        if self.word("not"):
            inner = self.factor()
            return lambda r: not inner(r)
        if self.tok.kind == "punct" and self.tok.text == "(":
            self.take()
            inner = self.expr_()
            if not (self.tok.kind == "punct" and self.tok.text == ")"):
                raise self.error(self.tok, "expected ')'")
            self.take()
            return inner
        return self.test()

    def test(self) -> Predicate:
        ft = self.take()
        if ft.kind == "header":
            name = _unquote(ft.text[ft.text.index('"'):ft.text.rindex('"') + 1]).lower()
            return self.string_test(ft, lambda r, n=name: r.headers.get(n, ""))
        if ft.kind != "word" or (ft.text not in STRING_FIELDS and
                                 ft.text not in ("ip.src", "http.cookie")):
            raise self.error(ft, f"expected a field ({', '.join(FIELDS)}), got {ft.text!r}")
        if ft.text == "ip.src":
            return self.ip_test(ft)
        if ft.text == "http.cookie":
            if not self.word("has"):
                raise self.error(self.tok, "http.cookie takes 'has \"name\"'")
            name = self.string()
            return lambda r: name in r.cookies
        return self.string_test(ft, STRING_FIELDS[ft.text])

    def string(self) -> str:
        t = self.take()
        if t.kind != "string":
            raise self.error(t, f"expected a \"quoted string\", got {t.text or 'the end'!r}")
        return _unquote(t.text)

    def op(self) -> str:
        t = self.take()
        if t.kind == "op":
            return _SYMBOLIC[t.text]
        if t.kind == "word" and t.text in ("eq", "ne", "contains", "matches", "in", "lt",
                                           "le", "gt", "ge"):
            return t.text
        raise self.error(t, f"expected an operator (eq ne contains matches in), got "
                            f"{t.text or 'the end'!r}")

    def values(self, parse_one: Callable[[], object]) -> list:
        t = self.take()
        if not (t.kind == "punct" and t.text == "{"):
            raise self.error(t, "expected '{' to open a set")
        out = []
        while not (self.tok.kind == "punct" and self.tok.text == "}"):
            if self.tok.kind == "end":
                raise self.error(self.tok, "expected '}' to close the set")
            out.append(parse_one())
            if len(out) > MAX_SET:
                raise self.error(self.tok, f"a set holds at most {MAX_SET} values")
        self.take()
        return out

    def string_test(self, ft: _Tok, get: Getter) -> Predicate:
        op = self.op()
        if op == "in":
            allowed = frozenset(self.values(self.string))
            return lambda r: get(r) in allowed
        vt = self.tok
        value = self.string()
        if op == "eq":
            return lambda r: get(r) == value
        if op == "ne":
            return lambda r: get(r) != value
        if op == "contains":
            return lambda r: value in get(r)
        if op == "matches":
            try:
                rx = re.compile(value)
            except re.error as e:
                raise self.error(vt, f"not a regular expression: {e}") from None
            return lambda r: rx.search(get(r)) is not None
        raise self.error(ft, f"{ft.text} is text: use eq ne contains matches in, not {op}")

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        t = self.take()
        try:
            return ipaddress.ip_network(t.text, strict=False)
        except ValueError:
            raise self.error(t, f"expected an address or CIDR, got {t.text or 'the end'!r}"
                             ) from None

    def ip_test(self, ft: _Tok) -> Predicate:
        op = self.op()
        if op == "in":
            nets = self.values(self.network)
            return lambda r: any(r.src_ip in n for n in nets)
        if op in ("eq", "ne"):
            net = self.network()
            return (lambda r: r.src_ip in net) if op == "eq" else (lambda r: r.src_ip not in net)
        raise self.error(ft, f"ip.src takes eq, ne or in, not {op}")


def compile_expression(expr: str) -> Predicate:
    """A predicate over RequestView; RuleError says where an expression is wrong."""
    if len(expr) > MAX_EXPRESSION:
        raise RuleError(expr[:80], 1, f"longer than {MAX_EXPRESSION} characters")
    return _Parser(expr).parse()


@dataclass(frozen=True)
class Rule:
    expression: str
    action: Action
    description: str = ""


@dataclass(slots=True)  # per request: frozen ones cost more to build
class Verdict:
    action: Action | None           # None: no rule decided
    rule: int | None                # index of the deciding rule
    logged: tuple[int, ...] = ()    # indexes of the log rules that matched


class Firewall:
    """A zone's firewall rules, compiled once; immutable, shared by reference."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        compiled = []
        for i, rule in enumerate(self.rules):
            if rule.action not in ACTIONS:
                raise ValueError(f"rules[{i}].action: {rule.action!r} is not one of "
                                 f"{', '.join(ACTIONS)}")
            try:
                compiled.append(compile_expression(rule.expression))
            except RuleError as e:
                raise ValueError(f"rules[{i}].expression: {e}") from None
        self._predicates = tuple(compiled)

    def evaluate(self, request: RequestView) -> Verdict:
        logged = []
        for i, (rule, matches) in enumerate(zip(self.rules, self._predicates, strict=True)):
            if not matches(request):
                continue
            if rule.action == "log":
                logged.append(i)
                continue
            return Verdict(rule.action, i, tuple(logged))
        return Verdict(None, None, tuple(logged))
