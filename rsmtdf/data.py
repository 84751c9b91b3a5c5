"""Datasets: samples (image, mask, geo metadata) read with rasterio, with explicit class tables.

A dataset is a list of `Record`s (one per training tile) plus a `ClassTable` that turns the mask
file's encoding (raw codes or colours) into class indices with 255 as ignore. LoveDA, Potsdam,
DeepGlobe and a user's own folder are the same class with different tables and layouts.

Pixels are read by window through `raster.RasterReader` (the project's one windowed reader): a tile
reads only its window of the image and of the mask, never the whole scene. Scenes larger than a tile
are cut on `tiling.TileGrid` (`[data] tile_size`, `tile_stride`); a mask on another georeferenced
grid than its image is resampled onto the image's grid (nearest), and its nodata is ignored (255).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Sequence

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from .errors import RsmtdfError

if TYPE_CHECKING:
    from .recipe import DataConfig

IGNORE = 255
# What networks see where a raster has no data (NaN or its nodata value), in [0, 1] RGB: the ImageNet
# mean, which DINOv2, CLIP (fed ImageNet-normalised input, as the paper's code does) and the student
# normalise to 0. Those pixels are also ignored (255) by every loss and metric.
NODATA_FILL = (0.485, 0.456, 0.406)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


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
    palette: tuple[Colour, ...] = ()

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
        raise RsmtdfError(f"{path}: mask {kind}{'s' if len(unknown) > 1 else ''} {shown} "
                          f"{'are' if len(unknown) > 1 else 'is'} neither a class nor ignored "
                          f"(classes: {known}; ignored: {ignored or 'none'}); a folder dataset declares its "
                          f"{'colours in [data] colors' if kind == 'colour' else 'codes in [data] codes'} and ignore_codes")

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

    def difference(self, other: ClassTable) -> str | None:
        """How `other` would label the same masks otherwise (names, codes, colours; the palette only
        draws), in a phrase, or None when it labels them alike."""
        if self.names != other.names:
            return f"classes {list(self.names)} vs {list(other.names)}"
        for what, mine, theirs in (("code", self.codes, other.codes), ("colour", self.colors, other.colors)):
            if changed := sorted((v, mine.get(v), theirs.get(v)) for v in {*mine, *theirs} if mine.get(v) != theirs.get(v)):
                v, a, b = changed[0]
                return f"mask {what} {v} means {self._meaning(a)} vs {self._meaning(b)}" + \
                       (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
        return None

    def _meaning(self, k: int | None) -> str:
        return "nothing (refused)" if k is None else "ignore" if k == IGNORE else f"'{self.names[k]}'"

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


def class_table(data: DataConfig) -> ClassTable:
    """The class table a recipe's `[data]` section gives: a known dataset's own (with the recipe's
    palette, if any), or a folder's from `classes`, `codes`, `colors` and `ignore_codes` (codes
    0..K-1 and nothing else when no codes are given). The recipe checked names and values."""
    names = tuple(data.classes)
    if data.dataset != "folder":
        table = DATASETS[data.dataset].classes
        names = table.names
    else:
        codes: dict[int, int] = {}
        for k, name in enumerate(names):
            given = data.codes.get(name, () if data.codes or data.colors else k)
            for code in (given,) if isinstance(given, int) else given:
                codes[code] = k
        codes.update({c: IGNORE for c in data.ignore_codes})
        colors = {tuple(rgb): names.index(n) for n, rgb in data.colors.items()}
        table = ClassTable(names, codes, colors)
    given = {names.index(n): hex_colour(c) for n, c in data.palette.items()}
    default = table.palette or tuple(map(tuple, table.colours()[: len(names)].tolist()))
    return dataclasses.replace(table, palette=tuple(given.get(k, default[k]) for k in range(len(names))))


@dataclass
class Sample:
    """One tile: image H×W×C in the raster's dtype, mask H×W uint8 (255 = ignore, also where the
    image has no data), geo metadata, and `valid` (H×W bool; None when every pixel is valid)."""

    id: str
    image: np.ndarray
    mask: np.ndarray | None
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    valid: np.ndarray | None = None


@dataclass(frozen=True)
class Record:
    """Where a tile lives: its image and mask files and, for tiled scenes, its window."""

    id: str
    image: Path
    mask: Path | None  # None: an unlabeled scene, which only unlabeled split lists may name
    split: str  # "train" or "val" (the official split the file came from)
    domain: str = ""
    window: tuple[int, int, int, int] | None = None  # (row, col, height, width) inside the scene

    @property
    def labeled(self) -> bool:
        return self.mask is not None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_bands(dataset: SegmentationDataset, bands: tuple[int, ...], where: str) -> None:
    """Refuse band indices a raster of the dataset does not have, from the headers alone, before any
    cache is made (single-band rasters are shown as grey and take any `bands`)."""
    for path in dict.fromkeys(r.image for r in dataset.records):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    count = src.count
        except RasterioIOError as exc:
            raise RsmtdfError(f"{path}: unreadable image ({_first_line(exc)})") from None
        if count > 1 and max(bands) >= count:
            raise RsmtdfError(f"{where}: {path} has {count} bands, so band indices go from 0 to {count - 1}")


class SegmentationDataset:
    """Tiles of a segmentation dataset, listed once, read lazily by window with rasterio.

    `records` is sorted by id; `load(i)` returns a `Sample`. Subclasses only list files. With a
    tile size, each scene is cut on a `tiling.TileGrid`; tiles without a valid pixel are left out
    and counted in `skipped_empty`.
    """

    name = "folder"
    classes: ClassTable
    tile: int | None = None
    stride: int | None = None  # None: the tile size

    def __init__(self, root: str | Path, classes: ClassTable | None = None, tile_size: int | None = None,
                 tile_stride: int | None = None) -> None:
        self.root = Path(root)
        if classes is not None:
            self.classes = classes
        if tile_size is not None:
            self.tile, self.stride = tile_size, tile_stride
        self.skipped_empty = 0
        if not self.root.is_dir():
            raise RsmtdfError(f"{self.root}: dataset folder does not exist")
        records = sorted(self._list(), key=lambda r: r.id)
        if not records:
            raise RsmtdfError(f"{self.root}: no images found for dataset '{self.name}' ({self.layout})")
        self.records = records
        self._index = {r.id: i for i, r in enumerate(records)}

    layout = ("images/ and masks/ with matching file names (and unlabeled scenes in unlabeled/), "
              "optionally under Train/ and Val/")

    def _list(self) -> list[Record]:
        splits = [("train", self.root / "Train"), ("val", self.root / "Val")]
        if not any(d.is_dir() for _, d in splits):
            splits = [("train", self.root)]
        records = []
        for split, base in splits:
            prefix = base.relative_to(self.root)
            records += self._pairs(base / "images", base / "masks", split, prefix=prefix)
            if split == "train":  # scenes without masks: unlabeled training data
                records += self._pairs(base / "unlabeled", None, split, prefix=prefix / "unlabeled")
        return records

    def _pairs(self, images: Path, masks: Path | None, split: str, prefix: Path, domain: str = "",
               pattern: str = "*", mask_stem: tuple[str, str] = ("", "")) -> list[Record]:
        """Image files `pattern` under `images` with their mask under `masks` (None: unlabeled
        images), tiled if `self.tile`.

        The mask has the image's stem, with `mask_stem[0]` replaced by `mask_stem[1]` when given."""
        if not images.is_dir():
            return []
        by_stem = {p.stem: p for p in masks.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES} \
            if masks is not None and masks.is_dir() else {}
        records = []
        for image in sorted(p for p in images.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES):
            mask = None
            if masks is not None:
                stem = image.stem.replace(*mask_stem) if mask_stem[0] else image.stem
                mask = by_stem.get(stem)
                if mask is None:
                    raise RsmtdfError(f"{image}: no mask for this image (looked for {masks}/{stem}.*; "
                                      f"put images without masks in unlabeled/)")
            records += self._tiles(Record((prefix / image.stem).as_posix(), image, mask, split, domain))
        return records

    def _tiles(self, scene: Record) -> list[Record]:
        """The scene's tiles (the scene itself when untiled), those without a valid pixel left out."""
        if self.tile is None:
            return [scene]
        from .raster import open_cached
        from .tiling import TileGrid, empty_tiles

        src = open_cached(scene.image)
        grid = TileGrid(self.tile, self.stride or self.tile)
        windows = grid.windows(src.height, src.width)
        empty = empty_tiles(scene.image, grid)
        self.skipped_empty += sum(empty)
        return [dataclasses.replace(scene, id=self.tile_id(scene, k, w), window=(
                    int(w.row_off), int(w.col_off), int(w.height), int(w.width)))
                for k, (w, e) in enumerate(zip(windows, empty)) if not e]

    def tile_id(self, scene: Record, k: int, window: Window) -> str:
        """Tile k (raster order) of a scene: `<scene id>@<row>_<col>`, stable when scenes are added."""
        from .tiling import tile_id

        return tile_id(scene.id, window)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def ids_in(self, split: str) -> list[str]:
        return [r.id for r in self.records if r.split == split]

    def index(self, sample_id: str) -> int:
        try:
            return self._index[sample_id]
        except KeyError:
            raise RsmtdfError(f"{self.root}: no sample '{sample_id}' in dataset '{self.name}'") from None

    def load(self, i: int, with_mask: bool = True) -> Sample:
        """Read tile i: its window of the image (every band) and of the (checked, decoded) mask."""
        from .raster import open_cached

        r = self.records[i]
        src = open_cached(r.image)
        window = self._window(r, src)
        image, valid = src.read_raw(window)
        mask = None
        if with_mask and r.mask is not None:
            mask = np.where(valid, self._read_mask(r, src, window), IGNORE).astype(np.uint8)
        crs = src.crs.to_string() if src.georeferenced else None
        transform = tuple(src.src.window_transform(window))[:6] if src.georeferenced else None
        return Sample(r.id, image, mask, crs, transform, None if valid.all() else valid)

    @staticmethod
    def _window(r: Record, src) -> Window:
        if r.window is None:
            return Window(0, 0, src.width, src.height)
        row, col, h, w = r.window
        return Window(col, row, w, h)

    def _read_mask(self, r: Record, image_src, window: Window) -> np.ndarray:
        """The mask's class indices in `window` of the image's grid; mask nodata (and, for an aligned
        mask, what lies outside it) is ignored. A mask on another grid is resampled onto the image's
        grid (nearest) when both are georeferenced, and refused otherwise."""
        from .raster import open_cached

        src = open_cached(r.mask)
        if not src.same_grid(image_src):
            if not (src.georeferenced and image_src.georeferenced):
                raise RsmtdfError(f"{r.mask}: mask grid {src.grid()} is not its image's grid {image_src.grid()} "
                                  f"({r.image}), and without georeferencing on both it cannot be aligned")
            src = open_cached(r.mask, align_to=r.image)
        raw, valid = src.read_raw(window)
        if valid.all():
            return self.classes.decode(raw, r.mask)
        mask = np.full(valid.shape, IGNORE, np.uint8)
        if valid.any():  # decode only the pixels the mask has: nodata codes need not be in the table
            mask[valid] = self.classes.decode(raw[valid][None], r.mask)[0]
        return mask

    def size_of(self, i: int) -> tuple[int, int]:
        """(height, width) of tile i, from its window or the raster's header: views need no pixels."""
        from .raster import open_cached

        r = self.records[i]
        if r.window is not None:
            return r.window[2], r.window[3]
        src = open_cached(r.image)
        return src.height, src.width

    def subset(self, ids: list[str]) -> SegmentationDataset:
        """The same dataset restricted to `ids`: for probes, tests and partial runs."""
        keep = set(ids)
        return self.with_records([r for r in self.records if r.id in keep])

    def with_records(self, records: list[Record]) -> SegmentationDataset:
        """The same dataset listing `records` instead (a subset, or splits reassigned)."""
        other = copy.copy(self)
        other.records = records
        other._index = {r.id: i for i, r in enumerate(records)}
        return other

    def describe(self) -> dict:
        """What identifies this dataset in a cache's attributes (`open_described` reopens it)."""
        tiling = {} if self.stride in (None, self.tile) else {"tile_stride": self.stride}
        skipped = {"empty_tiles_skipped": self.skipped_empty} if self.skipped_empty else {}
        return {"name": self.name, "root": str(self.root.resolve()), "classes": list(self.classes.names),
                "class_table": self.classes.to_attrs(), "tile": self.tile, **tiling, "num_samples": len(self), **skipped}


