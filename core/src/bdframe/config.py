"""Validators and helpers for component ``Config`` classes (frozen attrs classes).

Validators raise ``ValueError`` with a message that says what is allowed and what was given;
the recipe loader runs every validator of a config and prefixes each message with the field's
path, so a user sees all problems at once.
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs


def _fmt(v: Any) -> str:
    return repr(v)


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False):
    """Number in an interval; ``lo_open``/``hi_open`` exclude the bound."""

    def check(inst, attr, value):
        if value is None:
            return
        ok = True
        if lo is not None:
            ok &= value > lo if lo_open else value >= lo
        if hi is not None:
            ok &= value < hi if hi_open else value <= hi
        if not ok:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            raise ValueError(f"must be in {left}{lo_s}, {hi_s}{right}, got {_fmt(value)}")

    return check


def one_of(*choices: Any):
    """Value must be one of ``choices``."""

    def check(inst, attr, value):
        if value not in choices:
            allowed = ", ".join(_fmt(c) for c in choices)
            raise ValueError(f"must be one of {allowed}, got {_fmt(value)}")

    return check


def each(validator):
    """Apply ``validator`` to every element of a sequence."""

    def check(inst, attr, value):
        if value is None:
            return
        for i, v in enumerate(value):
            try:
                validator(inst, attr, v)
            except ValueError as e:
                raise ValueError(f"element {i}: {e}") from None

    return check


def increasing(inst, attr, value):
    if value is not None and list(value) != sorted(value):
        raise ValueError(f"must be increasing, got {list(value)}")


def field_names(cls) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


def validate_all(obj) -> list[tuple[str, str]]:
    """Run every field validator of an attrs instance; return ``(field, message)`` pairs."""
    problems: list[tuple[str, str]] = []
    for f in attrs.fields(type(obj)):
        if f.validator is None:
            continue
        try:
            f.validator(obj, f, getattr(obj, f.name))
        except (ValueError, TypeError) as e:
            problems.append((f.name, str(e)))
    check = getattr(obj, "check", None)
    if callable(check):
        for field, msg in check() or []:
            problems.append((field, msg))
    return problems


def _type_name(t) -> str:
    """``Optional[int]`` whether the annotation is still a string or already resolved."""
    if isinstance(t, str):
        return t
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "").replace("NoneType", "None")


def describe_fields(cls) -> Iterable[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` for docs and ``bdframe plugins``."""
    for f in attrs.fields(cls):
        t = _type_name(f.type)
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        yield f.name, str(t), default, f.metadata.get("help", "")
