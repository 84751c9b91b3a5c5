"""Datasets: samples (image, mask, geo metadata) read with rasterio, with explicit class tables.

A dataset is a list of `Record`s (one per training tile) plus a `ClassTable` that turns the mask
file's encoding (raw codes or colours) into class indices with 255 as ignore. LoveDA, Potsdam,
DeepGlobe and a user's own folder are the same class with different tables and layouts.

Pixels are read by window through `io.raster.RasterReader` (the project's one windowed reader): a tile
reads only its window of the image and of the mask, never the whole scene. Scenes larger than a tile
are cut on `tiling.TileGrid` (`[data] tile_size`, `tile_stride`); a mask on another georeferenced
grid than its image is resampled onto the image's grid (nearest), and its nodata is ignored (255).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from ..errors import RsmtdfError
from ..io.raster import open_cached, raster_header
from ..transforms.pixels import IGNORE
from .classes import DEEPGLOBE, LOVEDA, POTSDAM, ClassTable, folder_classes
from .tiling import TileGrid, empty_tiles, tile_id

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


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
        self._format: tuple[str, int] | None = None
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

    def pixel_format(self) -> tuple[str, int]:
        """(dtype, band count) of the dataset's rasters, from every image's header (read once):
        one of each per dataset, since every network input is scaled by one record."""
        if self._format is None:
            first, formats = None, {}
            for path in dict.fromkeys(r.image for r in self.records):
                formats[path] = raster_header(path)
                first = first or path
                if formats[path] != formats[first]:
                    (d0, c0), (d1, c1) = formats[first], formats[path]
                    raise RsmtdfError(f"{path}: {d1} with {c1} band{'s' * (c1 > 1)}, but {first} is {d0} with {c0}: "
                                      f"a dataset holds one dtype and band count (convert its rasters to one, "
                                      f"e.g. with gdal_translate -ot)")
            self._format = formats[first]
        return self._format

    def check_bands(self, bands: tuple[int, ...], where: str) -> None:
        """Refuse band indices the rasters do not have, from the headers alone, before any cache is
        made (single-band rasters are shown as grey: give them bands = [0, 0, 0])."""
        dtype, count = self.pixel_format()
        if count > 1 and max(bands) >= count:
            raise RsmtdfError(f"{where}: {self.records[0].image} has {count} bands, so band indices go from 0 to "
                              f"{count - 1}")


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
        classes = folder_classes(tuple(classes)) if name == "folder" else None
    return DATASETS[name](root, classes, **tiling)
