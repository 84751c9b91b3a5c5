"""The procedural LoveDA-layout generator: layout, codes, determinism, and that classes are learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsmtdf.data.synthetic import make_landcover_dataset, render_scene

SIZE = 256
BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(1, 8)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _load(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """All (image, mask) pairs of a dataset, read back from disk as a consumer would."""
    pairs = []
    for mask_path in sorted(root.glob("*/*/masks_png/*.png")):
        image_path = mask_path.parent.parent / "images_png" / mask_path.name
        pairs.append((np.asarray(Image.open(image_path)), np.asarray(Image.open(mask_path))))
    return pairs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loveda")
    assert make_landcover_dataset(root, train_scenes=4, val_scenes=2, size=SIZE, seed=0) == root
    return root


def test_layout_and_consecutive_ids(dataset: Path) -> None:
    expected = {}
    n = 0
    for split, count in (("Train", 4), ("Val", 2)):
        for domain in ("Rural", "Urban"):  # LoveDA's numbering order
            expected[(split, domain)] = [str(i) for i in range(n, n + count)]
            n += count
    for (split, domain), names in expected.items():
        for kind in ("images_png", "masks_png"):
            found = sorted((p.stem for p in (dataset / split / domain / kind).glob("*.png")), key=int)
            assert found == names, (split, domain, kind)
    assert len(list(dataset.rglob("*.png"))) == 2 * n


def test_images_and_masks_have_loveda_formats(dataset: Path) -> None:
    for image_path in dataset.rglob("images_png/*.png"):
        with Image.open(image_path) as im:
            assert (im.mode, im.size) == ("RGB", (SIZE, SIZE))
    for mask_path in dataset.rglob("masks_png/*.png"):
        with Image.open(mask_path) as im:
            assert (im.mode, im.size) == ("L", (SIZE, SIZE))
    for image, mask in _load(dataset):
        assert image.dtype == mask.dtype == np.uint8
        assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
        assert mask.max() <= 7


def test_every_class_appears(dataset: Path) -> None:
    present = set(np.unique(np.concatenate([m.ravel() for _, m in _load(dataset)])).tolist())
    assert set(range(1, 8)) <= present


def test_urban_scenes_have_more_buildings(dataset: Path) -> None:
    def share(domain: str) -> float:
        masks = [np.asarray(Image.open(p)) for p in dataset.glob(f"*/{domain}/masks_png/*.png")]
        return float(np.mean([(m == BUILDING).mean() for m in masks]))

    assert share("Urban") > 3 * share("Rural") and share("Urban") > 0.02


def test_nodata_strip_is_black_and_at_an_edge() -> None:
    rngs = (np.random.default_rng(k) for k in range(60))
    scenes = [render_scene(128, rng, urban=bool(k % 2)) for k, rng in enumerate(rngs)]
    with_nodata = [(image, mask) for image, mask in scenes if (mask == 0).any()]
    assert 0 < len(with_nodata) < len(scenes) // 2  # occasional, as in LoveDA
    for image, mask in with_nodata:
        assert (image[mask == 0] == 0).all()
        edges = (mask[0] == 0).all(), (mask[-1] == 0).all(), (mask[:, 0] == 0).all(), (mask[:, -1] == 0).all()
        assert any(edges)


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    runs = {name: _files(make_landcover_dataset(tmp_path / name, 1, 1, size=128, seed=seed))
            for name, seed in (("a", 3), ("b", 3), ("c", 4))}
    assert runs["a"] == runs["b"]
    assert runs["a"].keys() == runs["c"].keys()
    assert all(runs["a"][k] != runs["c"][k] for k in runs["a"])


def test_render_scene_is_deterministic_given_the_generator() -> None:
    first = render_scene(SIZE, np.random.default_rng(7), urban=True)
    second = render_scene(SIZE, np.random.default_rng(7), urban=True)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_domains_restrict_the_layout(tmp_path: Path) -> None:
    root = make_landcover_dataset(tmp_path, 2, 1, size=64, domains=("Urban",))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == [
        f"{split}/Urban/{kind}/{i}.png" for split, ids in (("Train", (0, 1)), ("Val", (2,)))
        for kind in ("images_png", "masks_png") for i in ids]
    with pytest.raises(ValueError, match="Suburban"):
        make_landcover_dataset(tmp_path, domains=("Suburban",))


def test_classes_are_separable_by_colour_statistics(dataset: Path) -> None:
    """Per-class colour means differ in the expected directions, and a nearest-mean classifier on
    (mean colour, local texture) of small patches beats chance by a wide margin."""
    pairs = _load(dataset)
    pixels = np.concatenate([im.reshape(-1, 3) for im, _ in pairs]).astype(np.float64)
    codes = np.concatenate([m.ravel() for _, m in pairs])
    mean = {c: pixels[codes == c].mean(0) for c in range(1, 8)}
    r, g, b = 0, 1, 2
    assert mean[WATER].sum() < mean[AGRICULTURE].sum() - 150  # water is darker ...
    assert mean[WATER][b] - mean[WATER][r] > mean[AGRICULTURE][b] - mean[AGRICULTURE][r] + 40  # ... and bluer
    assert mean[FOREST][g] > mean[FOREST][r] and mean[FOREST].sum() < mean[BACKGROUND].sum() - 60
    assert mean[BARREN][r] > mean[BARREN][b] + 40  # brownish
    assert np.ptp(mean[ROAD]) < 25  # grey

    # 4×4 patches of a single class: features = mean RGB + per-channel std (texture).
    k = 4
    feats, labels = [], []
    for image, mask in pairs:
        tiles = image.reshape(SIZE // k, k, SIZE // k, k, 3).transpose(0, 2, 1, 3, 4).reshape(-1, k * k, 3)
        tmask = mask.reshape(SIZE // k, k, SIZE // k, k).transpose(0, 2, 1, 3).reshape(-1, k * k)
        pure = (tmask == tmask[:, :1]).all(1) & (tmask[:, 0] > 0)
        tiles = tiles[pure].astype(np.float64)
        feats.append(np.concatenate([tiles.mean(1), tiles.std(1)], 1))
        labels.append(tmask[pure, 0])
    x, y = np.concatenate(feats), np.concatenate(labels)
    classes = list(range(1, 8))
    assert all((y == c).sum() >= 5 for c in classes)
    centroids = np.stack([x[y == c].mean(0) for c in classes])
    scale = x.std(0) + 1e-6
    predicted = np.array(classes)[np.argmin((((x[:, None] - centroids) / scale) ** 2).sum(-1), 1)]
    balanced = np.mean([(predicted[y == c] == c).mean() for c in classes])
    assert balanced > 0.6 and (predicted == y).mean() > 0.7  # chance is ~1/7
