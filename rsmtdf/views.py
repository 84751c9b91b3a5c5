"""Views: fully specified geometric transforms of a sample, shared by extraction and training.

A view is `(scale, y0, x0, hflip, rot90)`. `apply_view` is the one pure function that turns a
sample's pixels into a view's crop; both stages call it, which is what makes cached teacher
features exactly the features of the crop the student sees (the exactness contract, DESIGN §1).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE


@dataclass(frozen=True)
class View:
    """Resize by `scale`, pad bottom/right to the crop size, crop at (y0, x0), flip, rotate."""

    scale: float
    y0: int
    x0: int
    hflip: bool = False
    rot90: int = 0

    def to_array(self) -> np.ndarray:
        return np.array([self.scale, self.y0, self.x0, self.hflip, self.rot90], dtype=np.float32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> View:
        a = np.asarray(a, dtype=np.float32)
        return cls(float(a[0]), int(a[1]), int(a[2]), bool(a[3]), int(a[4]))


def resized_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """Size after resizing; rounds half up like the reference's `int(x + 0.5)`."""
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass(frozen=True)
class ViewSpec:
    """How the A views of each sample are drawn: the paper's resize 0.5–2.0, crop, flip."""

    count: int = 8
    crop_size: int = 518
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    rot90: bool = False
    seed: int = 0

    def sample(self, sample_id: str, height: int, width: int) -> list[View]:
        """The sample's views, from a generator seeded by (seed, sample id): independent of order,
        batching and sharding, so every worker draws the same views for the same sample."""
        rng = np.random.default_rng([self.seed, zlib.crc32(sample_id.encode())])
        long_side = max(height, width)
        lo, hi = int(long_side * self.scale_range[0]), int(long_side * self.scale_range[1])
        views = []
        for _ in range(self.count):
            # float32 round-trip: the stored value is the value every stage applies
            scale = float(np.float32(int(rng.integers(lo, hi, endpoint=True)) / long_side))
            h, w = resized_shape(height, width, scale)
            y0 = int(rng.integers(0, max(h, self.crop_size) - self.crop_size, endpoint=True))
            x0 = int(rng.integers(0, max(w, self.crop_size) - self.crop_size, endpoint=True))
            flip = bool(rng.random() < 0.5) if self.hflip else False
            rot = int(rng.integers(0, 4)) if self.rot90 else 0
            views.append(View(scale, y0, x0, flip, rot))
        return views

    def to_attrs(self) -> dict:
        return {**asdict(self), "scale_range": list(self.scale_range)}

    @classmethod
    def from_attrs(cls, attrs: dict) -> ViewSpec:
        return cls(**{**attrs, "scale_range": tuple(attrs["scale_range"])})


