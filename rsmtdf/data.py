"""Datasets: samples (image, mask, geo metadata) read with rasterio, with explicit class tables.

A dataset is a list of `Record`s (one per training tile) plus a `ClassTable` that turns the mask
file's encoding (raw codes or colours) into class indices with 255 as ignore. LoveDA, Potsdam,
DeepGlobe and a user's own folder are the same class with different tables and layouts.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from .errors import RsmtdfError

IGNORE = 255
# What networks see where a raster has no data (NaN or its nodata value), in [0, 1] RGB: the ImageNet
# mean, which DINOv2, CLIP (fed ImageNet-normalised input, as the paper's code does) and the student
# normalise to 0. Those pixels are also ignored (255) by every loss and metric.
NODATA_FILL = (0.485, 0.456, 0.406)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class ClassTable:
    """Class names and how a mask file encodes them.

    `codes` maps a raw mask value to a class index (or IGNORE); `colors` maps an RGB colour to a
    class index. RGB masks use `colors` when there are any, single-band masks `codes` (a table may
    have both: DWL's preparation turns the ISPRS colours into index masks); a value or colour not in
    the table is an error.
    """

    names: tuple[str, ...]
    codes: dict[int, int] = field(default_factory=dict)
    colors: dict[tuple[int, int, int], int] = field(default_factory=dict)

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
            values, inverse = np.unique(key, return_inverse=True)
            unknown = [f"#{v:06x}" for v in values if int(v) not in table]
            if unknown:
                raise RsmtdfError(f"{path}: mask colours {', '.join(unknown[:5])} are not in the class table")
            lut = np.array([table[int(v)] for v in values], dtype=np.uint8)
            return lut[inverse].reshape(raw.shape[:2])
        if raw.ndim == 3:
            raw = raw[..., 0]
        lut = np.full(max(256, int(raw.max()) + 1), -1, dtype=np.int16)
        for code, k in self.codes.items():
            lut[code] = k
        mapped = lut[raw]
        if (mapped < 0).any():
            bad = sorted(int(v) for v in np.unique(raw[mapped < 0]))
            raise RsmtdfError(
                f"{path}: mask codes {bad[:8]} are outside the class table (allowed {sorted(self.codes)})"
            )
        return mapped.astype(np.uint8)


LOVEDA = ClassTable(
    names=("background", "building", "road", "water", "barren", "forest", "agriculture"),
    codes={0: IGNORE, **{k: k - 1 for k in range(1, 8)}},
)
POTSDAM = ClassTable(  # index masks as DWL writes them: 0 = impervious surface ... 5 = clutter
    names=("impervious surface", "building", "low vegetation", "tree", "car", "clutter"),
    codes={**{k: k for k in range(6)}, IGNORE: IGNORE},
    colors={
        (255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3, (255, 255, 0): 4, (255, 0, 0): 5,
    },
)
DEEPGLOBE = ClassTable(  # index masks as DWL writes them: 0 = urban ... 6 = unknown
    names=("urban", "agriculture", "rangeland", "forest", "water", "barren", "unknown"),
    codes={**{k: k for k in range(7)}, IGNORE: IGNORE},
    colors={
        (0, 255, 255): 0, (255, 255, 0): 1, (255, 0, 255): 2, (0, 255, 0): 3, (0, 0, 255): 4,
        (255, 255, 255): 5, (0, 0, 0): 6,
    },
)


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
    mask: Path | None
    split: str  # "train" or "val" (the official split the file came from)
    domain: str = ""
    window: tuple[int, int, int] | None = None  # (row, col, size) inside the scene


def read_raster(path: Path) -> tuple[np.ndarray, str | None, tuple[float, ...] | None]:
    """Whole raster as H×W×C plus CRS and affine; cached so the tiles of one scene decode it once."""
    return read_raster_with_nodata(path)[:3]


def read_raster_with_nodata(path: Path) -> tuple[np.ndarray, str | None, tuple[float, ...] | None, float | None]:
    """`read_raster` plus the raster's declared nodata value (None if it declares none)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise RsmtdfError(f"{path}: unreadable image ({exc.strerror})") from None
    return _read_raster_cached(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_raster_cached(path: Path, mtime_ns: int, size: int):
    _check_png_end(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                data = src.read()
                crs = src.crs.to_string() if src.crs else None
                transform = tuple(src.transform)[:6] if src.crs else None
                nodata = src.nodata
    except RasterioIOError as exc:
        raise RsmtdfError(f"{path}: unreadable image ({_first_line(exc)})") from None
    return np.ascontiguousarray(data.transpose(1, 2, 0)), crs, transform, nodata


def valid_pixels(image: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """H×W bool: False where a band is NaN or where every band equals the raster's nodata value
    (GDAL's per-dataset mask); None when every pixel is valid."""
    invalid = np.isnan(image).any(axis=2) if np.issubdtype(image.dtype, np.floating) else np.zeros(image.shape[:2], bool)
    if nodata is not None and not np.isnan(nodata):
        invalid |= (image == nodata).all(axis=2)
    return ~invalid if invalid.any() else None


def _check_png_end(path: Path) -> None:
    """A PNG cut short decodes to zeros without any error in GDAL's fast whole-image path: refuse it.

    Only files with the PNG signature are checked (GDAL judges the rest); IEND must be in the last bytes.
    """
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read()
    except OSError:
        return  # rasterio reports unopenable files
    if b"IEND" not in tail:
        raise RsmtdfError(f"{path}: truncated image (the PNG ends before its IEND chunk)")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def raster_shape(path: Path) -> tuple[int, int]:
    """(height, width) from the header only, for cheap checks before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.height, src.width
    except RasterioIOError as exc:
        raise RsmtdfError(f"{path}: unreadable image ({_first_line(exc)})") from None


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
    """Tiles of a segmentation dataset, listed once, read lazily with rasterio.

    `records` is sorted by id; `load(i)` returns a `Sample`. Subclasses only list files.
    """

    name = "folder"
    classes: ClassTable
    tile: int | None = None

    def __init__(self, root: str | Path, classes: ClassTable | None = None) -> None:
        self.root = Path(root)
        if classes is not None:
            self.classes = classes
        if not self.root.is_dir():
            raise RsmtdfError(f"{self.root}: dataset folder does not exist")
        records = sorted(self._list(), key=lambda r: r.id)
        if not records:
            raise RsmtdfError(f"{self.root}: no images found for dataset '{self.name}' ({self.layout})")
        self.records = records
        self._index = {r.id: i for i, r in enumerate(records)}

    layout = "images/ and masks/ with matching file names, optionally under Train/ and Val/"

    def _list(self) -> list[Record]:
        splits = [("train", self.root / "Train"), ("val", self.root / "Val")]
        if not any(d.is_dir() for _, d in splits):
            splits = [("train", self.root)]
        records = []
        for split, base in splits:
            records += self._pairs(base / "images", base / "masks", split, prefix=base.relative_to(self.root))
        return records

    def _pairs(self, images: Path, masks: Path, split: str, prefix: Path, domain: str = "", pattern: str = "*",
               mask_stem: tuple[str, str] = ("", "")) -> list[Record]:
        """Image files `pattern` under `images` with their mask under `masks`, tiled if `self.tile`.

        The mask has the image's stem, with `mask_stem[0]` replaced by `mask_stem[1]` when given."""
        if not images.is_dir():
            return []
        by_stem = {p.stem: p for p in masks.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES} if masks.is_dir() else {}
        records = []
        for image in sorted(p for p in images.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES):
            stem = image.stem.replace(*mask_stem) if mask_stem[0] else image.stem
            mask = by_stem.get(stem)
            if mask is None:
                raise RsmtdfError(f"{image}: no mask for this image (looked for {masks}/{stem}.*)")
            base_id = (prefix / image.stem).as_posix()
            if self.tile is None:
                records.append(Record(base_id, image, mask, split, domain))
                continue
            h, w = raster_shape(image)
            if h % self.tile or w % self.tile:
                raise RsmtdfError(f"{image}: size {h}×{w} is not a multiple of the {self.tile} px tile")
            k = 0
            for row in range(0, h, self.tile):
                for col in range(0, w, self.tile):
                    records.append(Record(f"{base_id}_{k}", image, mask, split, domain, (row, col, self.tile)))
                    k += 1
        return records

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
        """Read tile i: image and (checked, decoded) mask, cut to the tile's window."""
        r = self.records[i]
        image, crs, transform, nodata = read_raster_with_nodata(r.image)
        mask = None
        if with_mask and r.mask is not None:
            raw, _, _ = read_raster(r.mask)
            if raw.shape[:2] != image.shape[:2]:
                raise RsmtdfError(
                    f"{r.mask}: mask is {raw.shape[0]}×{raw.shape[1]} but its image is {image.shape[0]}×{image.shape[1]}"
                )
            mask = self.classes.decode(raw, r.mask)
        if r.window is not None:
            row, col, size = r.window
            image = image[row : row + size, col : col + size]
            mask = None if mask is None else mask[row : row + size, col : col + size]
            if transform is not None:
                transform = tuple(rasterio.windows.transform(Window(col, row, size, size), rasterio.Affine(*transform)))[:6]
        valid = valid_pixels(image, nodata)
        if valid is not None and mask is not None:
            mask = np.where(valid, mask, IGNORE).astype(np.uint8)
        return Sample(r.id, np.array(image), mask, crs, transform, valid)  # a copy: the decoded scene is cached

    def size_of(self, i: int) -> tuple[int, int]:
        """(height, width) of tile i, from its window or the raster's header: views need no pixels."""
        r = self.records[i]
        return (r.window[2], r.window[2]) if r.window is not None else raster_shape(r.image)

    def subset(self, ids: list[str]) -> SegmentationDataset:
        """The same dataset restricted to `ids`: for probes, tests and partial runs."""
        sub = copy.copy(self)
        keep = set(ids)
        sub.records = [r for r in self.records if r.id in keep]
        sub._index = {r.id: i for i, r in enumerate(sub.records)}
        return sub

    def describe(self) -> dict:
        """What identifies this dataset in a cache's attributes."""
        return {"name": self.name, "root": str(self.root.resolve()), "classes": list(self.classes.names),
                "tile": self.tile, "num_samples": len(self)}


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


def open_dataset(name: str, root: str | Path, class_names: list[str] | None = None) -> SegmentationDataset:
    """Dataset by registry name; `folder` takes its class names from the recipe (mask codes 0..K-1)."""
    if name not in DATASETS:
        raise RsmtdfError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    if name == "folder":
        if not class_names:
            raise RsmtdfError("dataset 'folder' needs class names in the recipe ([data] classes = [...])")
        table = ClassTable(tuple(class_names), codes={**{k: k for k in range(len(class_names))}, IGNORE: IGNORE})
        return SegmentationDataset(root, table)
    return DATASETS[name](root)


def to_unit_rgb(image: np.ndarray, bands: tuple[int, ...] = (0, 1, 2), max_value: float | Sequence[float] | None = None,
                valid: np.ndarray | None = None, low: Sequence[float] | None = None,
                fill: Sequence[float] = NODATA_FILL) -> np.ndarray:
    """H×W×C raster → H×W×len(bands) float32 in [0, 1], the input every teacher and student expects:
    `(v - low) / max_value` per band, clipped (`scaling.BandScaling` says which numbers).

    Single-band rasters are repeated to every channel; `max_value` defaults to the dtype's range.
    Pixels outside `valid` (a Sample's) and NaN pixels become `fill`, so no NaN reaches a network.
    """
    if image.shape[2] == 1:
        bands = (0,) * len(bands)
    if max_value is None:
        max_value = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    elif not isinstance(max_value, (int, float)):
        max_value = np.asarray(max_value, np.float32)
    rgb = image[..., list(bands)].astype(np.float32)
    if low is not None:
        rgb -= np.asarray(low, np.float32)
    rgb = np.clip(rgb / max_value, 0.0, 1.0)
    invalid = np.isnan(rgb).any(axis=2)
    if valid is not None:
        invalid |= ~valid
    rgb[invalid] = fill
    return rgb
