"""Rasters read window by window: the one place where pixels of any raster become model input.

`RasterReader` opens anything rasterio opens (GeoTIFF, VRT, JPEG2000, PNG, ...) and reads one
window at a time, never the whole file: the model's bands, scaled to [0, 1] by `BandScaling`
(the same scaling training uses), and a validity mask that joins every way a raster marks
missing pixels (the nodata value, an alpha band or an internal GDAL mask, i.e. GDAL's mask bands,
and NaN or ±inf). Nodata pixels are filled with `pixels.NODATA_FILL` as in training, and the part of a window
outside the raster with `FILL`, the value views pad with, so a network never sees a nodata code as
if it were data and mapping feeds what training fed. `window_grid` is the one window layout for
tiling, sliding evaluation and block-wise prediction.

Datasets read their tiles through the same reader (every band, raw: `scaling=None`), kept open in a
small per-process cache (`open_cached`) as torchgeo keeps file handles rather than decoded pixels;
a mask on another grid than its image is read through a `WarpedVRT` onto the image's grid.
GDAL's block cache is capped at 64 MB per process (unless GDAL_CACHEMAX is set): its default, 5 % of
the RAM, would let every loader worker's memory grow with the scenes it reads across.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from ..errors import RsmtdfError
from ..transforms.scaling import BandScaling
from ..utils.files import first_line

os.environ.setdefault("GDAL_CACHEMAX", "64")  # MB; read by GDAL when its block cache is first used
FILL = 0.0  # what the part of a window outside the raster becomes in [0, 1] input: views pad with 0 too


def grid_offsets(length: int, size: int, stride: int, edge: Literal["shift", "partial"] = "shift") -> list[int]:
    """Start offsets of windows of `size` every `stride` along an axis of `length` pixels, covering it.

    edge="shift": as few windows as `stride` allows, spread evenly from 0 to the one ending at the
    edge (every window full size, as sliding inference wants; an axis shorter than `size` gets one
    window that runs past it). Even spacing keeps every overlap near `size - stride`: a last window
    merely moved back would overlap its neighbour by up to `size - 1` rows, and mapping carries the
    overlap of two window rows across the scene's width (168 MB at 16384 px wide, window 512).
    edge="partial": windows stay on the stride, the last one is the first to reach the edge and may
    end past it (tiling, where the last partial tile is kept and cut to the raster).
    """
    if size < 1 or stride < 1:
        raise ValueError(f"window size {size} and stride {stride} must be positive")
    if edge == "partial":
        return list(range(0, -(-max(length - size, 0) // stride) * stride + 1, stride))
    last = max(length - size, 0)
    gaps = -(-last // stride)  # windows at most `stride` apart
    return [k * last // gaps for k in range(gaps + 1)] if gaps else [0]


def window_grid(height: int, width: int, size: int, stride: int,
                edge: Literal["shift", "partial"] = "shift") -> list[list[Window]]:
    """Windows covering a height×width raster, as rows (top to bottom) of windows (left to right)."""
    xs = grid_offsets(width, size, stride, edge)
    return [[Window(x, y, size, size) for x in xs] for y in grid_offsets(height, size, stride, edge)]


class RasterReader:
    """One open raster, read by window; a context manager. Not shared between threads.

    `scaling=None` reads every band raw (datasets: a Sample keeps all bands); `align_to` reads the
    raster resampled (nearest) onto another reader's grid, pixels outside its extent invalid."""

    def __init__(self, path: str | Path, scaling: BandScaling | None = BandScaling(), *,
                 align_to: RasterReader | None = None) -> None:
        self.path = Path(path)
        self.scaling = scaling
        self._selected = None if scaling is None else scaling.selected()
        check_png_end(self.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.file = self.src = rasterio.open(self.path)
        except RasterioIOError as exc:
            raise RsmtdfError(f"{self.path}: unreadable raster ({first_line(exc)})") from None
        count = self.file.count
        if align_to is not None:  # the alpha band it adds marks what lies outside this raster
            self.src = WarpedVRT(self.file, crs=align_to.crs, transform=align_to.transform, width=align_to.width,
                                 height=align_to.height, resampling=Resampling.nearest, add_alpha=True)
        if scaling is None:
            self.indexes = list(range(1, count + 1))
        elif count == 1 and len(scaling.bands) == 3:
            self.indexes = [1]  # a single band is repeated to three, as to_unit_rgb does
        else:
            bad = [b for b in scaling.bands if not 0 <= b < count]
            if bad:
                self.close()
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
        self.file.close()

    def all_valid(self) -> bool:
        """True when no pixel can be missing: no nodata, alpha or mask band, and no NaN (integers)."""
        flags = [self.src.mask_flag_enums[i - 1] for i in self.indexes]
        floats = any(np.issubdtype(np.dtype(self.src.dtypes[i - 1]), np.floating) for i in self.indexes)
        return not floats and all(f == [MaskFlags.all_valid] for f in flags)

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    def grid(self) -> str:
        """The pixel grid in words, for error lines: size, CRS, origin and pixel size."""
        t = self.transform
        geo = f" {self.crs.to_string()} origin ({t.c:g}, {t.f:g}) pixel {t.a:g}×{-t.e:g}" if self.georeferenced else ""
        return f"{self.height}×{self.width}{geo}"

    def same_grid(self, other: RasterReader) -> bool:
        """Pixel for pixel the same grid: same size and, where both are georeferenced, CRS and transform."""
        if (self.height, self.width) != (other.height, other.width):
            return False
        both = self.georeferenced and other.georeferenced
        return not both or (self.crs == other.crs and self.transform.almost_equals(other.transform))

    def read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(h×w×C pixels in the raster's dtype, h×w validity) of the selected bands in `window`;
        the part of the window outside the raster is 0 and invalid.

        A pixel is valid where any selected band's GDAL mask says so (GDAL's own rule for a
        dataset mask) and all of its values are finite (NaN and ±inf are nodata)."""
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
            valid_in &= np.isfinite(data).all(axis=0)
        pixels = np.zeros((h, w, len(self.indexes)), data.dtype)
        valid = np.zeros((h, w), bool)
        pixels[r0 : r0 + ih, c0 : c0 + iw] = data.transpose(1, 2, 0)
        valid[r0 : r0 + ih, c0 : c0 + iw] = valid_in
        return pixels, valid

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(h×w×C float32 in [0, 1], h×w validity) for `window`, C the scaling's bands: nodata pixels
        hold the scaling's fill (NODATA_FILL, as in training); the part outside the raster holds FILL,
        as views pad."""
        assert self.scaling is not None, "a raw reader (scaling=None) has no [0, 1] scaling"
        pixels, valid = self.read_raw(window)
        if np.issubdtype(pixels.dtype, np.floating):
            pixels = np.where(valid[..., None], pixels, 0)
        unit = self._selected.unit(pixels, valid)  # bands were selected when reading
        inner = window.intersection(Window(0, 0, self.width, self.height))
        r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
        outside = np.ones(valid.shape, bool)
        outside[r0 : r0 + int(inner.height), c0 : c0 + int(inner.width)] = False
        unit[outside] = FILL
        return unit, valid


class _OpenReaders:
    """Raw readers kept open by (process, thread, file state), least recently used closed first:
    the tiles of a scene share one handle and GDAL's block cache, and a forked loader worker or a
    rewritten file never reuses a stale handle."""

    def __init__(self, size: int = 8) -> None:
        self.size, self.readers = size, OrderedDict()

    def get(self, path: Path, align_to: Path | None = None) -> RasterReader:
        """The raw reader of `path`, resampled onto `align_to`'s grid when given."""
        try:
            st = path.stat()
        except OSError as exc:
            raise RsmtdfError(f"{path}: unreadable image ({exc.strerror})") from None
        key = (os.getpid(), threading.get_ident(), str(path), st.st_mtime_ns, st.st_size, align_to)
        if key in self.readers:
            self.readers.move_to_end(key)
            return self.readers[key]
        reader = RasterReader(path, scaling=None, align_to=None if align_to is None else self.get(align_to))
        self.readers[key] = reader
        while len(self.readers) > self.size:
            old_key, old = self.readers.popitem(last=False)
            if old_key[0] == os.getpid():  # a parent's handle is the parent's to close
                old.close()
        return reader


open_cached = _OpenReaders().get


def check_png_end(path: Path) -> None:
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


def raster_header(path: str | Path) -> tuple[str, int]:
    """(dtype, band count) of a raster, from its header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.dtypes[0], src.count
    except RasterioIOError as exc:
        raise RsmtdfError(f"{path}: unreadable image ({first_line(exc)})") from None
