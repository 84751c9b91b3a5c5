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


def apply_view(array: np.ndarray, view: View, crop_size: int) -> np.ndarray:
    """The view's crop of an image (H×W×C → crop×crop×C float32, bilinear, padded with 0) or of a
    label map (H×W → crop×crop uint8, nearest, padded with 255 = ignore)."""
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
