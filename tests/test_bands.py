"""Bands and scaling: `rsmtdf stats`, percentile scaling of 16-bit data, a multi-band student, and the
scaling recorded in caches and checkpoints and checked wherever data meets a model (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli
from rasterio.transform import from_origin
from typer.testing import CliRunner

from rsmtdf.bandstats import compute_band_stats, read_band_stats
from rsmtdf.cli import app
from rsmtdf.data import open_dataset

SIZE = 64
BANDS = 4
NODATA = 0
STUDENT = """
[student]
encoder = "vit_small_patch14_dinov2"
pretrained = false
translator_hidden = 32
kwargs = { embed_dim = 48, depth = 4, num_heads = 3 }
[train]
batch_size = 2
lr = 1e-4
workers = 0
eval_every = 1000
"""


def _write(path: Path, image: np.ndarray, nodata: float | None = None) -> None:
    """A georeferenced GeoTIFF from an H×W×C array."""
    with rasterio.open(path, "w", driver="GTiff", width=image.shape[1], height=image.shape[0], count=image.shape[2],
                       dtype=image.dtype, crs="EPSG:32633", transform=from_origin(400000, 5000000, 10.0, 10.0),
                       nodata=nodata) as dst:
        dst.write(image.transpose(2, 0, 1))


def reflectance(rng: np.random.Generator, bands: int = BANDS) -> np.ndarray:
    """uint16 'reflectance' that a division by 65535 renders nearly black: band b around 800·(b+1)."""
    base = rng.gamma(4.0, 150.0, (SIZE, SIZE, bands)) + 800.0 * np.arange(1, bands + 1)
    return np.clip(base, 1, 65535).astype(np.uint16)


def folder_dataset(root: Path, bands: int = BANDS, tiles: int = 6) -> tuple[Path, Path]:
    """(root, recipe): `tiles` 64² uint16 training tiles of `bands` bands with nodata 0 (tile 0's left
    quarter is nodata), binary masks, split lists and a tiny recipe with a 4-band student."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(tiles):
        image = reflectance(rng, bands)
        if k == 0:
            image[:, : SIZE // 4] = NODATA
        _write(root / "images" / f"s{k}.tif", image, NODATA)
        mask = (image[..., 0] > np.median(image[..., 0])).astype(np.uint8)[..., None]
        _write(root / "masks" / f"s{k}.tif", mask)
    splits = root.parent / f"{root.name}-splits"
    (splits / "half").mkdir(parents=True)
    (splits / "half" / "labeled.txt").write_text("s0\ns1\n")
    (splits / "half" / "unlabeled.txt").write_text("".join(f"s{k}\n" for k in range(2, tiles)))
    (splits / "val.txt").write_text("s1\n")
    (splits / "test.txt").write_text("s1\n")
    recipe = root.parent / f"{root.name}.toml"
    recipe.write_text(f'[data]\ndataset = "folder"\nroot = "{root}"\nsplits = "{splits}"\nclasses = ["land", "water"]\n'
                      f'[views]\ncount = 2\ncrop_size = 56\n[teachers]\nnames = ["effnet_lite0"]\n'
                      f'sizes = {{ effnet_lite0 = 56 }}\n{STUDENT}')
    return root, recipe


@pytest.fixture(scope="module")
def uint16_data(tmp_path_factory) -> tuple[Path, Path]:
    return folder_dataset(tmp_path_factory.mktemp("bands") / "scenes")


def valid_values(root: Path) -> np.ndarray:
    """(n, C) every valid pixel of every training tile, read with rasterio directly."""
    out = []
    for path in sorted((root / "images").glob("*.tif")):
        with rasterio.open(path) as src:
            data = src.read().reshape(src.count, -1).T
        out.append(data[(data != NODATA).any(axis=1)])
    return np.concatenate(out)


def test_stats_match_numpy_on_valid_pixels(uint16_data):
    root, recipe = uint16_data
    result = CliRunner().invoke(app, ["stats", "-r", str(recipe), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote statistics of 4 bands (uint16) over 6 tiles" in result.output
    assert result.output.splitlines()[0].split()[:3] == ["band", "valid", "px"]  # the summary table
    stats = read_band_stats(root.parent / f"{root.name}-splits")
    values = valid_values(root)
    assert stats["dtype"] == "uint16" and len(stats["bands"]) == BANDS
    for b, s in enumerate(stats["bands"]):
        v = values[:, b].astype(np.float64)
        assert s["count"] == len(v) == 6 * SIZE * SIZE - SIZE * SIZE // 4  # nodata left out
        assert s["mean"] == pytest.approx(v.mean(), rel=1e-9) and s["std"] == pytest.approx(v.std(), rel=1e-6)
        assert (s["min"], s["max"]) == (v.min(), v.max())
        for q in (2, 98):  # within one histogram bin (one value for uint16)
            assert abs(s[f"p{q}"] - np.percentile(v, q)) <= 1.0
        unit = np.clip((v - s["p2"]) / (s["p98"] - s["p2"]), 0, 1)
        assert s["stretched"]["mean"] == pytest.approx(unit.mean(), rel=1e-9)
        assert s["stretched"]["std"] == pytest.approx(unit.std(), rel=1e-6)


def test_float_stats_within_one_bin(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    v = rng.normal(0.2, 0.05, (SIZE, SIZE, 2)).astype(np.float32)
    v[0, :5] = np.nan
    _write(tmp_path / "d" / "images" / "a.tif", v)
    _write(tmp_path / "d" / "masks" / "a.tif", np.zeros((SIZE, SIZE, 1), np.uint8))
    ds = open_dataset("folder", tmp_path / "d", ["x"])
    stats = compute_band_stats(ds, ["a"], progress=False)
    for b, s in enumerate(stats["bands"]):
        x = v[..., b][np.isfinite(v).all(axis=2)].astype(np.float64)
        width = (x.max() - x.min()) / 65536
        assert s["count"] == SIZE * SIZE - 5
        for q in (2, 98):  # the histogram's percentile is the inverted CDF's, to one bin
            assert abs(s[f"p{q}"] - np.percentile(x, q, method="inverted_cdf")) <= width
