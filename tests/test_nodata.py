"""NaN and nodata pixels: masked in every loss, filled for the networks, counted in the cache's
`valid` shares, tiles without any left out; a non-finite loss ends the run in one line.

The rasters are real float32 GeoTIFFs written with rasterio: NaN regions, a declared nodata value
and one tile that is NaN throughout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import run_cli, tiny_student, write_recipe
from rasterio.transform import from_origin
from test_errors import error_line

from rsmtdf.transforms.pixels import IGNORE, NODATA_FILL, to_unit_rgb
from rsmtdf.data.datasets import open_dataset

SIZE = 64
NODATA = -9999.0
STUDENT = tiny_student(translator_hidden=32, lr=1e-4, eval_every=1000)


def _geotiff(path: Path, image: np.ndarray, nodata: float | None = None) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="float32",
                       crs="EPSG:32650", transform=from_origin(500000, 4200000, 1.0, 1.0), nodata=nodata) as dst:
        dst.write(image.transpose(2, 0, 1))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root, recipe): six float32 tiles. t0: NaN in its top half; t1: nodata -9999 in its
    left half; t2: NaN throughout; t3-t5: clean. Split lists written by hand so that the NaN-only
    tile is unlabeled in 10pct and absent from 5pct."""
    root = tmp_path_factory.mktemp("nodata")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        image = rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32)
        nodata = None
        if k == 0:
            image[: SIZE // 2] = np.nan
        elif k == 1:
            image[:, : SIZE // 2] = NODATA
            nodata = NODATA
        elif k == 2:
            image[:] = np.nan
        _geotiff(root / "images" / f"t{k}.tif", image, nodata)
        mask = (rng.uniform(0, 1, (SIZE, SIZE)) > 0.5).astype(np.uint8)
        with rasterio.open(root / "masks" / f"t{k}.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=1,
                           dtype="uint8") as dst:
            dst.write(mask[None])
    splits = root.parent / f"{root.name}-splits"
    (splits / "10pct").mkdir(parents=True)
    (splits / "10pct" / "labeled.txt").write_text("t0\nt1\n")
    (splits / "10pct" / "unlabeled.txt").write_text("t2\nt3\nt4\nt5\n")
    (splits / "5pct").mkdir()  # the same without the NaN-only tile
    (splits / "5pct" / "labeled.txt").write_text("t0\nt1\n")
    (splits / "5pct" / "unlabeled.txt").write_text("t3\nt4\nt5\n")
    (splits / "val.txt").write_text("")
    (splits / "test.txt").write_text("")
    return root, write_recipe(root.parent / f"{root.name}.toml", root, splits, dataset="folder",
                              data='classes = ["land", "water"]', sizes="{ effnet_lite0 = 56 }", extra=STUDENT)


def test_nan_and_nodata_pixels_are_masked_and_filled(scenes):
    root, _ = scenes
    ds = open_dataset("folder", root, ["land", "water"])
    nan_half, nodata_half, all_nan, clean = (ds.load(ds.index(f"t{k}")) for k in range(4))
    assert clean.valid is None
    assert not nan_half.valid[: SIZE // 2].any() and nan_half.valid[SIZE // 2 :].all()
    assert not nodata_half.valid[:, : SIZE // 2].any() and nodata_half.valid[:, SIZE // 2 :].all()
    assert not all_nan.valid.any()
    for sample in (nan_half, nodata_half):  # the loss ignores them: mask 255 exactly there
        assert ((sample.mask == IGNORE) == ~sample.valid).all()
        rgb = to_unit_rgb(sample.image, valid=sample.valid)
        assert np.isfinite(rgb).all()
        assert np.allclose(rgb[~sample.valid], NODATA_FILL) and (rgb[sample.valid] != NODATA_FILL).any()


def test_cached_and_online_training_on_nan_rasters(scenes, tmp_path):
    import zarr

    _, recipe = scenes
    cache = tmp_path / "cache"
    out = run_cli("extract-features", "-r", recipe, "-o", cache, "--workers", "0", "--device", "cpu", check=True)
    assert "1 tiles have no valid pixels" in out.stdout
    group = zarr.open_group(str(cache), mode="r")
    valid = group["valid"][:]
    ids = [str(s) for s in group["ids"][:]]
    assert valid.shape == (6, 2) and valid.dtype == np.float32
    assert (valid[ids.index("t2")] == 0).all()  # NaN throughout
    assert ((valid[ids.index("t0")] > 0) & (valid[ids.index("t0")] < 1)).all()  # half NaN
    assert np.isfinite(group["teachers/effnet_lite0"][:].astype(np.float32)).all()  # no NaN stored

    for mode, run in (("cached", tmp_path / "cached"), ("online", tmp_path / "online")):
        proc = run_cli("train", "--cache", cache, "--split", "10pct", "-r", recipe, "--run-dir", run, "--max-steps", "3",
                       "--teachers", mode, check=True)
        assert "left out 1 tiles" in proc.stderr and "t2" in proc.stderr
        losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 3 and all(np.isfinite(r["loss"]) and np.isfinite(r["loss_distill"]) for r in losses)
        ckpt = torch.load(run / "latest.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["student"].values() if v.is_floating_point())

    # without a cache: the views' valid shares are read from the rasters, the same tile left out
    proc = run_cli("train", "--split", "10pct", "-r", recipe, "--run-dir", tmp_path / "nocache", "--max-steps", "2",
                   "--teachers", "online", check=True)
    assert "left out 1 tiles" in proc.stderr


def test_a_diverging_loss_ends_in_one_line_naming_step_and_samples(scenes, tmp_path):
    """A learning rate of 1e30 makes the weights overflow within a few steps: the run must stop at
    the first non-finite loss, name it, and write no checkpoint holding NaN weights."""
    _, recipe = scenes
    run = tmp_path / "run"
    proc = run_cli("train", "--split", "5pct", "-r", recipe, "--run-dir", run, "--max-steps", "20", "--lr", "1e30",
                   "--teachers", "online", "--checkpoint-every", "1")
    line = error_line(proc, "the loss is not finite", "on samples t")
    assert line.startswith("error: step ")
    assert "nothing of this step was applied" in line
    if (run / "latest.pt").exists():
        ckpt = torch.load(run / "latest.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["student"].values() if v.is_floating_point())