class LoveDA(SegmentationDataset):
    """LoveDA in its official layout `{Train,Val}/{Urban,Rural}/{images_png,masks_png}`.

    DWL protocol: each 1024² scene is cut into four 512² tiles `<Split>/<Domain>/<stem>_<k>`.
    A missing split or domain folder is fine (partial downloads look like that).
    """

    name = "loveda"
    classes = LOVEDA
    tile = 512
    layout = "{Train,Val}/{Urban,Rural}/{images_png,masks_png}"

    def _list(self) -> list[Record]:
        records = []
        for split in ("Train", "Val"):
            for domain in ("Urban", "Rural"):
                base = self.root / split / domain
                records += self._pairs(base / "images_png", base / "masks_png", split.lower(),
                                       Path(split) / domain, domain.lower())
        return records

    def _tiles(self, scene: Record) -> list[Record]:
        from .raster import open_cached

        src = open_cached(scene.image)
        if src.height % self.tile or src.width % self.tile:
            raise RsmtdfError(f"{scene.image}: size {src.height}×{src.width} is not a multiple of the {self.tile} px tile")
        return super()._tiles(scene)

    def tile_id(self, scene: Record, k: int, window: Window) -> str:
        """DWL's names: `<stem>_<k>`, k in raster order (the committed split lists use them)."""
        return f"{scene.id}_{k}"


