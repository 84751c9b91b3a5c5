"""`rsmtdf.inspect.geometry`: a token's place on the sample, checked against pixels pushed through
`apply_view` and the teacher's resize; a CNN's token centres measured from its receptive field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsmtdf.inspect.geometry import (TokenGrid, cell_centres, match_teachers, sample_to_crop, token_grid,
                                     tokens_at, tokens_on_sample)
from rsmtdf.models.teachers import Teacher, teacher_config
from rsmtdf.transforms.views import View, apply_view

H, W, CROP = 150, 200, 64
VIEWS = [View(1.0, 10, 20), View(0.7, 0, 3, hflip=True), View(1.6, 30, 50, rot90=1),
         View(1.3, 5, 60, hflip=True, rot90=2), View(0.4, 0, 0, rot90=3), View(2.0, 100, 7, hflip=True, rot90=1)]
GRIDS = [TokenGrid(64, 8, 8.0, 3.5, "patch"), TokenGrid(40, 5, 8.0, 7.0, "receptive field"),
         TokenGrid(100, 6, 16.0, 5.0, "patch")]


def _ramp_through_teacher(view: View, grid: TokenGrid) -> tuple[np.ndarray, np.ndarray]:
    """What the teacher's input holds at each token centre when the sample's pixels are their own
    (y, x) coordinates: bilinear resizes keep a linear ramp linear, so this is the exact answer.
    Also whether the token is far enough from the sample's edge and the padding to be unclamped."""
    yy, xx = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
    ones = np.ones_like(yy)
    crop = apply_view(np.stack([yy, xx, ones], axis=2), view, CROP)  # third channel: 1 on the sample, 0 on padding
    x = torch.from_numpy(crop).permute(2, 0, 1)[None]
    if grid.input_size != CROP:
        x = F.interpolate(x, size=(grid.input_size,) * 2, mode="bilinear", align_corners=True)
    u = torch.from_numpy(grid.centres()).float()
    norm = u / (grid.input_size - 1) * 2 - 1  # grid_sample with align_corners=True: -1..1 is pixel 0..size-1
    got = F.grid_sample(x, norm.flip(-1)[None, None], mode="bilinear", align_corners=True)[0, :, 0].T.numpy()
    # an unclamped neighbourhood: every crop pixel within 3 px (in crop pixels) of the token is on the sample
    nearby = F.max_pool2d(1 - x[:, 2:3], kernel_size=7, stride=1, padding=3)
    far = F.grid_sample(nearby, norm.flip(-1)[None, None], mode="nearest", align_corners=True)[0, 0, 0].numpy() < 1e-3
    return got[:, :2], far


@pytest.mark.parametrize("view", VIEWS, ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.input_size}px-{g.grid}")
def test_tokens_land_where_apply_view_and_the_resize_put_their_pixels(view: View, grid: TokenGrid) -> None:
    expected, far = _ramp_through_teacher(view, grid)
    s, on = tokens_on_sample(grid, view, CROP, (H, W))
    margin = 2 / view.scale + 1  # the resize clamps within a pixel of the sample's border
    interior = on & far & (s[:, 0] > margin) & (s[:, 0] < H - 1 - margin) & (s[:, 1] > margin) & (s[:, 1] < W - 1 - margin)
    assert interior.sum() >= 4
    # exact up to float32, except that torch's antialiasing filter (views that shrink) is off centre
    # by about 0.01 px
    assert np.abs(s[interior] - expected[interior]).max() < (0.02 if view.scale < 1 else 2e-3)
    assert not (on & ~far & (expected.sum(1) == 0)).any()  # a token said to be on the sample is not in padding


@pytest.mark.parametrize("view", VIEWS, ids=str)
def test_sample_to_tokens_inverts_tokens_to_sample(view: View) -> None:
    grid = GRIDS[0]
    s, on = tokens_on_sample(grid, view, CROP, (H, W))
    index, covered = tokens_at(grid, view, CROP, (H, W), s)
    assert (covered == on).all() and (index[on] == np.flatnonzero(on)).all()
    _, inside = sample_to_crop(np.array([[-40.0, -40.0], [H + 40.0, W + 40.0]]), view, CROP, (H, W))
    assert not inside.any()


def test_teachers_on_one_view_match_by_crop_position() -> None:
    big, small = TokenGrid(64, 8, 8.0, 3.5, "patch"), TokenGrid(32, 4, 8.0, 3.5, "patch")
    index, ok = match_teachers(big, small, CROP)
    assert ok.all()
    rows, cols = np.divmod(np.arange(64), 8)
    assert (index == (rows // 2) * 4 + cols // 2).all()  # each small token covers 2×2 big ones


def test_cnn_token_centres_are_its_receptive_field_centres() -> None:
    # tf_efficientnet_lite0 pads "same" like TensorFlow: a stride-2 layer puts output j's kernel
    # centre on input pixel 2j+1, so four of them put token j of the stride-16 stage on 16j+15
    spec = Teacher(teacher_config("effnet_lite0", 64), pretrained=False).identity().record()
    assert token_grid(spec) == TokenGrid(64, 4, 16.0, 15.0, "receptive field")


def test_vit_and_unknown_architectures() -> None:
    clip = {"name": "clip", "library": "open_clip", "input_size": 224, "grid": 16}
    assert token_grid(clip) == TokenGrid(224, 16, 14.0, 6.5, "patch")
    assert token_grid({"name": "x", "model": "m", "input_size": 28, "grid": 4}) == cell_centres(28, 4)
    assert cell_centres(28, 4) == TokenGrid(28, 4, 7.0, 3.0, "cell centres")
