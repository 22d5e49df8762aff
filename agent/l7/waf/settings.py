"""A zone's WAF settings: YAML keys validated into an immutable object.

    waf:
      paranoia: 1              # 1..4; rules above it are skipped
      threshold: 5             # block when the summed score reaches this
      exceptions:
        - {rules: [sqli-quote-boolean], path_prefix: /api/search, target: "args:q"}
        - {categories: [php], path_prefix: /wiki/}
        - {rules: [xss-event-handler], target: cookies}

An exception skips the named rules and every rule of the named categories,
under `path_prefix` (matched against the percent-decoded path with its dot
segments resolved, so /wiki/../admin is not under /wiki/) and, when
`target` is given, only where the match is on that target: a collection
(`args`) or one name in it (`args:comment`, `headers:user-agent`).
Unknown rule ids and categories are errors that name them.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from agent.config import Frozen
from agent.l7.waf.rules import CATEGORIES, COLLECTIONS, default_rules


class WafException(Frozen):
    rules: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    path_prefix: str = "/"
    target: str | None = None

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = default_rules().by_id
        unknown = [r for r in value if r not in known]
        if unknown:
            raise ValueError(f"unknown rule id(s): {', '.join(unknown)}")
        return value

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in value if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'}: "
                             f"{', '.join(unknown)} (known: {', '.join(CATEGORIES)})")
        return value

    @field_validator("path_prefix")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is not a path prefix (it starts with /)")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str | None) -> str | None:
        if value is None:
            return value
        collection, colon, name = value.partition(":")
        if collection not in COLLECTIONS or (colon and not name):
            raise ValueError(f"{value!r} is not a target: a collection ({', '.join(COLLECTIONS)})"
                             " or collection:name")
        return value

    @model_validator(mode="after")
    def _something(self) -> WafException:
        if not self.rules and not self.categories:
            raise ValueError("an exception names rules, categories or both")
        return self


class WafSettings(Frozen):
    enabled: bool = True
    paranoia: int = Field(default=1, ge=1, le=4)
    threshold: int = Field(default=5, ge=1)
    exceptions: tuple[WafException, ...] = ()