class Potsdam(SegmentationDataset):
    """ISPRS Potsdam as DWL prepares it: 512² crops `image/top_potsdam_<scene>_<k>_RGB.tif` with
    index masks `label/top_potsdam_<scene>_<k>_label.tif`; the id is the image's stem, as the
    committed split lists name it. Without `image/`, the folder layout with colour masks."""

    name = "potsdam"
    classes = POTSDAM
    layout = "DWL's image/*_RGB.tif + label/*_label.tif, or images/ + masks/"

    def _list(self) -> list[Record]:
        if not (self.root / "image").is_dir():
            return super()._list()
        return self._pairs(self.root / "image", self.root / "label", "train", Path("."), pattern="*_RGB.*",
                           mask_stem=("_RGB", "_label"))


class DeepGlobe(SegmentationDataset):
    """DeepGlobe land cover as DWL prepares it: 512² crops `data_cropped/<scene>_sat_<k>.jpg` beside
    index masks `<scene>_mask_<k>.png`; the id is the image's stem, as the committed split lists name
    it. Without `data_cropped/`, the folder layout with colour masks."""

    name = "deepglobe"
    classes = DEEPGLOBE
    layout = "DWL's data_cropped/*_sat_*.jpg + *_mask_*.png, or images/ + masks/"

    def _list(self) -> list[Record]:
        crops = self.root / "data_cropped"
        if not crops.is_dir():
            return super()._list()
        return self._pairs(crops, crops, "train", Path("."), pattern="*_sat_*", mask_stem=("_sat_", "_mask_"))


