"""Views: seeded per sample, float32-exact parameters, and apply_view's geometry."""

from __future__ import annotations

import numpy as np
import pytest

from rsmtdf.transforms.views import View, ViewSpec, apply_view, resize_and_crop, resized_shape, view_window


def test_views_are_seeded_per_sample_and_order_free():
    spec = ViewSpec(count=5, crop_size=64)
    a = spec.sample("Train/Rural/0_1", 128, 128)
    assert a == spec.sample("Train/Rural/0_1", 128, 128)
    assert a != spec.sample("Train/Rural/0_2", 128, 128)
    assert a != ViewSpec(count=5, crop_size=64, seed=1).sample("Train/Rural/0_1", 128, 128)
    for v in a:
        assert 0.5 <= v.scale <= 2.0 and v.rot90 == 0
        h, w = resized_shape(128, 128, v.scale)
        assert 0 <= v.y0 <= max(h, 64) - 64 and 0 <= v.x0 <= max(w, 64) - 64
        assert View.from_array(v.to_array()) == v  # what the cache stores is what is applied


def test_apply_view_identity_crop_flip_rot():
    img = np.arange(10 * 12 * 3, dtype=np.float32).reshape(10, 12, 3)
    out = apply_view(img, View(1.0, 2, 3, False, 0), 6)
    assert np.array_equal(out, img[2:8, 3:9])
    assert np.array_equal(apply_view(img, View(1.0, 2, 3, True, 0), 6), img[2:8, 3:9][:, ::-1])
    assert np.array_equal(apply_view(img, View(1.0, 2, 3, False, 1), 6), np.rot90(img[2:8, 3:9], 1, axes=(0, 1)))


def test_apply_view_pads_image_with_zero_and_mask_with_ignore():
    img = np.ones((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    v = View(0.5, 0, 0)
    out, m = apply_view(img, v, 10), apply_view(mask, v, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.float32
    assert m.shape == (10, 10) and m.dtype == np.uint8
    assert (m[:4, :4] == 0).all() and (m[4:] == 255).all() and (m[:, 4:] == 255).all()
    assert np.allclose(out[:4, :4], 1.0) and (out[4:] == 0).all()


def test_apply_view_mask_nearest_keeps_labels():
    mask = np.random.default_rng(0).integers(0, 7, (32, 32)).astype(np.uint8)
    m = apply_view(mask, View(1.5, 3, 5, True, 0), 40)
    assert set(np.unique(m)) <= set(range(7))
    up = apply_view(mask, View(2.0, 0, 0), 64)
    assert np.array_equal(up, np.repeat(np.repeat(mask, 2, 0), 2, 1))


def test_apply_view_is_the_whole_sample_resized_by_torch_then_cropped():
    """apply_view reads only its window, yet makes the crop that resizing the whole sample with
    F.interpolate makes (`resize_and_crop`): to 1e-4 of the range for enlarged images (bilinear,
    sampled at torch's positions), exactly for shrunk ones and for label maps, over odd sizes,
    crops larger than the sample, flips and rotations, and 16-bit multiband input."""
    rng = np.random.default_rng(0)
    for h, w in [(1024, 1024), (300, 517), (37, 61), (8, 8)]:
        image = rng.integers(0, 65535, (h, w, 4)).astype(np.uint16)
        mask = rng.integers(0, 7, (h, w)).astype(np.uint8)
        for crop in (518, 56, 10):
            for v in ViewSpec(6, crop, rot90=True).sample(f"{h}x{w}@{crop}", h, w):
                got, want = apply_view(image, v, crop), resize_and_crop(image, v, crop)
                assert got.shape == want.shape and got.dtype == want.dtype == np.float32
                assert np.abs(got - want).max() <= 1e-4 * 65535, (h, w, crop, v)
                assert np.array_equal(apply_view(mask, v, crop), resize_and_crop(mask, v, crop)), (h, w, crop, v)


def test_apply_view_on_its_window_alone_gives_the_same_crop():
    rng = np.random.default_rng(1)
    image = rng.random((400, 300, 3), dtype=np.float32)
    for v in ViewSpec(8, 96).sample("s", 400, 300):
        win = view_window((400, 300), v, 96)
        assert np.array_equal(apply_view(image[win], v, 96, (400, 300)), apply_view(image, v, 96))
    v = View(2.0, 10, 10)
    with pytest.raises(ValueError, match="window"):
        apply_view(image[:30, :30], v, 96, (400, 300))


def test_crops_made_on_the_device_from_the_workers_windows_are_the_whole_samples_crops():
    """Training ships each view's window of raw pixels and renders it after the copy
    (`train.loader_pixels` → `collate` → `train.render_crops`): exactly the crop of the whole
    sample scaled and cut on the CPU, for 16-bit multiband rasters with nodata holes."""
    import torch

    from rsmtdf.data.datasets import Sample
    from rsmtdf.transforms.scaling import BandScaling
    from rsmtdf.train.loader import collate, loader_pixels, render_crops

    rng = np.random.default_rng(2)
    image = rng.integers(0, 4000, (300, 400, 4)).astype(np.uint16)
    valid = rng.random((300, 400)) > 0.05
    scaling = BandScaling((2, 0, 1, 3), None, (10.0, 0.0, 5.0, 0.0), (3000.0, 3500.0, 4000.0, 2500.0),
                          "percentile", "uint16", (0.5, 0.5, 0.5, 0.0))
    views = ViewSpec(12, 96, rot90=True).sample("s", 300, 400)
    table = np.stack([v.to_array() for v in views])[None]
    for labeled, holes in ((True, None), (False, valid)):
        sample = Sample("s", image, rng.integers(0, 7, (300, 400)).astype(np.uint8), valid=holes)
        items = [{**loader_pixels(sample, v, 96, scaling, labeled), "index": 0, "view": k} for k, v in enumerate(views)]
        crops = render_crops(collate(items), table, 96, scaling, torch.device("cpu"))
        whole = scaling.unit(image, holes)
        labels = sample.mask if labeled else np.where(valid, 0, 255).astype(np.uint8)
        for k, v in enumerate(views):
            assert torch.equal(crops[k], torch.from_numpy(apply_view(whole, v, 96)).permute(2, 0, 1)), (labeled, v)
            assert np.array_equal(items[k]["mask"].numpy(), resize_and_crop(labels, v, 96)), (labeled, v)


def test_one_batch_of_8_and_16_bit_tiles_renders_each_as_alone():
    """A folder may mix 8- and 16-bit tiles: their windows share one flattened tensor (in the dtype
    holding both; torch cannot promote uint16) and each renders as it would alone."""
    import torch

    from rsmtdf.data.datasets import Sample
    from rsmtdf.transforms.scaling import BandScaling
    from rsmtdf.train.loader import collate, loader_pixels, render_crops

    rng = np.random.default_rng(3)
    scaling = BandScaling((0, 1, 2)).resolved("uint16")
    views = ViewSpec(2, 48).sample("s", 64, 80)
    table = np.stack([v.to_array() for v in views])[None]
    images = [rng.integers(0, 60000, (64, 80, 3)).astype(np.uint16), rng.integers(0, 255, (64, 80, 3)).astype(np.uint8)]
    items = [{**loader_pixels(Sample("s", im, np.zeros((64, 80), np.uint8)), v, 48, scaling, True), "index": 0, "view": k}
             for im, (k, v) in zip(images, enumerate(views))]
    together = render_crops(collate(items), table, 48, scaling, torch.device("cpu"))
    for k, item in enumerate(items):
        alone = render_crops(collate([item]), table, 48, scaling, torch.device("cpu"))[0]
        assert torch.equal(together[k], alone)
