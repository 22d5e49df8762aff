"""Page rules: patterns, first match wins, forwarding with captured stars."""

from __future__ import annotations

import pytest

from agent.l7.pagerules import Forward, PageRule, PageRules, Settings

RULES = PageRules([
    PageRule("shop.example.eu/old/*", Settings(forwarding_url=Forward(301,
                                                                     "https://shop.example.eu/new/$1"))),
    PageRule("shop.example.eu/images/*", Settings(cache_level="cache_everything", edge_ttl=86400)),
    PageRule("*.example.eu/admin*", Settings(cache_level="bypass", disable_waf=False)),
    PageRule("shop.example.eu/search?*q=*", Settings(cache_level="bypass")),
    PageRule("api.example.eu", Settings(always_https=True, disable_waf=True)),
])


@pytest.mark.parametrize("host,path,query,rule", [
    ("shop.example.eu", "/images/a/b.png", "", 1),
    ("SHOP.example.eu", "/images/x", "", 1),             # host case does not matter
    ("shop.example.eu", "/Images/x", "", None),          # path case does
    ("shop.example.eu", "/admin", "", 2),
    ("www.example.eu", "/admin/users", "", 2),
    ("example.eu", "/admin", "", None),                   # '*.' needs a label
    ("shop.example.eu", "/search", "q=shoes", 3),
    ("shop.example.eu", "/search", "", None),             # the pattern wants a query
    ("api.example.eu", "/anything/at/all", "", 4),
    ("other.example", "/images/x", "", None),
])
def test_first_matching_rule(host: str, path: str, query: str, rule: int | None) -> None:
    assert RULES.match(host, path, query).rule == rule


def test_forwarding_takes_what_the_stars_took() -> None:
    m = RULES.match("shop.example.eu", "/old/shoes/red", "")
    assert m.rule == 0 and m.redirect == (301, "https://shop.example.eu/new/shoes/red")


def test_settings_of_the_match() -> None:
    s = RULES.match("api.example.eu", "/v1").settings
    assert s.always_https and s.disable_waf and s.cache_level is None
    assert RULES.match("nothing.example", "/").settings == Settings()


@pytest.mark.parametrize("rule,msg", [
    (PageRule("https://a.example/*"), r"page_rules\[0\].pattern: .*leave out the scheme"),
    (PageRule("/only/a/path"), r"page_rules\[0\].pattern: .*starts with a host"),
    (PageRule("a.example/*", Settings(forwarding_url=Forward(302, "https://b/$2"))),
     r"page_rules\[0\].forwarding_url: .*uses \$2 but the pattern has 1 '\*'"),
])
def test_bad_rules_are_named(rule: PageRule, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        PageRules([rule])