DATASETS: dict[str, type[SegmentationDataset]] = {
    "loveda": LoveDA, "potsdam": Potsdam, "deepglobe": DeepGlobe, "folder": SegmentationDataset,
}


def open_dataset(name: str, root: str | Path, classes: list[str] | ClassTable | None = None,
                 tile_size: int | None = None, tile_stride: int | None = None) -> SegmentationDataset:
    """Dataset by registry name. `classes`: a class table, or a `folder`'s class names (mask codes
    0..K-1, nothing ignored). `tile_size`/`tile_stride` cut its scenes into tiles (LoveDA's
    protocol fixes its own)."""
    if name not in DATASETS:
        raise RsmtdfError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    tiling = {"tile_size": tile_size, "tile_stride": tile_stride} if DATASETS[name].tile is None else {}
    if name == "folder" and not classes:
        raise RsmtdfError("dataset 'folder' needs class names in the recipe ([data] classes = [...])")
    if classes is not None and not isinstance(classes, ClassTable):
        classes = ClassTable(tuple(classes), codes={k: k for k in range(len(classes))}) if name == "folder" else None
    return DATASETS[name](root, classes, **tiling)


def open_recipe_dataset(data: DataConfig) -> SegmentationDataset:
    """The dataset a recipe's `[data]` section names, with its class table and tiling."""
    return open_dataset(data.dataset, data.root, class_table(data), data.tile_size, data.tile_stride)


