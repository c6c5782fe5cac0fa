"""Flags as dataclass fields: each flag's default, help text and valid values are declared once.

``flag(default, "help", min=..., choices=...)`` declares a field; ``check_fields(obj)`` (called from
``__post_init__``) coerces what fire or a JSON client passed to the field's type and checks it, so
every invalid value gets one line naming the flag and what is allowed. ``alpaca_cot.cli.command``
turns groups of such dataclasses into a script's signature and ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import cache
from typing import Any

from alpaca_cot.errors import UserError

TRUE = ("1", "true", "yes", "y", "on")
FALSE = ("0", "false", "no", "n", "off")


def flag(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field for a flag: its default, its help text and its valid values.

    ``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive ones; ``choices`` lists the
    valid values. A mutable default (a list) is copied for each instance.
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above, "below": below}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def as_list(value: Any) -> list[str] | None:
    """A list flag from fire (str "a,b", tuple, list, a lone number, or None) as a list of strings."""
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kinds(hint: Any) -> tuple[set[type], bool]:
    """The plain types a hint allows and whether it allows None (``int | None`` -> ({int}, True))."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    kinds = {typing.get_origin(a) or a for a in args}
    return kinds - {type(None)}, type(None) in kinds


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` names, or a UserError naming ``--name``."""
    kinds, optional = _kinds(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise UserError(f"--{name} needs a value")
    if bool in kinds and isinstance(value, (bool, str, int)):
        text = str(value).strip().lower()
        if text in TRUE or text in FALSE:
            return text in TRUE
        if kinds == {bool}:
            raise UserError(f"--{name} must be True or False, got {value!r}")
    if list in kinds:
        return as_list(value) or ([] if not optional else None)
    if int in kinds and not isinstance(value, bool):
        try:
            number = float(value)
            if number == int(number):
                return int(number)
        except (TypeError, ValueError, OverflowError):
            pass
        if kinds <= {int}:
            raise UserError(f"--{name} must be a whole number, got {value!r}")
    if float in kinds and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"--{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise UserError(f"--{name} must be a finite number, got {value!r}")
        return number
    if str in kinds:
        if isinstance(value, (list, tuple)):  # fire reads "a,b" as a tuple
            return ",".join(str(v) for v in value)
        return str(value)
    if kinds and not any(isinstance(value, k) for k in kinds):
        raise UserError(f"--{name}: unexpected value {value!r}")
    return value


def check_value(name: str, value: Any, meta: Any) -> None:
    """Raise a UserError naming ``--name`` when ``value`` is outside what ``meta`` allows."""
    if value is None or isinstance(value, bool):
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"--{name} {value!r} is not valid; valid choices: {', '.join(str(c) for c in choices)}")
    if not isinstance(value, (int, float)):
        return
    bounds = [("min", lambda v, b: v >= b, "at least"), ("max", lambda v, b: v <= b, "at most"),
              ("above", lambda v, b: v > b, "above"), ("below", lambda v, b: v < b, "below")]
    for key, ok, words in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise UserError(f"--{name} {value:g} is out of range: it must be {words} {bound:g}")


def check_fields(obj: Any) -> None:
    """Coerce and check every flag field of a dataclass instance (call it from ``__post_init__``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if "help" not in f.metadata:
            continue
        value = coerce(f.name, getattr(obj, f.name), hints[f.name])
        check_value(f.name, value, f.metadata)
        setattr(obj, f.name, value)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The flag fields of a dataclass (those declared with ``flag``)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]
