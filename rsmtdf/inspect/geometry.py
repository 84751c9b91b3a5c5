"""Where a cached token lies: teacher input pixels → view crop → sample pixels, and back.

A teacher sees a view's crop (crop×crop, made by `apply_view`) resized to its input size with
bilinear `align_corners=True`, and its token j (along rows or columns) is centred on input pixel
`offset + j·stride`. Chaining that with the view's crop, flip, rot90 and resize (the inverse of
`apply_view`, in pixel-centre coordinates) places every token on the sample exactly, so two
views of one sample, or two teachers on one view, can be compared position by position.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields

import numpy as np

from ..transforms.views import View, resized_shape


@dataclass(frozen=True)
class TokenGrid:
    """Token centres of one teacher in its input: `offset + j·stride` px on rows and columns.

    `method` says how they were found: "patch" (a ViT's patch centres), "receptive field" (a
    CNN's measured receptive-field centres) or "cell centres" (the architecture is unknown).
    """

    input_size: int
    grid: int
    stride: float
    offset: float
    method: str

    def centres(self) -> np.ndarray:
        """(grid²,) × 2 → (L, 2) input coordinates (y, x) of the tokens, row-major."""
        c = self.offset + self.stride * np.arange(self.grid, dtype=np.float64)
        yy, xx = np.meshgrid(c, c, indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=1)

    def nearest(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input coordinates (n, 2) → (row-major token index, inside the grid)."""
        j = np.rint((u - self.offset) / self.stride).astype(np.int64)
        inside = ((j >= 0) & (j < self.grid)).all(axis=1)
        j = np.clip(j, 0, self.grid - 1)
        return j[:, 0] * self.grid + j[:, 1], inside


def cell_centres(input_size: int, grid: int) -> TokenGrid:
    stride = input_size / grid
    return TokenGrid(input_size, grid, stride, stride / 2 - 0.5, "cell centres")


def token_grid(teacher: dict) -> TokenGrid:
    """The token grid of a teacher as a cache records it (its attrs entry)."""
    return _token_grid(json.dumps(teacher, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _token_grid(key: str) -> TokenGrid:
    t = json.loads(key)
    size, grid = int(t["input_size"]), int(t["grid"])
    if t.get("library") == "open_clip":
        return _patch(size, grid, size // grid)
    try:
        model = _architecture(t)
    except Exception:  # noqa: BLE001 - a cache from another version or a hand-made one: no architecture
        return cell_centres(size, grid)
    if hasattr(model, "patch_embed"):
        return _patch(size, grid, int(model.patch_embed.patch_size[0]))
    return _receptive_field(model, t, size, grid) or cell_centres(size, grid)


def _patch(size: int, grid: int, patch: int) -> TokenGrid:
    return TokenGrid(size, grid, float(patch), (patch - 1) / 2, "patch")


def _architecture(t: dict):
    """The teacher's network with random weights: its geometry needs no weights."""
    from ..models.teachers import Teacher, TeacherConfig
    from ..models.weights import WeightSource

    names = {f.name for f in fields(TeacherConfig)}
    config = TeacherConfig(**{k: v for k, v in t.items() if k in names and k != "weights"},
                           weights=WeightSource(**t.get("weights", {})))
    return Teacher(config, pretrained=False)


def _receptive_field(teacher, t: dict, size: int, grid: int) -> TokenGrid | None:
    """Measure a CNN's token centres: the centre of an interior token's receptive field.

    With every conv weight positive, biases zero and a tiny input the network is linear and
    positive, so a token's input gradient covers its whole receptive field, symmetric about its
    centre. The probe input is the teacher's size plus a multiple of the stride (the same padding
    at every layer), grown until the receptive field touches no border.
    """
    import torch

    model = teacher.model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4:
                p.fill_(1.0 / p[0].numel())
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    step = size // grid
    if step * grid != size:
        return None
    for k in (8, 16, 32, 64):
        probe = size + k * step
        x = torch.full((1, 3, probe, probe), 1e-3, requires_grad=True)
        feat = model.forward_intermediates(x, indices=[teacher.layer_index()], intermediates_only=True)[0]
        if feat.shape[-1] != grid + k:
            return None
        j = feat.shape[-1] // 2
        feat[0, :, j, j].sum().backward()
        w = x.grad[0].abs().sum(dim=(0, 1)).double().numpy()  # weight per input column
        support = np.flatnonzero(w > w.max() * 1e-9)
        if len(support) and 0 < support[0] and support[-1] < probe - 1:
            centre = float((w * np.arange(probe)).sum() / w.sum())
            return TokenGrid(size, grid, float(step), round(centre - j * step, 3), "receptive field")
    return None


# ---- input ↔ crop ↔ sample -----------------------------------------------------------------------


def input_to_crop(u: np.ndarray, input_size: int, crop: int) -> np.ndarray:
    """A teacher input position → the view crop position it was interpolated from."""
    return u if input_size == crop else u * (crop - 1) / (input_size - 1)


def crop_to_input(q: np.ndarray, input_size: int, crop: int) -> np.ndarray:
    return q if input_size == crop else q * (input_size - 1) / (crop - 1)


def crop_to_sample(q: np.ndarray, view: View, crop: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """View crop positions (n, 2) → sample pixel positions, and whether they are on the sample
    (not in the padding `apply_view` adds past the resized image's bottom and right)."""
    n1 = crop - 1
    y, x = q[:, 0].copy(), q[:, 1].copy()
    for _ in range(view.rot90 % 4):  # undo np.rot90 once: out (i, j) came from in (j, n1 - i)
        y, x = x, n1 - y
    if view.hflip:
        x = n1 - x
    oh, ow = resized_shape(hw[0], hw[1], view.scale)
    ry, rx = y + view.y0, x + view.x0
    on = (ry >= -0.5) & (ry < oh - 0.5) & (rx >= -0.5) & (rx < ow - 0.5)
    s = np.stack([(ry + 0.5) * hw[0] / oh - 0.5, (rx + 0.5) * hw[1] / ow - 0.5], axis=1)
    return s, on


def sample_to_crop(s: np.ndarray, view: View, crop: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sample pixel positions (n, 2) → the view crop's positions, and whether they are on the
    sample and in the crop."""
    n1 = crop - 1
    oh, ow = resized_shape(hw[0], hw[1], view.scale)
    y = (s[:, 0] + 0.5) * oh / hw[0] - 0.5 - view.y0
    x = (s[:, 1] + 0.5) * ow / hw[1] - 0.5 - view.x0
    on = (s >= -0.5).all(axis=1) & (s[:, 0] < hw[0] - 0.5) & (s[:, 1] < hw[1] - 0.5)
    inside = on & (y >= -0.5) & (y < crop - 0.5) & (x >= -0.5) & (x < crop - 0.5)
    if view.hflip:
        x = n1 - x
    for _ in range(view.rot90 % 4):  # np.rot90 once: in (y, x) goes to out (n1 - x, y)
        y, x = n1 - x, y
    return np.stack([y, x], axis=1), inside


def tokens_on_sample(grid: TokenGrid, view: View, crop: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(L, 2) sample positions of a view's tokens, and whether each lies on the sample."""
    return crop_to_sample(input_to_crop(grid.centres(), grid.input_size, crop), view, crop, hw)


def tokens_at(grid: TokenGrid, view: View, crop: int, hw: tuple[int, int], s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The view's token covering each sample position (n, 2), and whether one does."""
    q, inside = sample_to_crop(s, view, crop, hw)
    index, on_grid = grid.nearest(crop_to_input(q, grid.input_size, crop))
    return index, inside & on_grid


def match_teachers(a: TokenGrid, b: TokenGrid, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """For each token of teacher a on a view, the token of teacher b covering the same crop position."""
    q = input_to_crop(a.centres(), a.input_size, crop)
    inside = ((q >= -0.5) & (q < crop - 0.5)).all(axis=1)
    index, on_grid = b.nearest(crop_to_input(q, b.input_size, crop))
    return index, inside & on_grid
