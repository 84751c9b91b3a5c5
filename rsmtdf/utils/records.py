"""Frozen records compared field by field: what differs, named by its path, with both values.

Every field of a record must be equal unless its type declares otherwise, in the field's metadata:
`may_differ(why)` for a field that legitimately differs (a display palette, where the data lies),
`unknown_when_none(why)` for one that is None where it is not known (measured once a teacher is
built; not recorded by an older release), compared only when both sides know it. Records nest:
a field holding a record is compared field by field, a tuple of named records name by name; a
record that says itself in words (a `describe()` method) is reported whole, in those words.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

MAY_DIFFER = "rsmtdf.may_differ"
UNKNOWN_WHEN_NONE = "rsmtdf.unknown_when_none"
ABSENT = object()  # a dict key one side lacks


def may_differ(why: str) -> dict:
    """Field metadata: this field may differ between two records that are otherwise the same."""
    return {MAY_DIFFER: why}


def unknown_when_none(why: str) -> dict:
    """Field metadata: None means not known here; the field is compared when both sides know it."""
    return {UNKNOWN_WHEN_NONE: why}


@dataclass(frozen=True)
class Difference:
    """`path` (e.g. "views.count") holds `found` on one side and `wanted` on the other, as shown."""

    path: str
    found: str
    wanted: str

    def line(self, found_in: str, wanted_in: str) -> str:
        """`views.count is 8 in the cache, 4 in pipeline/mine.toml`."""
        return f"{self.path} is {self.found} in {found_in}, {self.wanted} in {wanted_in}"


def show(value: Any) -> str:
    """A value as a refusal shows it: short hashes, plain numbers and lists, at most 80 characters."""
    if value is ABSENT:
        return "absent"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value[:12] if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(show(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    elif dataclasses.is_dataclass(value):
        text = show({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(found: Any, wanted: Any, path: str = "",
                shown: tuple[Callable[[Any], str], Callable[[Any], str]] | None = None) -> list[Difference]:
    """Every difference between two values, records compared field by field (see the module
    docstring). A record may say how its values read in a refusal with a method `shown(field,
    value)` (a class index as the class's name); `shown` carries it for each side."""
    if dataclasses.is_dataclass(found) and type(found) is type(wanted):
        out = []
        for f in dataclasses.fields(found):
            if MAY_DIFFER in f.metadata or not f.compare:
                continue
            a, b = getattr(found, f.name), getattr(wanted, f.name)
            if UNKNOWN_WHEN_NONE in f.metadata and (a is None or b is None):
                continue
            out += differences(a, b, _join(path, f.name), (_renderer(found, f.name), _renderer(wanted, f.name)))
        if out and callable(getattr(found, "describe", None)):
            return [Difference(path, found.describe(), wanted.describe())]
        return out
    if _named_records(found) and _named_records(wanted):
        names = [r.name for r in found], [r.name for r in wanted]
        if names[0] != names[1]:
            return [Difference(path, show(names[0]), show(names[1]))]
        return [d for a, b in zip(found, wanted) for d in differences(a, b, _join(path, a.name))]
    mine, theirs = shown or (show, show)
    if isinstance(found, dict) and isinstance(wanted, dict):
        return [Difference(f"{path}[{k}]", mine(found.get(k, ABSENT)), theirs(wanted.get(k, ABSENT)))
                for k in sorted({*found, *wanted}, key=str) if found.get(k, ABSENT) != wanted.get(k, ABSENT)]
    return [] if found == wanted else [Difference(path, mine(found), theirs(wanted))]


def _renderer(record: Any, name: str) -> Callable[[Any], str]:
    """How `record` shows the values of its field `name`: its `shown(name, value)`, else `show`."""
    method = getattr(record, "shown", None)
    return show if method is None else (lambda value: method(name, value))
def _named_records(value: Any) -> bool:
    return isinstance(value, tuple) and all(dataclasses.is_dataclass(v) and hasattr(v, "name") for v in value) \
        and bool(value)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
