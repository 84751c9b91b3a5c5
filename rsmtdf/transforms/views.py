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

from .pixels import IGNORE


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


def _sources(n_in: int, n_out: int, first: int, count: int, label: bool) -> np.ndarray:
    """Where output pixels first..first+count-1 of torch's resize from n_in to n_out px
    (align_corners=False) read their input, computed in float32 as torch computes it: the pixel
    index for nearest-exact (labels), the fractional position for bilinear (images); the pixel
    itself where the size does not change."""
    dst = np.arange(first, first + count)
    if n_in == n_out:
        return dst
    scale = np.float32(n_in) / np.float32(n_out)
    if label:
        return np.minimum(np.floor((dst.astype(np.float32) + np.float32(0.5)) * scale).astype(np.int64), n_in - 1)
    # torch computes scale · (dst + 0.5) - 0.5 as one fused multiply-add: rounded once
    return np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0))


@dataclass(frozen=True)
class Resampling:
    """Where a view's crop comes from in an (H, W) sample: the window of pixels it reads and, for
    each output row and column that is not padding, its source (`_sources`) in the window."""

    window: tuple[slice, slice]
    rows: np.ndarray
    cols: np.ndarray
    identity: bool = False  # scale 1: the window is the crop

    @classmethod
    def of(cls, shape: tuple[int, int], view: View, crop_size: int, label: bool) -> Resampling:
        if view.scale < 1 and not label:  # a shrunk view is antialiased over the whole sample
            return cls((slice(0, shape[0]), slice(0, shape[1])), np.empty(0), np.empty(0))
        oh, ow = resized_shape(*shape, view.scale)
        rows = _sources(shape[0], oh, view.y0, max(min(crop_size, oh - view.y0), 0), label)
        cols = _sources(shape[1], ow, view.x0, max(min(crop_size, ow - view.x0), 0), label)
        (r0, r1), (c0, c1) = (_span(p, n) for p, n in ((rows, shape[0]), (cols, shape[1])))
        return cls((slice(r0, r1), slice(c0, c1)), rows - r0, cols - c0, (oh, ow) == tuple(shape))

    @property
    def size(self) -> tuple[int, int]:
        return self.window[0].stop - self.window[0].start, self.window[1].stop - self.window[1].start

    def labels(self, window: np.ndarray, flip: bool) -> torch.Tensor:
        """The crop's labels (no padding), mirrored left-right if `flip`, gathered from the (h, w)
        label window."""
        return torch.from_numpy(np.ascontiguousarray(window[self.rows][:, self.cols[::-1] if flip else self.cols]))

    def image(self, window: torch.Tensor, flip: bool) -> torch.Tensor:
        """The crop's pixels (no padding), mirrored left-right if `flip`, sampled bilinearly at the
        sources from the (C, h, w) float32 window, on the window's device."""
        if self.identity:
            return window.flip(-1) if flip else window
        h, w = window.shape[1:]
        cols = self.cols[::-1] if flip else self.cols
        gy, gx = (torch.from_numpy((2 * p.astype(np.float64) + 1) / n - 1).float().to(window.device)
                  for p, n in ((self.rows, h), (cols, w)))
        grid = torch.stack([gx.expand(len(gy), -1), gy[:, None].expand(-1, len(gx))], -1)
        return F.grid_sample(window.contiguous()[None], grid[None], mode="bilinear", padding_mode="border",
                             align_corners=False)[0]


def _tensor(array: np.ndarray) -> torch.Tensor:
    """The array as a tensor without a copy where its strides allow (numpy's band selection leaves
    images channel-first in memory: a copy to H×W×C and back would cost more than the resize)."""
    return torch.from_numpy(array if min(array.strides, default=0) >= 0 else np.ascontiguousarray(array))


def _span(sources: np.ndarray, n: int) -> tuple[int, int]:
    """The input pixels [start, stop) that sources read (a bilinear one reads its pixel and the next)."""
    if not sources.size:
        return 0, 0
    last = int(np.floor(sources.max()))
    return int(np.floor(sources.min())), min(last + (sources.dtype != np.int64), n - 1) + 1


