"""The one place settings are defined: strict pydantic models and their one-line errors.

:class:`~softmerge.plan.MergePlan` and :class:`~softmerge.fit.FitConfig` are subclasses of
:class:`Settings`. The same classes are the ``plan`` and ``fit`` sections of a YAML config and
the targets of command-line overrides, so keys, defaults and checks cannot drift apart.

Built from Python (``FitConfig(lr=-1)``) a bad value raises :class:`~softmerge.errors.PlanError`
that starts with the field's name (``lr must be > 0, got -1``); validated inside a config, the
same error is reported by :mod:`softmerge.config` with the key's path (``fit.lr: must be > 0``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import PlanError

# Strict: YAML already gives typed values, so "300" (a quoted string) for steps is a mistake,
# not something to coerce. Frozen: a resolved setting is never edited, only copied with changes.
STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Settings(BaseModel):
    """Base of the settings classes: strict, frozen, one-line :class:`PlanError` on bad input."""

    model_config = STRICT
    error: ClassVar[type[Exception]] = PlanError

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            allowed = list(type(self).model_fields)
            raise self.error(describe_validation(exc, style="api", allowed=allowed)) from None

    # Tell pydantic this __init__ only wraps BaseModel's (as RootModel's does): nested inside a
    # config, the section is then validated by pydantic itself, so an error keeps its key path
    # (``fit.lr``) instead of becoming this PlanError.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and checked again (the original is untouched)."""
        return type(self)(**{**self.model_dump(), **changes})


# --------------------------------------------------------------------------- error messages

_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}
_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "callable": "a callable",
}


def got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def key_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_one(err: Mapping[str, Any], allowed_keys: Sequence[str] = ()) -> str:
    """What is wrong with one value, without its key: ``must be >= 0, got -1.0``,
    ``expected an integer, got '300'``."""
    kind, ctx = err["type"], err.get("ctx") or {}
    value = got(err.get("input"))
    if kind == "extra_forbidden":
        from difflib import get_close_matches

        close = get_close_matches(str(err["loc"][-1]), list(allowed_keys), n=1)
        if close:
            return f"unknown key; did you mean '{close[0]}'?"
        return "unknown key" + (f"; allowed: {', '.join(allowed_keys)}" if allowed_keys else "")
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        from difflib import get_close_matches

        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        close = get_close_matches(str(err.get("input")), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"expected one of {', '.join(choices)}, got {value}{hint}"
    if kind in _BOUNDS:
        symbol, key = _BOUNDS[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # pydantic stores ge=0 of a float field as 0.0
        return f"must be {symbol} {bound}, got {value}"
    if kind == "finite_number":
        return f"expected a finite number, got {value}"
    if kind == "too_short":
        return f"needs at least {ctx['min_length']} entries, got {ctx['actual_length']}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    base = kind.split("_")[0]
    if base in _TYPE_NAMES and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"expected {_TYPE_NAMES[base]}, got {value}"
    if kind in ("path_type", "path_missing"):
        return str(err["msg"])
    msg = str(err["msg"])
    return f"{msg[:1].lower()}{msg[1:]}, got {value}"


def describe_validation(
    exc: ValidationError, style: str = "config", prefix: str = "", allowed: Sequence[str] = ()
) -> str:
    """The first error as one line: ``fit.lr: must be > 0, got -1`` (config style) or
    ``lr must be > 0, got -1`` (api style); ``(and N more problems)`` when there are more."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    what = describe_one(first, allowed)
    path = key_path([*([prefix] if prefix else []), *loc])
    if not path:
        text = what
    elif style == "api" and what.startswith("expected "):
        text = f"{path} must be {what.removeprefix('expected ')}"
    elif style == "api" and what.startswith("must "):
        text = f"{path} {what}"
    else:
        text = f"{path}: {what}"
    more = len(errors) - 1
    return text + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")
