"""The recipe's type checking: each value against its field's annotation (exactly: `2.7` is not an
integer, `"no"` is not a boolean, a string is not a list) and its `rule`, the range it must be in,
with one error line naming where the value came from, the value and what is allowed."""

from __future__ import annotations

import json
import types
from dataclasses import field
from typing import Any, Callable, Literal, NamedTuple, Union, get_args, get_origin

from ..errors import RsmtdfError


class Rule(NamedTuple):
    """A range check on a value already of the right type; `says` completes "expected <type> ...". """

    test: Callable[[Any], bool]
    says: str


def at_least(n: float) -> Rule:
    return Rule(lambda v: v >= n, f">= {n}")


def above(n: float) -> Rule:
    return Rule(lambda v: v > n, f"> {n}")


PROBABILITY = Rule(lambda v: 0 <= v <= 1, "in [0, 1]")
ORDERED_RANGE = Rule(lambda v: 0 < v[0] <= v[1], "[low, high] with 0 < low <= high")
BAND_INDICES = Rule(lambda v: all(b >= 0 for b in v), "of band indices >= 0 (0 is the first band)")
RGB_BANDS = Rule(BAND_INDICES.test, BAND_INDICES.says + "; a one-band raster is read as grey: bands = [0, 0, 0]")
POSITIVE_SIZES = Rule(lambda v: all(s >= 1 for s in v.values()), "of sizes >= 1 px")
MASK_CODES = Rule(lambda v: all(c >= 0 for x in v.values() for c in ((x,) if isinstance(x, int) else x)),
                  "of codes >= 0 per class name")
RGB_VALUES = Rule(lambda v: all(0 <= c <= 255 for rgb in v.values() for c in rgb), "of [r, g, b] in 0..255 per class name")
HEX_COLOURS = Rule(lambda v: all(len(c) == 7 and c[0] == "#" and all(h in "0123456789abcdefABCDEF" for h in c[1:])
                                 for c in v.values()), 'of "#rrggbb" colours per class name')
NONEMPTY_UNIQUE = Rule(lambda v: len(v) > 0 and len(set(v)) == len(v), "that is non-empty and without repeats")


def key(default: Any, rule: Rule | None = None, *, doc: str = "") -> Any:
    """A recipe key: its default, an optional range rule and a one-line meaning."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"rule": rule, "doc": doc})
    return field(default=default, metadata={"rule": rule, "doc": doc})


def check_option(option: str, value: Any, tp: Any, rule: Rule | None = None) -> Any:
    """A command-line option that is no recipe key, checked the same way (e.g. --shard-samples)."""
    return None if value is None else checked(value, tp, rule, f"{option} {as_typed(value)}", option=True)


class _Mismatch(Exception):
    pass


def checked(value: Any, tp: Any, rule: Rule | None, where: str, option: bool = False) -> Any:
    """`value` in the annotation's canonical form (lists as tuples, integers as floats where a number
    is asked), or one error line: "<where>: expected <type> <rule>"."""
    shown = where if option else f"{where} = {show_toml(value)}"
    try:
        out = _conform(value, tp)
    except _Mismatch:
        out = _Mismatch
    if out is _Mismatch or (rule is not None and out is not None and not rule.test(out)):
        raise RsmtdfError(f"{shown}: expected {_describe(tp)}{' ' + rule.says if rule else ''}")
    return out


_SCALARS: dict[type, tuple[tuple[type, ...], Any]] = {
    bool: ((bool,), bool), int: ((int,), int), float: ((int, float), float), str: ((str,), str)}


def _conform(value: Any, tp: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _conform(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp in _SCALARS:
        accepts, canonical = _SCALARS[tp]
        if isinstance(value, accepts) and (tp is bool or not isinstance(value, bool)):  # TOML's true is no number
            return canonical(value)
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_conform(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_conform(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {k: _conform(v, args[1]) for k, v in value.items()}
    raise TypeError(f"recipe schema: unsupported annotation {tp!r}")  # a bug in this file, not input


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "nothing"}
_PLURAL = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp in _WORDS:
        return _WORDS[tp]
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL.get(args[0], 'values')}"
        return f"a list of {len(args)} {_PLURAL.get(args[0], 'values')}"
    if origin is dict:
        return "a table" if args[1] is Any else f"a table of {_PLURAL.get(args[1], 'values')}"
    return str(tp)


def show_toml(value: Any) -> str:
    """A value as it reads in TOML (strings quoted, true/false, lists in brackets)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_bare_or_quoted(k)} = {show_toml(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_toml(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)


def _bare_or_quoted(key: str) -> str:
    """A TOML key: bare where TOML allows it, else quoted (`"timm:convnext_tiny@224"`)."""
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def as_typed(value: Any) -> str:
    """An option's value as the user typed it (a repeated option's values space-separated)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