def _taps(n_in: int, n_out: int, first: int, count: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source pixels and weights, (count, K) each, of output pixels first..first+count-1 of torch's
    resize from n_in to n_out px with align_corners=False: "nearest-exact", "bilinear", or
    "antialias" (bilinear with torch's antialiasing triangle filter), the positions computed in
    float32 as torch computes them."""
    dst = np.arange(first, first + count)
    if n_in == n_out:
        return dst[:, None], np.ones((count, 1), np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    centre = (dst.astype(np.float32) + np.float32(0.5)) * scale
    if mode == "nearest-exact":
        return np.minimum(np.floor(centre).astype(np.int64), n_in - 1)[:, None], np.ones((count, 1), np.float32)
    if mode == "bilinear":
        # torch's kernels compute scale · (dst + 0.5) - 0.5 as one fused multiply-add: one rounding
        src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0))
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        right = np.clip(src - i0, 0, 1).astype(np.float32)
        return np.stack([i0, np.minimum(i0 + 1, n_in - 1)], 1), np.stack([1 - right, right], 1)
    support, stretch = (float(scale), float(scale)) if scale >= 1 else (1.0, 1.0)
    centre = centre.astype(np.float64)[:, None]
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    size = np.minimum((centre + support + 0.5).astype(np.int64), n_in) - lo
    j = np.arange(int(size.max()))
    w = np.where(j < size, np.maximum(1 - np.abs((j + lo - centre + 0.5) / stretch), 0), 0)
    return np.minimum(lo + j, n_in - 1), (w / w.sum(1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Resampling:
    """Where a view's crop comes from in a sample of shape (H, W): the source window it reads and,
    for each output row and column that is not padding, the window's pixels and weights."""

    window: tuple[slice, slice]
    rows: tuple[np.ndarray, np.ndarray]
    cols: tuple[np.ndarray, np.ndarray]

    @classmethod
    def of(cls, shape: tuple[int, int], view: View, crop_size: int, label: bool) -> Resampling:
        oh, ow = resized_shape(*shape, view.scale)
        mode = "nearest-exact" if label else "antialias" if view.scale < 1 else "bilinear"
        rows = _taps(shape[0], oh, view.y0, max(min(crop_size, oh - view.y0), 0), mode)
        cols = _taps(shape[1], ow, view.x0, max(min(crop_size, ow - view.x0), 0), mode)
        (r0, r1), (c0, c1) = ((int(i.min()), int(i.max()) + 1) if i.size else (0, 0) for i, _ in (rows, cols))
        return cls((slice(r0, r1), slice(c0, c1)), (rows[0] - r0, rows[1]), (cols[0] - c0, cols[1]))

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """The resized pixels of the window: height first (whole rows gathered), then width."""
        (ri, rw), (ci, cw) = self.rows, self.cols
        if self.identity:
            return window
        if rw.shape[1] == 1 and cw.shape[1] == 1:  # nearest: a gather
            return window[ri[:, 0]][:, ci[:, 0]]
        return _weighted(_weighted(window.astype(np.float32, copy=False), ri, rw, axis=0), ci, cw, axis=1)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(s.stop - s.start for s in self.window)

    @property
    def identity(self) -> bool:
        """The window is the crop itself (scale 1)."""
        (ri, rw), (ci, cw) = self.rows, self.cols
        return rw.shape[1] == cw.shape[1] == 1 and (np.diff(ri[:, 0]) == 1).all() and (np.diff(ci[:, 0]) == 1).all()


def _weighted(x: np.ndarray, index: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """Sum over k of x's pixels `index[:, k]` along `axis` times `weight[:, k]`, in k's order."""
    shape = (-1,) + (1,) * (x.ndim - 1) if axis == 0 else (1, -1) + (1,) * (x.ndim - 2)
    out = np.take(x, index[:, 0], axis) * weight[:, 0].reshape(shape)
    for k in range(1, index.shape[1]):
        out += np.take(x, index[:, k], axis) * weight[:, k].reshape(shape)
    return out


def apply_view(array: np.ndarray, view: View, crop_size: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The view's crop of an image (H×W×C → crop×crop×C float32, bilinear, antialiased when shrunk,
    padded with 0) or of a label map (H×W → crop×crop uint8, nearest, padded with 255 = ignore).

    The same crop as resizing the whole sample with torch's `F.interpolate` and cropping it
    (`resize_and_crop`, to float rounding), but it reads only the pixels the crop needs: `array` may
    be the sample's `view_window` alone, with `shape` the sample's (H, W)."""
    is_label = array.ndim == 2
    whole = tuple(shape or array.shape[:2])
    plan = Resampling.of(whole, view, crop_size, is_label)
    if plan.size == whole and view.scale < 1 and not is_label:
        return resize_and_crop(array, view, crop_size)  # all of it is read: torch's antialiasing kernel is faster
    if array.shape[:2] == whole:
        array = array[plan.window]
    elif array.shape[:2] != plan.size:
        raise ValueError(f"a {array.shape[:2]} array is neither the {whole} sample nor the view's window {plan.size}")
    pixels = plan(array)
    out = np.full((crop_size, crop_size, *array.shape[2:]), IGNORE if is_label else 0,
                  np.uint8 if is_label else np.float32)
    out[: pixels.shape[0], : pixels.shape[1]] = pixels
    if view.hflip:
        out = out[:, ::-1]
    if view.rot90:
        out = np.rot90(out, view.rot90, axes=(0, 1))
    return np.ascontiguousarray(out)


def view_window(shape: tuple[int, int], view: View, crop_size: int) -> tuple[slice, slice]:
    """The pixels of a (H, W) sample that the view's crop is made of (images; masks read fewer),
    so a loader can scale or decode just those."""
    return Resampling.of(shape, view, crop_size, label=False).window


def resize_and_crop(array: np.ndarray, view: View, crop_size: int) -> np.ndarray:
    """The definition `apply_view` computes: resize the whole sample with `F.interpolate`, pad,
    crop, flip, rotate. Kept for the tests and the benchmark's "before"."""
    is_label = array.ndim == 2
    h, w = array.shape[:2]
    oh, ow = resized_shape(h, w, view.scale)
    t = torch.from_numpy(np.ascontiguousarray(array))
    t = t[None, None].float() if is_label else t.permute(2, 0, 1)[None].float()
    if (oh, ow) != (h, w):
        if is_label:
            t = F.interpolate(t, size=(oh, ow), mode="nearest-exact")
        else:
            t = F.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False, antialias=view.scale < 1)
    pad_h, pad_w = max(crop_size - oh, 0), max(crop_size - ow, 0)
    if pad_h or pad_w:
        t = F.pad(t, (0, pad_w, 0, pad_h), value=float(IGNORE) if is_label else 0.0)
    t = t[0, :, view.y0 : view.y0 + crop_size, view.x0 : view.x0 + crop_size]
    if view.hflip:
        t = t.flip(-1)
    if view.rot90:
        t = torch.rot90(t, view.rot90, dims=(-2, -1))
    if is_label:
        return t[0].round().to(torch.uint8).numpy()
    return t.permute(1, 2, 0).contiguous().numpy()


def render_views(image: np.ndarray, views: list[View], crop_size: int) -> np.ndarray:
    """A sample's views as a (A, C, crop, crop) float32 batch, the layout models take."""
    return np.stack([apply_view(image, v, crop_size).transpose(2, 0, 1) for v in views])


def valid_fraction(valid: np.ndarray | None, shape: tuple[int, int], views: list[View], crop_size: int) -> np.ndarray:
    """(A,) float32: the share of each view's crop covered by valid pixels of the sample (`valid`
    H×W bool, None: all valid); padding counts as not valid. 0 means the view shows no data."""
    marks = np.ones(shape, np.uint8) if valid is None else valid.astype(np.uint8)
    return np.array([(apply_view(marks, v, crop_size) == 1).mean() for v in views], dtype=np.float32)
