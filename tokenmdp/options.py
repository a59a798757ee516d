"""Build frozen attrs option classes from plain dicts (TOML tables) with clear errors.

Shared by the run config and by every component's ``Options``: unknown keys name the
valid ones, and a validator failure names the dotted field.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from .errors import ConfigError


def _coerce(value: Any, annotation: Any) -> Any:
    """Apply the two coercions TOML needs (int -> float, list -> tuple); no guessing."""
    origin = typing.get_origin(annotation)
    wanted = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and float in wanted and int not in wanted:
        return float(value)
    if isinstance(value, list) and any(typing.get_origin(w) is tuple for w in wanted):
        return tuple(value)
    return value


def build(cls: type, data: Mapping[str, Any] | None, where: str) -> Any:
    """Instantiate attrs class ``cls`` from ``data``; errors say ``where.field``."""
    data = dict(data or {})
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(fields) or '(none)'}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        target = hints.get(name)
        if attrs.has(target) and isinstance(value, Mapping):
            kwargs[name] = build(target, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, target)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def to_dict(obj: Any) -> dict:
    """Inverse of :func:`build`, for writing the resolved config (None values dropped)."""
    return attrs.asdict(obj, filter=lambda _a, v: v is not None)


# Validators with messages that name the field and the allowed range.


def positive(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{attribute.name} must be a number > 0 (got {value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number > 0 (got {value!r})")


def non_negative(instance, attribute, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{attribute.name} must be a number >= 0 (got {value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number >= 0 (got {value!r})")


def positive_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{attribute.name} must be an integer > 0 (got {value!r})")


def non_negative_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0 (got {value!r})")


def one_of(*choices):
    def check(instance, attribute, value):
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(map(repr, choices))} (got {value!r})")

    return check


def probability(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be in [0, 1] (got {value!r})")


def optional(validator):
    """``validator`` for a value that may also be unset (None)."""

    def check(instance, attribute, value):
        if value is not None:
            validator(instance, attribute, value)

    return check


@attrs.frozen
class OptionDoc:
    """One option of an attrs options class, for ``tokenmdp options``."""

    name: str
    type: str
    default: Any
    doc: str


def _doc_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comments above each field of ``cls`` and of the attrs classes it extends
    (the one source of option docs), by field name."""
    import inspect
    import re

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not attrs.has(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # defined where there is no source (a REPL)
            continue
        pending: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
                continue
            field = re.match(r"(\w+)\s*:", stripped)
            if field and pending:
                docs[field.group(1)] = " ".join(pending)
            pending = []
    return docs


def option_docs(cls: type, overrides: Mapping[str, Any] | None = None) -> list[OptionDoc]:
    """Every field of the attrs class ``cls``: name, type, default (``overrides`` replace
    defaults, as a recipe's options do) and its doc comment."""
    docs, overrides = _doc_comments(cls), dict(overrides or {})
    out = []
    for f in attrs.fields(cls):
        if f.name in overrides:
            default = overrides[f.name]
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            default = f.default.factory()
        else:
            default = None if f.default is attrs.NOTHING else f.default
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(OptionDoc(f.name, str(annotation), default, docs.get(f.name, "")))
    return out