def view_tensor(array: np.ndarray, view: View, crop_size: int, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The view's crop of an H×W×C image (C×crop×crop float32: bilinear, antialiased when shrunk,
    padded with 0) or of an H×W label map (crop×crop uint8: nearest, padded with 255 = ignore).

    The crop `resize_and_crop` makes by resizing the whole sample with `F.interpolate`: the same
    for shrunk views and label maps, the same to 1e-4 of the range for enlarged ones (`grid_sample`
    at torch's source positions, in float32), for which it reads only the view's window: `array`
    may be that window alone (`view_window`), with `shape` the sample's (H, W)."""
    is_label = array.ndim == 2
    whole = tuple(shape or array.shape[:2])
    plan = Resampling.of(whole, view, crop_size, is_label)
    if array.shape[:2] == whole:
        array = array[plan.window]
    elif array.shape[:2] != plan.size:
        raise ValueError(f"a {array.shape[:2]} array is neither the {whole} sample nor the view's window {plan.size}")
    if not is_label:
        return render_image(_tensor(array).permute(2, 0, 1).float(), view, crop_size, whole)
    return _placed(plan.labels(array, view.hflip), view, crop_size, IGNORE)


def render_image(window: torch.Tensor, view: View, crop_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """`view_tensor` of an image from its window as a (C, h, w) float32 tensor, on any device:
    what training runs on the batch after the host→device copy."""
    if view.scale < 1:
        return _resize_crop(window[None], view, crop_size, 0.0)[0]
    return _placed(Resampling.of(shape, view, crop_size, False).image(window, view.hflip), view, crop_size, 0.0)


def _placed(pixels: torch.Tensor, view: View, crop_size: int, fill: float) -> torch.Tensor:
    """The crop: `pixels` (mirrored already if the view flips) on padding `fill`, then rotated."""
    out = torch.full((*pixels.shape[:-2], crop_size, crop_size), fill, dtype=pixels.dtype, device=pixels.device)
    h, w = pixels.shape[-2:]
    if view.hflip:  # mirrored: the padding right of the sample is now left of it
        out[..., :h, crop_size - w :] = pixels
    else:
        out[..., :h, :w] = pixels
    return torch.rot90(out, view.rot90, dims=(-2, -1)).contiguous() if view.rot90 else out


def apply_view(array: np.ndarray, view: View, crop_size: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """`view_tensor` as numpy, H×W×C → crop×crop×C (or H×W → crop×crop), for pictures and tests."""
    t = view_tensor(array, view, crop_size, shape)
    return (t if t.ndim == 2 else t.permute(1, 2, 0)).contiguous().numpy()


def view_window(shape: tuple[int, int], view: View, crop_size: int) -> tuple[slice, slice]:
    """The pixels of an (H, W) sample that the view's image crop is made of (the whole sample for
    shrunk views), so a loader can scale or ship just those."""
    return Resampling.of(shape, view, crop_size, label=False).window


def _resize_crop(t: torch.Tensor, view: View, crop_size: int, fill: float, label: bool = False) -> torch.Tensor:
    """`resize_and_crop` of a (1, C, H, W) float tensor."""
    h, w = t.shape[-2:]
    oh, ow = resized_shape(h, w, view.scale)
    if (oh, ow) != (h, w):
        if label:
            t = F.interpolate(t, size=(oh, ow), mode="nearest-exact")
        else:
            t = F.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False, antialias=view.scale < 1)
    pad_h, pad_w = max(crop_size - oh, 0), max(crop_size - ow, 0)
    if pad_h or pad_w:
        t = F.pad(t, (0, pad_w, 0, pad_h), value=fill)
    t = t[..., view.y0 : view.y0 + crop_size, view.x0 : view.x0 + crop_size]
    if view.hflip:
        t = t.flip(-1)
    if view.rot90:
        t = torch.rot90(t, view.rot90, dims=(-2, -1))
    return t.contiguous()


def resize_and_crop(array: np.ndarray, view: View, crop_size: int) -> np.ndarray:
    """The definition of a view's crop: resize the whole sample with `F.interpolate`, pad, crop,
    flip, rotate. `view_tensor` computes it; this is kept for the tests and the benchmark."""
    if array.ndim == 2:
        t = _resize_crop(_tensor(array)[None, None].float(), view, crop_size, float(IGNORE), label=True)
        return t[0, 0].round().to(torch.uint8).numpy()
    t = _resize_crop(_tensor(array).permute(2, 0, 1)[None].float(), view, crop_size, 0.0)
    return t[0].permute(1, 2, 0).contiguous().numpy()


def render_views(image: np.ndarray, views: list[View], crop_size: int) -> np.ndarray:
    """A sample's views as a (A, C, crop, crop) float32 batch, the layout models take."""
    return np.stack([apply_view(image, v, crop_size).transpose(2, 0, 1) for v in views])


def valid_fraction(valid: np.ndarray | None, shape: tuple[int, int], views: list[View], crop_size: int) -> np.ndarray:
    """(A,) float32: the share of each view's crop covered by valid pixels of the sample (`valid`
    H×W bool, None: all valid); padding counts as not valid. 0 means the view shows no data."""
    marks = np.ones(shape, np.uint8) if valid is None else valid.astype(np.uint8)
    return np.array([(apply_view(marks, v, crop_size) == 1).mean() for v in views], dtype=np.float32)
