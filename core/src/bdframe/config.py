"""Validators and helpers for component ``Config`` classes (frozen attrs classes).

Validators raise ``ValueError`` with a message that says what is allowed and what was given;
the recipe loader runs every validator of a config and prefixes each message with the field's
path, so a user sees all problems at once.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Iterable

import attrs
import cattrs


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


def interval(lo: float, hi: float, *, optional: bool = False):
    """Value must be ``[a, b]`` with ``lo <= a <= b <= hi`` (or empty, with ``optional``)."""

    def check(inst, attr, value):
        if optional and not value:
            return
        if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
            empty = "empty or " if optional else ""
            raise ValueError(f"must be {empty}[lo, hi] with {_fmt(lo)} <= lo <= hi <= {_fmt(hi)}, "
                             f"got {list(value)}")

    return check


def optional_interval(lo: float, hi: float):
    """Value must be empty (no interval) or ``[a, b]`` with ``lo <= a <= b <= hi``."""
    return interval(lo, hi, optional=True)


def starting_model_field(verb: str = "repair", *, when: str = ""):
    """The ``model`` option of a defense that starts from a trained model (the path
    :func:`bdframe.steps.starting_model` takes): a ``model.pt`` of an earlier run to ``verb``, or
    empty to train one with the recipe's ``[train]``. ``when`` prefixes the help text with the
    mode the option applies in (e.g. ``"repair mode"``)."""
    lead = f"{when}: " if when else ""
    return attrs.field(default="", metadata={
        "help": f"{lead}model.pt of an earlier run to {verb} (must fit [model]); empty: train one with [train]"})


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


# -------------------------------------------------------------------------------------------------
# strict structuring of recipe values
# -------------------------------------------------------------------------------------------------

class WrongType(TypeError):
    """A recipe value of the wrong TOML type; the message says what is expected and what came."""


def _toml_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def _given(v: Any) -> str:
    shown = ("true" if v else "false") if isinstance(v, bool) else repr(v)
    return f"got {_toml_type(v)} ({shown})"


def _bool(v, _):
    if not isinstance(v, bool):
        raise WrongType(f"must be true or false, {_given(v)}")
    return v


def _int(v, _):
    if isinstance(v, bool) or not isinstance(v, int):
        raise WrongType(f"must be an integer, {_given(v)}")
    return v


def _float(v, _):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WrongType(f"must be a number, {_given(v)}")
    if not math.isfinite(v):
        raise WrongType(f"must be a finite number, got {v!r}")
    return float(v)


def _str(v, _):
    if not isinstance(v, str):
        raise WrongType(f"must be a string, {_given(v)}")
    return v


def _is_tuple(t) -> bool:
    return typing.get_origin(t) is tuple


def _tuple_hook(t, conv):
    args = typing.get_args(t)
    variadic = len(args) == 2 and args[1] is Ellipsis

    def hook(v, _):
        if not isinstance(v, (list, tuple)):
            raise WrongType(f"must be an array, {_given(v)}")
        if not variadic and len(v) != len(args):
            raise WrongType(f"must be an array of {len(args)} values, got {len(v)} ({list(v)!r})")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(conv.structure(x, args[0] if variadic else args[i]))
            except WrongType as e:
                raise WrongType(f"element {i}: {e}") from None
        return tuple(out)

    return hook


def _format(exc: BaseException, typ) -> str:
    if isinstance(exc, WrongType):
        return str(exc)
    return cattrs.v.format_exception(exc, typ)


def strict_converter() -> cattrs.Converter:
    """A cattrs converter that takes recipe values only in their own TOML type.

    ``flip = "false"`` is an error, not ``True``; ``epochs = "10"`` and ``epochs = 2.5`` are
    errors, not 10 and 2; an integer is accepted where a float is expected; NaN and infinity are
    refused for every float; an array is required where a tuple is expected. Unknown keys are
    refused. Use :func:`structure_problems` to get readable messages.
    """
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(bool, _bool)
    conv.register_structure_hook(int, _int)
    conv.register_structure_hook(float, _float)
    conv.register_structure_hook(str, _str)
    conv.register_structure_hook_factory(_is_tuple, _tuple_hook)
    return conv


def structure_problems(exc: cattrs.BaseValidationError, path: str) -> list[str]:
    """``"$.attack.flip: must be true or false, got a string ('false')"`` lines for a cattrs error."""
    out = []
    for msg in cattrs.transform_error(exc, path=path, format_exception=_format):
        if " @ " in msg:
            text, where = msg.rsplit(" @ ", 1)
            msg = f"{where}: {text}"
        out.append(msg)
    return out
