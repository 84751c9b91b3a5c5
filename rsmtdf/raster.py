"""Rasters read window by window: the one place where pixels of any raster become model input.

`RasterReader` opens anything rasterio opens (GeoTIFF, VRT, JPEG2000, PNG, ...) and reads one
window at a time, never the whole file: the recipe's bands, scaled to [0, 1] by `BandScaling`
(the same `to_unit_rgb` training uses), and a validity mask that joins every way a raster marks
missing pixels (the nodata value, an alpha band or an internal GDAL mask, i.e. GDAL's mask bands,
and NaN). Nodata pixels are filled with `data.NODATA_FILL` as in training, and the part of a window
outside the raster with `FILL`, the value views pad with, so a network never sees a nodata code as
if it were data and mapping feeds what training fed. `window_grid` is the one window layout for
tiling, sliding evaluation and block-wise prediction.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from .data import to_unit_rgb
from .recipe import Recipe
from .errors import RsmtdfError

FILL = 0.0  # what the part of a window outside the raster becomes in [0, 1] input: views pad with 0 too


def grid_offsets(length: int, size: int, stride: int, edge: Literal["shift", "partial"] = "shift") -> list[int]:
    """Start offsets of windows of `size` every `stride` along an axis of `length` pixels, covering it.

    edge="shift": the last window is moved back to end at the edge (every window full size, as
    sliding evaluation wants; an axis shorter than `size` gets one window that runs past it).
    edge="partial": windows stay on the stride, the last one may end past the edge (tiling, where
    the last partial tile is kept and cut to the raster).
    """
    if size < 1 or stride < 1:
        raise ValueError(f"window size {size} and stride {stride} must be positive")
    if edge == "partial":
        return list(range(0, length, stride)) or [0]
    last = max(length - size, 0)
    return sorted({*range(0, last, stride), last})


def window_grid(height: int, width: int, size: int, stride: int,
                edge: Literal["shift", "partial"] = "shift") -> list[list[Window]]:
    """Windows covering a height×width raster, as rows (top to bottom) of windows (left to right)."""
    xs = grid_offsets(width, size, stride, edge)
    return [[Window(x, y, size, size) for x in xs] for y in grid_offsets(height, size, stride, edge)]


@dataclass(frozen=True)
class BandScaling:
    """Which raster bands (0-based) the model sees and how they reach [0, 1]: divided by
    `max_value`, or by the dtype's range when it is None (floats are taken as already in [0, 1])."""

    bands: tuple[int, int, int] = (0, 1, 2)
    max_value: float | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> BandScaling:
        return cls(tuple(recipe.data.bands), recipe.data.max_value)


class RasterReader:
    """One open raster, read by window; a context manager. Not shared between threads."""

    def __init__(self, path: str | Path, scaling: BandScaling = BandScaling()) -> None:
        self.path = Path(path)
        self.scaling = scaling
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.src = rasterio.open(self.path)
        except RasterioIOError as exc:
            raise RsmtdfError(f"{self.path}: unreadable raster ({first_line(exc)})") from None
        count = self.src.count
        if count == 1:
            self.indexes = [1]  # a single band is repeated to three, as to_unit_rgb does
        else:
            bad = [b for b in scaling.bands if not 0 <= b < count]
            if bad:
                self.src.close()
                raise RsmtdfError(f"{self.path}: band {bad[0]} asked for, the raster has {count} bands (0..{count - 1})")
            self.indexes = [b + 1 for b in scaling.bands]
        self.height, self.width = self.src.height, self.src.width
        self.crs = self.src.crs
        self.transform = self.src.transform

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.src.close()

    def read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(h×w×C pixels in the raster's dtype, h×w validity) of the selected bands in `window`;
        the part of the window outside the raster is 0 and invalid.

        A pixel is valid where any selected band's GDAL mask says so (GDAL's own rule for a
        dataset mask) and none of its values is NaN."""
        h, w = int(window.height), int(window.width)
        inner = window.intersection(Window(0, 0, self.width, self.height))
        r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
        ih, iw = int(inner.height), int(inner.width)
        try:
            data = self.src.read(self.indexes, window=inner)
            masks = self.src.read_masks(self.indexes, window=inner)
        except RasterioIOError as exc:
            raise RsmtdfError(f"{self.path}: unreadable at rows {int(inner.row_off)}..{int(inner.row_off) + ih} "
                              f"(truncated or corrupt file: {first_line(exc.__cause__ or exc)})") from None
        valid_in = (masks > 0).any(axis=0)
        if np.issubdtype(data.dtype, np.floating):
            valid_in &= ~np.isnan(data).any(axis=0)
        pixels = np.zeros((h, w, len(self.indexes)), data.dtype)
        valid = np.zeros((h, w), bool)
        pixels[r0 : r0 + ih, c0 : c0 + iw] = data.transpose(1, 2, 0)
        valid[r0 : r0 + ih, c0 : c0 + iw] = valid_in
        return pixels, valid

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(h×w×3 float32 in [0, 1], h×w validity) for `window`: nodata pixels hold NODATA_FILL, as in
        training; the part outside the raster holds FILL, as views pad."""
        pixels, valid = self.read_raw(window)
        if np.issubdtype(pixels.dtype, np.floating):
            pixels = np.where(valid[..., None], pixels, 0)
        unit = to_unit_rgb(pixels, (0, 1, 2), self.scaling.max_value, valid)  # bands were selected when reading
        inner = window.intersection(Window(0, 0, self.width, self.height))
        r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
        outside = np.ones(valid.shape, bool)
        outside[r0 : r0 + int(inner.height), c0 : c0 + int(inner.width)] = False
        unit[outside] = FILL
        return unit, valid


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (GDAL's can run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
