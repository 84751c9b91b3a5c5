"""`rsmtdf.show`: PCA colours of cached features, and the figure's panels at each teacher's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsmtdf.cache import FeatureCache
from rsmtdf.cache.format import TeacherLayout
from rsmtdf.data.classes import ClassTable
from rsmtdf.data.datasets import SegmentationDataset
from rsmtdf.errors import RsmtdfError
from rsmtdf.inspect.show import PLACEHOLDER, pca_rgb, render_sample
from rsmtdf.transforms.views import View

from conftest import hand_identity

IDS = ["s0", "s1", "s2"]
GRIDS = {"small": (4, 8), "large": (7, 16)}  # teacher name → (grid, dim)
VIEWS = [View(1.0, 0, 0), View(1.0, 0, 0, hflip=True)]  # the second mirrors the first


def _features(rng: np.random.Generator, grid: int, dim: int) -> np.ndarray:
    """(views, grid², dim): left and right halves of the grid near two different vectors."""
    left, right = rng.normal(0, 4, dim), rng.normal(0, 4, dim)
    cols = np.arange(grid * grid) % grid
    base = np.where((cols < grid / 2)[:, None], left, right)
    return np.stack([base + rng.normal(0, 0.3, base.shape) for _ in VIEWS]).astype(np.float32)


@pytest.fixture
def dataset(tmp_path: Path) -> SegmentationDataset:
    """A folder dataset whose images are red on the left half and blue on the right."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16, 0] = 255
    image[:, 16:, 2] = 255
    for sid in IDS:
        Image.fromarray(image).save(root / "images" / f"{sid}.png")
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / f"{sid}.png")
    return SegmentationDataset(root, ClassTable(("all",), codes={0: 0}))


@pytest.fixture
def cache(tmp_path: Path) -> FeatureCache:
    """A real two-teacher cache of three samples in two shards, written and finalized."""
    identity = hand_identity(IDS, "/nowhere", ClassTable(("all",), codes={0: 0}), GRIDS, 28, 2, 28)
    layouts = [TeacherLayout(n, g * g, d) for n, (g, d) in GRIDS.items()]
    cache = FeatureCache.create(str(tmp_path / "cache"), IDS, identity, {}, layouts, shard_samples=2)
    rng = np.random.default_rng(0)
    for k in range(cache.num_shards):
        r = cache.shard_range(k)
        views = np.stack([np.stack([v.to_array() for v in VIEWS]) for _ in r])
        targets = {n: np.stack([_features(rng, g, d) for _ in r]) for n, (g, d) in GRIDS.items()}
        cache.write_shard(k, views, targets)
    cache.finalize()
    return FeatureCache.open(tmp_path / "cache")


def test_pca_rgb_shape_and_full_range() -> None:
    tokens = np.random.default_rng(1).normal(size=(3, 25, 10)).astype(np.float32)
    rgb = pca_rgb(tokens, 5)
    assert rgb.shape == (3, 5, 5, 3) and rgb.dtype == np.uint8
    assert (rgb.reshape(-1, 3).min(axis=0) == 0).all() and (rgb.reshape(-1, 3).max(axis=0) == 255).all()
    assert pca_rgb(tokens[..., :2], 5)[..., 2].max() == 0  # two channels: two components, third black
    with pytest.raises(ValueError):
        pca_rgb(tokens, 4)


def test_pca_colours_agree_across_views() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(16, 8))
    b = 3 * rng.normal(size=(16, 8)) + 5  # another spread and offset: per-view fitting would recolour it
    b[5] = a[3]
    rgb = pca_rgb(np.stack([a, b]).astype(np.float32), 4).reshape(2, 16, 3)
    assert (rgb[1, 5] == rgb[0, 3]).all()


def test_pca_separates_left_from_right() -> None:
    tokens = _features(np.random.default_rng(3), 6, 12)
    rgb = pca_rgb(tokens, 6).astype(float)
    left, right = rgb[:, :, :3].reshape(-1, 3), rgb[:, :, 3:].reshape(-1, 3)
    assert np.linalg.norm(left.mean(0) - right.mean(0)) > 150  # token order is row-major on the grid
    first = sorted([left[:, 0], right[:, 0]], key=np.mean)  # the leading component splits the halves apart
    assert first[0].max() < first[1].min()


