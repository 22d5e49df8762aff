"""Prefix parsing: strict, clear errors, whole lists or nothing."""

from __future__ import annotations

import pytest

from agent.prefixes import (
    Prefix,
    PrefixError,
    PrefixTables,
    parse_file,
    parse_list,
    parse_prefix,
)


@pytest.mark.parametrize(("text", "version", "addr", "plen"), [
    ("192.0.2.0/24", 4, 0xC0000200, 24),
    ("198.51.100.7", 4, 0xC6336407, 32),
    ("0.0.0.0/0", 4, 0, 0),
    ("2001:db8::/32", 6, 0x20010DB8 << 96, 32),
    ("2001:db8::1", 6, (0x20010DB8 << 96) | 1, 128),
    (" 10.0.0.0/8 ", 4, 0x0A000000, 8),
])
def test_valid(text, version, addr, plen) -> None:
    assert parse_prefix(text) == Prefix(version, addr, plen)


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.1/8", r"host bits are set \(did you mean 10.0.0.0/8\?\)"),
    ("10.0.0.0/33", r"prefix length 33 is out of range for IPv4 \(0-32\)"),
    ("2001:db8::/129", r"prefix length 129 is out of range for IPv6"),
    ("10.0.0/24", "is not an IPv4 or IPv6 prefix"),
    ("10.0.0.0/x", "prefix length 'x' is not a number"),
    ("hello", "is not an IPv4 or IPv6 prefix"),
    ("", "empty prefix"),
    ("1.2.3.256", "is not an IPv4 or IPv6 prefix"),
])
def test_invalid(text, message) -> None:
    with pytest.raises(PrefixError, match=message):
        parse_prefix(text)


def test_list_with_comments_and_both_families() -> None:
    t = parse_list(["# feed", "", "192.0.2.0/24  # doc net", "2001:db8::/48", "198.51.100.7"],
                   "feed.txt")
    assert len(t.v4) == 2 and len(t.v6) == 1
    assert sorted(int(p) for p in t.v4["plen"]) == [24, 32]


def test_a_bad_line_refuses_the_whole_list_naming_each_line() -> None:
    with pytest.raises(PrefixError) as e:
        parse_list(["192.0.2.0/24", "10.0.0.1/8", "ok?", "198.51.100.0/24"], "feed.txt")
    text = str(e.value)
    assert "2 bad line(s), nothing applied" in text
    assert "feed.txt:2: '10.0.0.1/8': host bits are set" in text
    assert "feed.txt:3: 'ok?' is not an IPv4 or IPv6 prefix" in text


def test_many_bad_lines_are_summarised() -> None:
    with pytest.raises(PrefixError, match=r"(?s)30 bad line\(s\).*\.\.\. and 10 more"):
        parse_list(["x"] * 30, "f")


def test_missing_file_says_so(tmp_path) -> None:
    with pytest.raises(PrefixError, match="cannot read"):
        parse_file(str(tmp_path / "nope.txt"))


def test_binary_file_says_so(tmp_path) -> None:
    p = tmp_path / "bin"
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PrefixError, match="not a UTF-8 text file"):
        parse_file(str(p))


def test_contains() -> None:
    assert parse_prefix("10.0.0.0/8").contains(parse_prefix("10.1.2.0/24"))
    assert not parse_prefix("10.1.2.0/24").contains(parse_prefix("10.0.0.0/8"))
    assert not parse_prefix("10.0.0.0/8").contains(parse_prefix("::/0"))


def test_tables_has_without_concat() -> None:
    a, b, c = (parse_prefix(x) for x in ("192.0.2.0/24", "2001:db8::/48", "198.51.100.7"))
    t = PrefixTables.concat(PrefixTables.from_prefixes([a, b]), PrefixTables.from_prefixes([c]))
    assert len(t) == 3
    assert t.has([a, b, c, parse_prefix("192.0.2.0/25")]) == [True, True, True, False]
    rest = t.without([a, b])
    assert [p for p, _ in rest.prefixes()] == [c]
    assert len(PrefixTables.concat()) == 0
