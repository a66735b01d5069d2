"""Validation of config dataclasses: every field's type (from its annotation, `Literal` choices
included) and range, for YAML files and `--set` alike, with the allowed values in the message. No
silent fallback: a wrong value is a `ConfigError` naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal

from spd.errors import ConfigError

Rule = tuple[Callable[[Any], bool], str]  # (holds for the value, what it must be)


def positive(value) -> bool:
    return value > 0


def non_negative(value) -> bool:
    return value >= 0


def unit_interval(value) -> bool:
    return 0 <= value <= 1


def optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or rule(value)


def _type_problem(value: Any, hint: Any) -> str | None:
    """None if `value` fits the annotation `hint`, else what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin is Literal:
        return None if value in args else f"must be one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, arg) for arg in args]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if hint is type(None):
        return None if value is None else "must be null"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin is list:
        if not isinstance(value, list):
            return "must be a list"
        item = args[0] if args else Any
        bad = [v for v in value if _type_problem(v, item)]
        return None if not bad else f"must be a list of {getattr(item, '__name__', item)}"
    if origin is dict:
        return None if isinstance(value, dict) else "must be a mapping"
    return None


def check_config(config: Any, where: str = "") -> None:
    """Types of every field, then the dataclass's `RULES` (ClassVar: field -> (test, text)); nested
    dataclasses are checked with their dotted prefix. Raises ConfigError naming the first bad key."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key = where + field.name
        if dataclasses.is_dataclass(value):
            check_config(value, key + ".")
            continue
        problem = _type_problem(value, hints[field.name])
        if problem:
            raise ConfigError(f"{key}: {problem}, got {value!r}")
    for name, (test, text) in getattr(type(config), "RULES", {}).items():
        value = getattr(config, name)
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{where}{name}: must be {text}, got {value!r}")
