"""The cache's configuration: per zone (what may be cached) and per front end (where).

`CacheZoneSettings` sits in each zone's config; `CacheStoreSettings` once in
the front end's, for the one store every zone shares. Both are immutable
and validated like the rest of the config (agent/config.py).

The default extensions are a CDN's usual "static" list: images, fonts,
style sheets, scripts, media, documents and archives. HTML, JSON and XML
are left out on purpose: they are what origins generate per user or per
moment (pages, API answers, feeds), and caching them is the zone's
explicit choice (page rule cache_level: cache_everything).

`default_ttl` is the edge TTL for an eligible 200/203 that carries no
freshness of its own (no s-maxage, max-age or Expires): 2 hours, the
usual CDN default, so static files whose origin says nothing are still
cached. None caches only responses with explicit freshness (or a page
rule's edge_ttl).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from agent.config import Frozen

MIB = 1 << 20
GIB = 1 << 30

DEFAULT_EXTENSIONS: tuple[str, ...] = tuple(sorted({
    # images
    "avif", "bmp", "gif", "ico", "jpeg", "jpg", "png", "svg", "svgz", "tif", "tiff", "webp",
    # fonts, style, scripts
    "css", "eot", "js", "otf", "ttf", "woff", "woff2",
    # audio and video
    "flac", "m4a", "mid", "midi", "mkv", "mp3", "mp4", "ogg", "webm",
    # documents and plain text
    "csv", "doc", "docx", "eps", "pdf", "ppt", "pptx", "ps", "txt", "xls", "xlsx",
    # archives and binaries
    "7z", "apk", "bin", "bz2", "class", "dmg", "exe", "gz", "iso", "jar", "rar", "tar",
    "zip", "zst",
}))


class CacheZoneSettings(Frozen):
    """What one zone lets the edge cache."""

    enabled: bool = True
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    default_ttl: int | None = Field(default=7200, ge=0, le=365 * 86400)
    max_object_bytes: int = Field(default=16 * MIB, ge=1, le=GIB)

    @field_validator("extensions", mode="before")
    @classmethod
    def _extensions(cls, v: object) -> tuple[str, ...]:
        if isinstance(v, str) or not isinstance(v, list | tuple):
            raise ValueError("a list of file extensions, e.g. [css, js, png]")
        out = []
        for item in v:
            ext = str(item).strip().lower().removeprefix(".")
            if not ext or not ext.isalnum() or not ext.isascii():
                raise ValueError(f"{item!r} is not a file extension (letters and digits, "
                                 "e.g. css or .woff2)")
            out.append(ext)
        return tuple(dict.fromkeys(out))


class CacheStoreSettings(Frozen):
    """The front end's one cache store: memory, and optionally an encrypted disk spill."""

    memory_bytes: int = Field(default=256 * MIB, ge=0)
    disk_dir: str | None = None            # None: memory only
    disk_bytes: int = Field(default=GIB, ge=0)

    @field_validator("disk_dir")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r}: an absolute path is needed (the cache empties it at "
                             "start)")
        return v