def test_render_sample_panels_are_at_each_teachers_grid(cache: FeatureCache, dataset: SegmentationDataset,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "fig" / "s1.png"
    layout = render_sample(cache, "s1", out, dataset, cell=60)
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1::-1] == layout["size"]
    assert [(n, p["grid"], p["factor"]) for n, p in layout["panels"].items()] == [("small", 4, 15), ("large", 7, 8)]
    reader = cache.reader()
    for name, p in layout["panels"].items():
        g, f = p["grid"], p["factor"]
        expected = pca_rgb(np.stack([reader.read(1, a)[name] for a in range(len(VIEWS))]), g)
        assert len(p["boxes"]) == len(VIEWS)
        for a, (x, y) in enumerate(p["boxes"]):
            panel = png[y : y + g * f, x : x + g * f]
            assert panel.shape == (g * f, g * f, 3)
            down = panel[::f, ::f]
            assert (np.repeat(np.repeat(down, f, 0), f, 1) == panel).all()  # every token an f×f block
            assert (down == expected[a]).all()
            assert (png[y : y + g * f, x + g * f] == 255).all() and (png[y + g * f, x : x + g * f] == 255).all()
    (x0, y0), (x1, y1) = layout["image_boxes"]
    red, blue = [255, 0, 0], [0, 0, 255]
    assert (png[y0 + 30, x0 + 5] == red).all() and (png[y0 + 30, x0 + 55] == blue).all()
    assert (png[y1 + 30, x1 + 5] == blue).all() and (png[y1 + 30, x1 + 55] == red).all()  # the flipped view


def test_render_sample_without_pixels_draws_placeholder(cache: FeatureCache, dataset: SegmentationDataset,
                                                        tmp_path: Path) -> None:
    (dataset.root / "images" / "s2.png").unlink()
    for source in (None, dataset):
        out = tmp_path / "s2.png"
        layout = render_sample(cache, "s2", out, source, cell=40)
        png = np.asarray(Image.open(out).convert("RGB"))
        for x, y in layout["image_boxes"]:
            assert (png[y : y + 40, x : x + 40] == PLACEHOLDER).all()


def test_unknown_sample_id_is_a_one_line_error(cache: FeatureCache, tmp_path: Path) -> None:
    with pytest.raises(RsmtdfError, match="no sample 's9'") as info:
        render_sample(cache, "s9", tmp_path / "x.png")
    assert cache.url in str(info.value) and "s0" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_choose_samples_by_id_index_or_seeded_draw(cache: FeatureCache) -> None:
    from rsmtdf.inspect.show import choose_samples

    assert choose_samples(cache, sample_id="s2") == ["s2"] and choose_samples(cache, index=1) == ["s1"]
    drawn = choose_samples(cache, random=2, seed=3)
    assert drawn == choose_samples(cache, random=2, seed=3) and len(set(drawn)) == 2 and set(drawn) <= set(IDS)
    assert sorted(drawn) == drawn  # in cache order
    assert choose_samples(cache, random=10) == IDS  # more than there are: every sample once
    assert {tuple(choose_samples(cache, random=1, seed=s)) for s in range(20)} == {(i,) for i in IDS}


def test_show_cli_index_and_random(cache: FeatureCache, tmp_path: Path) -> None:
    from conftest import run_cli
    from test_errors import error_line

    proc = run_cli("show", cache.url, "--index", "1", "--out", tmp_path / "one.png", check=True)
    assert proc.stdout.strip() == f"wrote {tmp_path / 'one.png'}" and (tmp_path / "one.png").is_file()
    proc = run_cli("show", cache.url, "--random", "2", "--seed", "4", "--out", tmp_path / "pics", check=True)
    written = sorted(p.stem for p in (tmp_path / "pics").glob("*.png"))
    assert len(written) == 2 and set(written) <= set(IDS) and proc.stdout.count("wrote ") == 2
    error_line(run_cli("show", cache.url, "--index", "3"), "--index 3", "0..2")
    error_line(run_cli("show", cache.url, "--index", "0", "--sample", "s1"), "exactly one of")
    error_line(run_cli("show", cache.url), "exactly one of")
    error_line(run_cli("show", cache.url, "--random", "0"), "--random 0")
