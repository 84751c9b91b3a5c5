"""Class tables: class names, how a mask file encodes them (codes or colours), how maps draw them.

LoveDA, Potsdam and DeepGlobe have their own tables here; a `folder` dataset's comes from its
recipe through `folder_classes`, the one place its default (codes 0..K-1 and nothing else) is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import RsmtdfError
from ..transforms.pixels import IGNORE
from ..utils.records import ABSENT, may_differ, show

Colour = tuple[int, int, int]


@dataclass(frozen=True)
class ClassTable:
    """Class names, how a mask file encodes them, and how maps draw them.

    `codes` maps a raw mask value to a class index (or IGNORE); `colors` maps an RGB colour to a
    class index. RGB masks use `colors` when there are any, single-band masks `codes` (a table may
    have both: DWL's preparation turns the ISPRS colours into index masks). A value or colour that
    is neither a class nor ignored is refused, never guessed: a 0/255 road mask read with codes
    0..1 would otherwise train on nothing. `palette` is one display colour per class ([] = tab20).
    """

    names: tuple[str, ...]
    codes: dict[int, int] = field(default_factory=dict)
    colors: dict[Colour, int] = field(default_factory=dict)
    palette: tuple[Colour, ...] = field(default=(), metadata=may_differ("a display colour labels no pixel"))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw mask (H×W codes or H×W×3 colours) → H×W uint8 class indices, 255 = ignore."""
        if self.colors and (not self.codes or raw.ndim == 3 and raw.shape[2] >= 3):
            if raw.ndim != 3 or raw.shape[2] < 3:
                raise RsmtdfError(f"{path}: expected an RGB colour mask, got {raw.shape[2:] or 'one band'}")
            key = (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
            table = {(r << 16) | (g << 8) | b: k for (r, g, b), k in self.colors.items()}
            values, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
            self._refuse([(f"#{int(v):06x}", int(c)) for v, c in zip(values, counts) if int(v) not in table],
                         path, "colour")
            lut = np.array([table[int(v)] for v in values], dtype=np.uint8)
            return lut[inverse].reshape(raw.shape[:2])
        if raw.ndim == 3:
            raw = raw[..., 0]
        lut = np.full(max(256, int(raw.max()) + 1), -1, dtype=np.int16)
        for code, k in self.codes.items():
            lut[code] = k
        mapped = lut[raw]
        if (mapped < 0).any():
            values, counts = np.unique(raw[mapped < 0], return_counts=True)
            self._refuse([(str(int(v)), int(c)) for v, c in zip(values, counts)], path, "code")
        return mapped.astype(np.uint8)

    def _refuse(self, unknown: list[tuple[str, int]], path: Path, kind: str) -> None:
        """One line naming the values that are neither a class nor ignored, with their pixel counts."""
        if not unknown:
            return
        shown = ", ".join(f"{v} ({c:,} px)".replace(",", " ") for v, c in unknown[:6])
        declared = self.colors if kind == "colour" else self.codes
        known = ", ".join(
            f"{self.names[k]} = {f'#{(c[0] << 16) | (c[1] << 8) | c[2]:06x}' if kind == 'colour' else c}"
            for c, k in declared.items() if k != IGNORE)
        ignored = [c for c, k in declared.items() if k == IGNORE]
        hint = " (masks prepared for mmseg or UniMatch mark 'no label' with 255: add ignore_codes = [255] to [data])" \
            if kind == "code" and "255" in (v for v, _ in unknown) and IGNORE not in declared else ""
        raise RsmtdfError(f"{path}: mask {kind}{'s' if len(unknown) > 1 else ''} {shown} "
                          f"{'are' if len(unknown) > 1 else 'is'} neither a class nor ignored "
                          f"(classes: {known}; ignored: {ignored or 'none'}); a folder dataset declares its "
                          f"{'colours in [data] colors' if kind == 'colour' else 'codes in [data] codes'} and "
                          f"ignore_codes{hint}")

    def colours(self) -> np.ndarray:
        """(256, 3) uint8 display colours by class index (the palette, else tab20); ignore is black."""
        from matplotlib import colormaps

        table = np.zeros((256, 3), np.uint8)
        tab = (np.array(colormaps["tab20"].colors) * 255).astype(np.uint8)
        table[: self.num_classes] = tab[np.arange(self.num_classes) % len(tab)]
        for k, rgb in enumerate(self.palette[: self.num_classes]):
            table[k] = rgb
        return table

    def to_attrs(self) -> dict:
        """JSON-able form kept in a cache's dataset attributes (`from_attrs` reads it back)."""
        return {"names": list(self.names), "codes": [[c, k] for c, k in self.codes.items()],
                "colors": [[*c, k] for c, k in self.colors.items()], "palette": [list(c) for c in self.palette]}

    def shown(self, field_name: str, value: object) -> str:
        """How a refusal shows this table's values: what a raw code or colour means (a class name,
        ignore, or refused), the rest as they are."""
        if field_name not in ("codes", "colors"):
            return show(value)
        if value is ABSENT:
            return "nothing (refused)"
        return "ignore" if value == IGNORE else repr(self.names[value]) if isinstance(value, int) and \
            0 <= value < len(self.names) else show(value)

    @classmethod
    def from_attrs(cls, a: dict) -> ClassTable:
        return cls(tuple(a["names"]), {int(c): int(k) for c, k in a["codes"]},
                   {(int(r), int(g), int(b)): int(k) for r, g, b, k in a["colors"]},
                   tuple(tuple(int(v) for v in c) for c in a["palette"]))


LOVEDA = ClassTable(
    names=("background", "building", "road", "water", "barren", "forest", "agriculture"),
    codes={0: IGNORE, **{k: k - 1 for k in range(1, 8)}},
    palette=((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183), (0, 255, 0), (255, 195, 128)),
)
POTSDAM = ClassTable(  # index masks as DWL writes them: 0 = impervious surface ... 5 = clutter
    names=("impervious surface", "building", "low vegetation", "tree", "car", "clutter"),
    codes={**{k: k for k in range(6)}, IGNORE: IGNORE},
    colors={
        (255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4, (255, 0, 0): 5,
    },
    palette=((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)),
)
DEEPGLOBE = ClassTable(  # index masks as DWL writes them: 0 = urban ... 6 = unknown
    names=("urban", "agriculture", "rangeland", "forest", "water", "barren", "unknown"),
    codes={**{k: k for k in range(7)}, IGNORE: IGNORE},
    colors={
        (0, 255, 255): 0, (255, 255, 0): 1, (255, 0, 255): 2, (0, 255, 0): 3, (0, 0, 255): 4,
        (255, 255, 255): 5, (0, 0, 0): 6,
    },
    palette=((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)),
)


def hex_colour(text: str) -> Colour | None:
    """"#rrggbb" → (r, g, b), or None when it is not one."""
    if len(text) != 7 or text[0] != "#":
        return None
    try:
        return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)
    except ValueError:
        return None


def folder_classes(names: tuple[str, ...], codes: dict[str, int | tuple[int, ...]] | None = None,
                   colors: dict[str, Colour] | None = None, ignore_codes: tuple[int, ...] = ()) -> ClassTable:
    """A `folder` dataset's table: each class's raw code(s) and colour as given, the `ignore_codes`
    ignored; with neither codes nor colours, class k is code k and every other code is refused
    (255 included: a mask that uses it for 'no label' says so with ignore_codes = [255])."""
    codes, colors = codes or {}, colors or {}
    table: dict[int, int] = {}
    for k, name in enumerate(names):
        given = codes.get(name, () if codes or colors else k)
        for code in (given,) if isinstance(given, int) else given:
            table[code] = k
    table.update({c: IGNORE for c in ignore_codes})
    return ClassTable(tuple(names), table, {tuple(rgb): names.index(n) for n, rgb in colors.items()})


def with_palette(table: ClassTable, palette: dict[str, str]) -> ClassTable:
    """The table drawn with `palette` ("#rrggbb" per class name) over its own colours (else tab20)."""
    given = {table.names.index(n): hex_colour(c) for n, c in palette.items()}
    default = table.palette or tuple(map(tuple, table.colours()[: table.num_classes].tolist()))
    return replace(table, palette=tuple(given.get(k, default[k]) for k in range(table.num_classes)))
