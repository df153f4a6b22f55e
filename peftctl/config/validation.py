"""Checking a config section against its dataclass: types (with the coercions YAML needs), unknown keys
with a did-you-mean, and the one-line ConfigError every bad value gets (used by config/schema.py)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from peftctl.errors import ConfigError


def check(condition: bool, name: str, value: Any, valid: str) -> None:
    if not condition:
        raise ConfigError(f"{name}={value!r} is not valid; {valid}")


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any, str]:
    """(ok, coerced value, description of the expected type)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value, "any"
    if origin is Literal:
        choices = typing.get_args(annotation)
        return value in choices, value, "one of " + ", ".join(str(c) for c in choices)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return True, None, ""
        descriptions = []
        for arg in args:
            if arg is type(None):
                continue
            ok, coerced, description = _type_ok(value, arg)
            if ok:
                return True, coerced, ""
            descriptions.append(description)
        return False, value, " or ".join(descriptions) + " or null"
    if annotation is bool:
        return isinstance(value, bool), value, "true or false"
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value, "a finite number"
    if annotation is str:
        return isinstance(value, str), value, "a string"
    if annotation in (dict, list):
        return isinstance(value, annotation), value, f"a {annotation.__name__}"
    return True, value, ""


def reject_unknown_keys(keys: Any, valid: list[str], prefix: str = "") -> None:
    """ConfigError for the first key not in ``valid``, with a did-you-mean."""
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"{prefix}{key} is not a known config key; {hint}")


def build_section(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    reject_unknown_keys(values, [f.name for f in dataclasses.fields(cls)], f"{section}.")
    coerced = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):  # a nested section, e.g. train.dpo
            if not isinstance(value, (dict, type(None))):
                raise ConfigError(
                    f"{section}.{key}={value!r} is not valid; expected a mapping of {section}.{key}.* keys"
                )
            coerced[key] = build_section(hints[key], value, f"{section}.{key}")
            continue
        ok, new_value, description = _type_ok(value, hints[key])
        if not ok:
            raise ConfigError(f"{section}.{key}={value!r} is not valid; expected {description}")
        coerced[key] = new_value
    instance = cls(**coerced)
    if hasattr(instance, "validate"):
        instance.validate()
    return instance
