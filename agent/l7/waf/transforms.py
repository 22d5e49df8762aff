"""Named transformations a WAF rule applies to a value before its patterns.

A rule lists the transformations it wants, in order, by name:

    transforms: [url_decode, html_entity_decode, lowercase, compress_whitespace]

Each one is a plain function str -> str that returns its argument
unchanged (the same object) when it has nothing to do, and checks for that
cheaply first: most values hold no '%', '&', '\\' or non-ASCII character,
so most transformations of most values cost one `in` test. The engine
caches every chain prefix per value, so rules sharing a chain (or its
beginning) decode a value once per request.

Arguments reach the rules already percent-decoded once (as an application
sees them); `url_decode` in a rule's chain decodes a second time, which is
what catches double encoding (%252e%252e%252f).
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable
from urllib.parse import unquote

Transform = Callable[[str], str]

_IIS_UNICODE = re.compile(r"%u([0-9a-fA-F]{4})")
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u\{([0-9a-fA-F]{1,6})\}|u([0-9a-fA-F]{4})"
                     r"|([0-7]{1,3}))")
_WHITESPACE = re.compile(r"\s+")
_VERSIONED_COMMENT = re.compile(r"/\*!\d*(.*?)\*/", re.DOTALL)
_BLOCK_COMMENT = re.compile(r"/\*.*?(?:\*/|\Z)", re.DOTALL)
_LINE_COMMENT = re.compile(r"(?:--|#)[^\n]*\n")
_DOUBLE_SLASH = re.compile(r"/{2,}")
_SHELL_EMPTY = re.compile(r"\$(?:@|\*|\{\s*\}|\(\s*\)|\d(?!\d))")
_SHELL_IFS = re.compile(r"\$\{?ifs\}?", re.IGNORECASE)


def url_decode(s: str) -> str:
    """Percent-decoding (once; '+' left alone); invalid escapes stay as they are."""
    return unquote(s, errors="replace") if "%" in s else s


def url_decode_uni(s: str) -> str:
    """Percent-decoding, including the non-standard %uXXXX form (IIS)."""
    if "%" not in s:
        return s
    if "%u" in s or "%U" in s:
        s = _IIS_UNICODE.sub(lambda m: chr(int(m.group(1), 16)), s)
    return unquote(s, errors="replace")


def html_entity_decode(s: str) -> str:
    """&lt; &#60; &#x3c; and the legacy forms without ';' (as browsers read them)."""
    return html.unescape(s) if "&" in s else s


def _unescape(m: re.Match) -> str:
    hexa = m.group(1) or m.group(2) or m.group(3)
    try:
        return chr(int(hexa, 16)) if hexa else chr(int(m.group(4), 8))
    except (ValueError, OverflowError):
        return m.group(0)


def escape_decode(s: str) -> str:
    """Backslash escapes of JavaScript, JSON and C strings: \\x3c \\u003c \\u{3c} \\074."""
    return _ESCAPE.sub(_unescape, s) if "\\" in s else s


def lowercase(s: str) -> str:
    return s.lower()


def normalise_unicode(s: str) -> str:
    """NFKC: fullwidth and other compatibility forms fold to ASCII (U+FF1C becomes <)."""
    return s if s.isascii() else unicodedata.normalize("NFKC", s)


def remove_nulls(s: str) -> str:
    return s.replace("\x00", "") if "\x00" in s else s


def compress_whitespace(s: str) -> str:
    """Every run of whitespace (tabs, newlines, NBSP, ...) becomes one space."""
    if s.isprintable() and "  " not in s:      # only single ASCII spaces, if any
        return s
    return _WHITESPACE.sub(" ", s)


def remove_whitespace(s: str) -> str:
    return _WHITESPACE.sub("", s)


def sql_comments(s: str) -> str:
    """SQL comments become a space: /*...*/ (also unterminated), the content of
    MySQL's versioned /*!50000 ... */ kept, and -- or # comments that a newline
    ends (UNION--%0ASELECT). A trailing -- or # is left for rules that look for it."""
    if "/*" in s:
        s = _VERSIONED_COMMENT.sub(r" \1 ", s)
        s = _BLOCK_COMMENT.sub(" ", s)
    if ("--" in s or "#" in s) and "\n" in s:
        s = _LINE_COMMENT.sub(" ", s)
    return s


def normalise_path(s: str) -> str:
    """Backslashes become slashes, '/./' and repeated slashes collapse; '..' is
    kept (rules look for it)."""
    if "\\" in s:
        s = s.replace("\\", "/")
    if "/./" in s:
        while "/./" in s:
            s = s.replace("/./", "/")
    if "//" in s:
        s = _DOUBLE_SLASH.sub("/", s)
    return s


def cmd_line(s: str) -> str:
    """Undo the usual shell obfuscation: quotes, backslashes and carets vanish
    (c'a't, c\\at, c^at), $@ / $* / ${} / $() / $1 vanish, $IFS and ${IFS}
    become a space, a line break after a one-word first line becomes ';' (a
    command separator), then lower case and one space per run of whitespace."""
    if "$" in s:
        s = _SHELL_IFS.sub(" ", s)
        s = _SHELL_EMPTY.sub("", s)
    for ch in "\\'\"^":
        if ch in s:
            s = s.replace(ch, "")
    if "\n" in s or "\r" in s:
        s = s.replace("\r", "")
        # A line break after a first line without spaces (host%0Aid) starts an
        # injected command; in multi-line text (a code block, a letter) it is
        # only whitespace, or every "cat config.yaml" line would be an attack.
        first = s.split("\n", 1)[0]
        s = s.replace("\n", ";" if " " not in first.strip() else " ")
    return compress_whitespace(s.lower())


def trim(s: str) -> str:
    return s.strip()


# Transformations that leave a plain value (ASCII, no '%', '&', '\\' or NUL)
# unchanged: the engine skips them for such values, which are most values.
IDENTITY_ON_PLAIN = frozenset({"url_decode", "url_decode_uni", "html_entity_decode",
                               "escape_decode", "normalise_unicode", "remove_nulls"})


def is_plain(s: str) -> bool:
    return s.isascii() and "%" not in s and "&" not in s and "\\" not in s and "\x00" not in s


TRANSFORMS: dict[str, Transform] = {
    "url_decode": url_decode,
    "url_decode_uni": url_decode_uni,
    "html_entity_decode": html_entity_decode,
    "escape_decode": escape_decode,
    "lowercase": lowercase,
    "normalise_unicode": normalise_unicode,
    "remove_nulls": remove_nulls,
    "compress_whitespace": compress_whitespace,
    "remove_whitespace": remove_whitespace,
    "sql_comments": sql_comments,
    "normalise_path": normalise_path,
    "cmd_line": cmd_line,
    "trim": trim,
}