def described_classes(ds: dict) -> ClassTable:
    """The class table a cache's or checkpoint's `dataset` attributes record (caches from before
    tables were kept: a known dataset's own, a folder's codes 0..K-1 with 255 ignored, as then)."""
    if "class_table" in ds:
        return ClassTable.from_attrs(ds["class_table"])
    if ds["name"] != "folder":
        return DATASETS[ds["name"]].classes
    names = ds.get("classes") or []
    return ClassTable(tuple(names), codes={**{k: k for k in range(len(names))}, IGNORE: IGNORE})


def open_described(ds: dict) -> SegmentationDataset:
    """The dataset a cache's or checkpoint's `dataset` attributes (`describe()`) name, tiled as it
    was, with the class table it was made with."""
    return open_dataset(ds["name"], ds["root"], described_classes(ds), ds.get("tile"), ds.get("tile_stride"))


def to_unit_rgb(image: np.ndarray, bands: tuple[int, ...] = (0, 1, 2), max_value: float | Sequence[float] | None = None,
                valid: np.ndarray | None = None, low: Sequence[float] | None = None,
                fill: Sequence[float] = NODATA_FILL) -> np.ndarray:
    """H×W×C raster → H×W×len(bands) float32 in [0, 1], the input every teacher and student expects:
    `(v - low) / max_value` per band, clipped (`scaling.BandScaling` says which numbers).

    Single-band rasters are repeated to every channel; `max_value` defaults to the dtype's range.
    Pixels outside `valid` (a Sample's) and NaN pixels become `fill`, so no NaN reaches a network.
    `unit_pixels` is the same arithmetic on a tensor, for the training device; numpy here, because
    on the CPU it is about 3× faster on large tiles (huge pages), and a test keeps the two bit-equal.
    """
    if max_value is None:
        max_value = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    elif not isinstance(max_value, (int, float)):
        max_value = np.asarray(max_value, np.float32)
    rgb = pick_bands(image, bands).astype(np.float32)
    if low is not None:
        rgb -= np.asarray(low, np.float32)
    rgb = np.clip(rgb / max_value, 0.0, 1.0, out=rgb)
    invalid = None if np.issubdtype(image.dtype, np.integer) else np.isnan(rgb).any(axis=2)  # integers hold no NaN
    if valid is not None:
        invalid = ~valid if invalid is None else invalid | ~valid
    if invalid is not None:
        rgb[invalid] = fill
    return rgb


def pick_bands(image: np.ndarray, bands: tuple[int, ...]) -> np.ndarray:
    """The raster's `bands` (H×W×len(bands), its dtype); a single-band raster's one band repeated.
    All bands in their order: the image itself (a view, not a copy)."""
    if tuple(bands) == tuple(range(image.shape[2])):
        return image
    return image[..., list((0,) * len(bands) if image.shape[2] == 1 else bands)]


def unit_pixels(pixels: torch.Tensor, max_value: float | Sequence[float] | None = None, valid: torch.Tensor | None = None,
                low: Sequence[float] | None = None, fill: Sequence[float] = NODATA_FILL) -> torch.Tensor:
    """`to_unit_rgb`'s arithmetic on picked bands (H×W×C, the raster's dtype, a tensor on any
    device) → float32 H×W×C: what training runs on the device, bit-equal to `to_unit_rgb`."""
    if max_value is None:
        max_value = float(torch.iinfo(pixels.dtype).max) if not pixels.dtype.is_floating_point else 1.0
    elif not isinstance(max_value, (int, float)):
        max_value = torch.tensor(np.asarray(max_value, np.float32), device=pixels.device)
    x = pixels.to(torch.float32, copy=True)
    if low is not None:
        x -= torch.tensor(np.asarray(low, np.float32), device=x.device)
    x = x.div_(max_value).clamp_(0.0, 1.0)
    invalid = torch.isnan(x).any(-1) if pixels.dtype.is_floating_point else None  # integers hold no NaN
    if valid is not None:
        invalid = ~valid if invalid is None else invalid | ~valid
    if invalid is not None:
        x[invalid] = torch.tensor(fill, dtype=torch.float32, device=x.device)
    return x
