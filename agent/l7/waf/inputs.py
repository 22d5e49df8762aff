"""What the WAF rules look at: one request split into named collections.

    method         the request method
    uri            the request-target exactly as sent (path and query, still
                   percent-encoded): encoding anomalies are visible here only
    path           the path, percent-decoded once
    args           argument values, percent-decoded once: the query string,
                   an urlencoded form body, multipart fields (not files) and
                   every string value of a JSON body
    args_names     argument names, and every key of a JSON body (named by
                   its dotted path, so {"password": {"$ne": 1}} is
                   password.$ne holding "$ne")
    cookies        cookie values (percent-decoded once); cookies_names
    headers        header values except Cookie, and except the values of
                   STRUCTURED headers (Accept, Sec-Fetch-Mode, ...) that are
                   well formed (letters, digits and , ; = . * / + : _ - space
                   only, which no attack fits in); headers_names
    files          multipart file names; files_content the first
                   FILE_PEEK bytes of each file, as text
    form           the raw text of an urlencoded form body (encoding anomalies)
    body           the raw body text, for every content type
    text           the raw body text of a body not parsed into args (XML, plain
                   text, an unknown or missing type, or a body that failed to
                   parse as its type), so rules over args see it too; media,
                   archives and octet streams are opaque: only `body` has them

Each value is kept with its name (the argument, cookie or header name;
JSON keys joined with dots, array positions left out: `items.sku`) so a
verdict can say "args:q" and a zone can except one argument.

The work is bounded: at most MAX_BODY bytes of a body are looked at (a
longer body is inspected as raw `body`/`text` up to the bound and flagged
`truncated`), at most MAX_VALUES argument values (the rest are skipped
and flagged `truncated`), at most MAX_VALUE characters of any one value
(flagged too); `arg_count` counts every query and form argument, inspected
or not, for the too-many-arguments check, and the length checks see full
lengths. A JSON body past the bound is not parsed at all (a cut JSON would
not parse anyway). What lies past a bound is not inspected: the
`protocol-truncated` rule (paranoia 2) counts that, paranoia 1 just stops.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_plus

MAX_BODY = 128 * 1024
MAX_VALUES = 1024
MAX_VALUE = 16 * 1024
FILE_PEEK = 4096
JSON_TYPES = ("application/json", "text/json")
FORM_TYPE = "application/x-www-form-urlencoded"
OPAQUE = ("image/", "audio/", "video/", "font/")
OPAQUE_TYPES = frozenset({"application/octet-stream", "application/pdf", "application/zip",
                          "application/gzip", "application/x-protobuf", "application/grpc",
                          "application/x-tar", "application/vnd.ms-excel", "application/msword"})
MULTIPART_TYPE = "multipart/form-data"
XML_TYPES = ("application/xml", "text/xml")

Item = tuple[str, str]          # (name, value)
FRAMING = frozenset({"host", "content-length", "content-type", "transfer-encoding"})

# Headers with a fixed grammar that browsers send on every request. A value
# within PLAIN cannot hold a quote, bracket, '$', '%', '&', '|', '<' or a
# control byte, so no rule could match it; skipping these is most of the
# headers of an ordinary browser request.
STRUCTURED = frozenset({
    "accept", "accept-encoding", "accept-language", "cache-control", "connection",
    "content-length", "dnt", "if-modified-since", "pragma", "priority", "te", "upgrade",
    "upgrade-insecure-requests", "sec-fetch-dest", "sec-fetch-mode", "sec-fetch-site",
    "sec-fetch-user", "sec-gpc", "sec-ch-ua-mobile", "sec-ch-ua-platform", "keep-alive",
    "access-control-request-method", "access-control-request-headers", "save-data",
})
PLAIN = re.compile(r'[A-Za-z0-9 ,;=.*/+:_?-]*')


@dataclass
class Inputs:
    method: str
    path: str                                   # decoded
    values: dict[str, list[Item]] = field(default_factory=dict)
    host: str | None = None                     # None: no Host header at all
    query_args: list[Item] = field(default_factory=list)   # for the length check
    arg_count: int = 0                          # query and form arguments
    has_body: bool = False
    framing: list[Item] = field(default_factory=list)   # host, content-length, -type, TE
    longest_header: Item = ("", "")
    body_error: str | None = None               # why the body did not parse
    truncated: bool = False                     # something was left uninspected

    def add(self, collection: str, name: str, value: str) -> None:
        if len(value) > MAX_VALUE:
            value = value[:MAX_VALUE]
            self.truncated = True
        self.values.setdefault(collection, []).append((name, value))

    @property
    def normalised_path(self) -> str:
        """The path with dot segments resolved, for path-prefix exceptions."""
        p = posixpath.normpath(self.path.replace("\\", "/")) if self.path else "/"
        return p if p.startswith("/") else "/" + p


def _split_target(target: str) -> tuple[str, str]:
    if "://" in target[:12]:                    # absolute-form: drop scheme and authority
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    return path.partition("#")[0], query.partition("#")[0]


def _pairs(text: str) -> list[Item]:
    out = []
    for part in text.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        out.append((unquote_plus(name, errors="replace"), unquote_plus(value, errors="replace")))
    return out


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    media, _, rest = value.partition(";")
    params = {}
    for p in rest.split(";"):
        k, eq, v = p.strip().partition("=")
        if eq:
            params[k.strip().lower()] = v.strip().strip('"')
    return media.strip().lower(), params


def _is_json(media: str) -> bool:
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


def parse(method: str, target: str, headers: list[tuple[str, str]] | tuple,
          body: bytes) -> Inputs:
    raw_path, query = _split_target(target)
    path = unquote(raw_path, errors="replace") if "%" in raw_path else raw_path
    inp = Inputs(method=method, path=path)
    inp.values["method"] = [("", method)]
    inp.values["uri"] = [("", target)]
    inp.values["path"] = [("", path)]
    content_type = ""
    longest = 0
    for name, value in headers:
        if name in FRAMING:
            inp.framing.append((name, value))
        if len(value) > longest:
            longest = len(value)
            inp.longest_header = (name, value)
        if name == "cookie":
            _cookies(inp, value)
            continue
        if name == "host":
            inp.host = value if inp.host is None else inp.host
        elif name == "content-type":
            content_type = value
        elif name in STRUCTURED and PLAIN.fullmatch(value):
            inp.add("headers_names", name, name)
            continue
        inp.add("headers", name, value)
        inp.add("headers_names", name, name)
    if query:
        args = _pairs(query)
        inp.query_args = args
        inp.arg_count += len(args)
        _add_args(inp, args)
    if body:
        inp.has_body = True
        _body(inp, content_type, body)
    return inp


def _cookies(inp: Inputs, header: str) -> None:
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if not name and not eq:
            continue
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if "%" in value:
            value = unquote(value, errors="replace")
        inp.add("cookies", name, value)
        inp.add("cookies_names", name, name)


def _add_args(inp: Inputs, args: list[Item], names: bool = True) -> None:
    room = MAX_VALUES - len(inp.values.get("args", ()))
    if len(args) > room:
        inp.truncated = True
        args = args[:max(room, 0)]
    for name, value in args:
        inp.add("args", name, value)
        if names:
            inp.add("args_names", name, name)


def _body(inp: Inputs, content_type: str, body: bytes) -> None:
    if len(body) > MAX_BODY:
        inp.truncated = True
        body = body[:MAX_BODY]
        cut = True
    else:
        cut = False
    text = body.decode("utf-8", "replace").removeprefix("\ufeff")
    inp.add("body", "", text)
    media, params = _content_type(content_type)
    if media.startswith(OPAQUE) or media in OPAQUE_TYPES:
        return                                  # media and archives: only `body` sees them
    head = text.lstrip()[:1]
    if media == FORM_TYPE:
        inp.add("form", "", text)
        if head in ("{", "[", "<"):             # JSON or XML sent as a form
            inp.body_error = "a form body that is not a form"
        if cut:                                 # keep whole pairs only
            text = text[:text.rfind("&")] if "&" in text else ""
        args = _pairs(text)
        inp.arg_count += len(args)
        _add_args(inp, args)
        return
    if _is_json(media) and not cut:
        try:
            _json(inp, json.loads(text))
            return
        except (ValueError, RecursionError):
            inp.body_error = "invalid JSON"
    elif media in XML_TYPES or media.endswith("+xml"):
        if head != "<":
            inp.body_error = "an XML body that is not XML"
    elif media == MULTIPART_TYPE:
        error = _multipart(inp, body, params.get("boundary", ""))
        if error is None:
            return
        inp.body_error = error
    inp.add("text", "", text)


def _json(inp: Inputs, doc: object) -> None:
    args: list[Item] = []
    keys: list[Item] = []
    stack: list[tuple[str, object]] = [("", doc)]
    while stack and len(args) + len(keys) < MAX_VALUES:
        prefix, node = stack.pop()
        if isinstance(node, str):
            args.append((prefix or "json", node))
        elif isinstance(node, dict):
            items = []
            for k, v in node.items():
                path = f"{prefix}.{k}" if prefix else k
                keys.append((path, k))
                items.append((path, v))
            stack.extend(reversed(items))           # popped in document order
        elif isinstance(node, list):
            stack.extend((prefix, v) for v in reversed(node))
    if stack:
        inp.truncated = True
    _add_args(inp, args, names=False)
    for path, key in keys:
        inp.add("args_names", path, key)


def _multipart(inp: Inputs, body: bytes, boundary: str) -> str | None:
    if not boundary:
        return "multipart without a boundary"
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        return "multipart without parts"
    args: list[Item] = []
    for chunk in chunks[1:-1]:
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = chunk.partition(b"\n\n")
        if not sep:
            return "multipart part without headers"
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        disposition = ""
        for line in head.decode("utf-8", "replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        _, params = _content_type(disposition)
        field_name = params.get("name", "")
        if "filename" in params:
            inp.add("files", field_name, params["filename"])
            inp.add("files_content", field_name,
                    content[:FILE_PEEK].decode("utf-8", "replace"))
        else:
            args.append((field_name, content.decode("utf-8", "replace")))
    inp.arg_count += len(args)
    _add_args(inp, args)
    return None
