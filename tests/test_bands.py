"""Bands and scaling: `rsmtdf stats`, percentile scaling of 16-bit data, a multi-band student, and the
scaling recorded in caches and checkpoints and checked wherever data meets a model (issue 10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import run_cli, tiny_student, write_recipe
from rasterio.transform import from_origin
from typer.testing import CliRunner

from rsmtdf.data.bandstats import compute_band_stats, read_band_stats
from rsmtdf.cli import app
from rsmtdf.data.datasets import open_dataset

SIZE = 64
BANDS = 4
NODATA = 0
STUDENT = tiny_student(32, lr=1e-4, eval_every=1000)


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
    return root, write_recipe(root.parent / f"{root.name}.toml", root, splits, dataset="folder",
                              data='classes = ["land", "water"]', sizes="{ effnet_lite0 = 56 }", extra=STUDENT)


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


# ---- scaling applied, recorded and checked ------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(uint16_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(root, recipe, cache): statistics written, then a cache extracted with the percentile stretch."""
    root, recipe = uint16_data
    cache = tmp_path_factory.mktemp("bands-cache") / "cache"
    runner = CliRunner()
    for args in (["stats", "-r", str(recipe), "--no-progress"],
                 ["extract-features", "-r", str(recipe), "-o", str(cache), "--workers", "0", "--device", "cpu"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return root, recipe, cache


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A 4-band student trained 2 steps from the cache, with what reached its first conv recorded."""
    from rsmtdf.config.recipe import load_recipe
    from rsmtdf.train.trainer import Trainer

    root, recipe, cache = prepared
    run = tmp_path_factory.mktemp("bands-run") / "run"
    r = load_recipe(recipe, ["student.bands=[0, 1, 2, 3]", "train.max_steps=2"])
    trainer = Trainer(str(cache), "half", r, run, progress=False)
    seen = []
    trainer.student.encoder.model.patch_embed.proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    trainer.fit()
    return trainer, seen, run


def test_cache_records_the_percentile_stretch(prepared):
    import zarr

    root, _, cache = prepared
    stats = read_band_stats(root.parent / f"{root.name}-splits")
    record = dict(zarr.open_group(str(cache), mode="r").attrs)["input"]
    assert record["mode"] == "percentile" and record["dtype"] == "uint16" and record["bands"] == [0, 1, 2]
    assert record["low"] == [stats["bands"][b]["p2"] for b in range(3)]
    assert record["high"] == [stats["bands"][b]["p98"] for b in range(3)]


def test_four_band_student_trains_on_stretched_bands(trained, prepared):
    from rsmtdf.train.loader import collate, render_crops
    from rsmtdf.transforms.views import View, apply_view

    trainer, seen, _ = trained
    root, _, _ = prepared
    stats = read_band_stats(root.parent / f"{root.name}-splits")
    net = trainer.student
    assert trainer.step == 2 and net.encoder.model.patch_embed.proj.weight.shape[1] == BANDS
    cfg = net.config
    assert cfg["scaling"]["bands"] == [0, 1, 2, 3] and cfg["scaling"]["mode"] == "percentile"
    assert len(cfg["input_mean"]) == len(cfg["input_std"]) == BANDS
    assert cfg["input_mean"][3] == pytest.approx(stats["bands"][3]["stretched"]["mean"])  # NIR: its own statistics
    assert cfg["input_std"][3] == pytest.approx(stats["bands"][3]["stretched"]["std"])

    # what reached the first conv, back in [0, 1]: stretched bands sit around the middle; divided by
    # 65535 (the dtype's range) they would be below 0.1
    x = torch.cat([s for s in seen if s.shape[-1] == 56])  # the training steps (evaluation runs whole tiles)
    unit = x * net.input_std + net.input_mean
    assert x.shape[1] == BANDS
    assert (unit.mean(dim=(0, 2, 3)) > 0.25).all(), unit.mean(dim=(0, 2, 3))

    # exactly the per-band stretch of the statistics, in the replayed view
    item = trainer.sets["l"][(0, 1)]
    sample = trainer.dataset.load(trainer.dataset.index("s1"))
    p2 = np.array([stats["bands"][b]["p2"] for b in range(BANDS)], np.float32)
    p98 = np.array([stats["bands"][b]["p98"] for b in range(BANDS)], np.float32)
    expect = np.clip((sample.image.astype(np.float32) - p2) / (p98 - p2), 0, 1)
    view = View.from_array(trainer.sets["l"].views[trainer.sets["l"].cache_index["s1"], item["view"]])
    crop = render_crops(collate([item]), trainer.sets["l"].views, 56, trainer.scaling, torch.device("cpu"))[0]
    assert np.allclose(crop.permute(1, 2, 0).numpy(), apply_view(expect, view, 56), atol=1e-6)


def test_adapted_first_layer_keeps_timms_rgb_weights(tmp_path):
    import timm
    from timm.models import adapt_input_conv

    from rsmtdf.models.student import Encoder
    from rsmtdf.models.teachers import TEACHERS

    source = TEACHERS["effnet_lite0"].weights  # real ImageNet weights, in a foreign (lukemelas) layout
    rgb = Encoder("tf_efficientnet_lite0", 64, source).model.conv_stem.weight.detach()
    four = Encoder("tf_efficientnet_lite0", 64, source, in_chans=4).model.conv_stem.weight.detach()
    assert torch.equal(four, adapt_input_conv(4, rgb))
    assert torch.allclose(four[:, :3] * 4 / 3, rgb) and torch.allclose(four[:, 3] * 4 / 3, rgb[:, 0])
    # a native timm file goes through timm's own loader: the same adaptation as timm.create_model's
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    ours = Encoder("resnet18", 64, path, in_chans=4).model.conv1.weight
    theirs = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, in_chans=4).conv1.weight
    assert torch.equal(ours, theirs)


def test_show_of_uint16_cache_is_not_black(prepared, tmp_path):
    from PIL import Image

    from rsmtdf.cache import FeatureCache
    from rsmtdf.transforms.scaling import BandScaling
    from rsmtdf.inspect.show import render_sample
    from rsmtdf.transforms.views import apply_view

    root, _, cache_path = prepared
    cache, ds = FeatureCache.open(str(cache_path)), open_dataset("folder", root, ["land", "water"])
    layout = render_sample(cache, "s2", tmp_path / "s2.png", ds, cell=56)
    x0, y0 = layout["image_boxes"][0]
    panel = np.asarray(Image.open(tmp_path / "s2.png").convert("RGB"))[y0 : y0 + 56, x0 : x0 + 56] / 255.0
    sample = ds.load(ds.index("s2"))
    scaling = BandScaling.from_record(cache.attrs["input"])
    expect = apply_view(scaling.unit(sample.image, sample.valid), cache.views_of(cache.ids.index("s2"))[0], 56)
    assert panel.mean() == pytest.approx(expect.mean(), rel=0.10)
    assert panel.mean() > 0.25 > apply_view(BandScaling().unit(sample.image), cache.views_of(2)[0], 56).mean() * 2


# ---- refusals, in one line ----------------------------------------------------------------------------


def test_training_from_a_cache_with_another_scaling_is_refused(prepared, tmp_path):
    from test_errors import error_line

    _, recipe, cache = prepared
    proc = run_cli("train", "--cache", cache, "-r", recipe, "--split", "half", "--run-dir", tmp_path / "run",
                   "--set", 'data.scaling="dtype"')
    error_line(proc, str(cache), "input is", "percentile", "in the cache", "dtype scaling",
               'in --set data.scaling="dtype"')
    assert not (tmp_path / "run" / "latest.pt").exists()


def test_four_band_checkpoint_refuses_three_band_scene(trained, tmp_path):
    from test_errors import PROGRESS

    _, _, run = trained
    scene = tmp_path / "rgb.tif"
    _write(scene, reflectance(np.random.default_rng(0), 3))
    proc = run_cli("predict", scene, "--checkpoint", run / "latest.pt", "--out", tmp_path / "maps")
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.split("\n") if ln.strip() and "\r" not in ln and not PROGRESS.search(ln)]
    assert len(lines) == 1 and lines[0].startswith(f"error: {scene}: 3 bands"), proc.stderr
    assert "bands [0, 1, 2, 3] of uint16 data, percentile scaling" in lines[0]
    assert "0 of 1 inputs mapped" in proc.stdout and not (tmp_path / "maps" / "rgb.tif").exists()
    # and a uint8 scene with four bands: the dtype the model never saw
    byte = tmp_path / "byte.tif"
    _write(byte, np.full((SIZE, SIZE, BANDS), 100, np.uint8))
    proc = run_cli("predict", byte, "--checkpoint", run / "latest.pt", "--out", tmp_path / "maps")
    assert f"error: {byte}: uint8 pixels, but the model was trained on bands [0, 1, 2, 3] of uint16" in proc.stderr


def test_auto_scaling_choices_and_8bit_input_unchanged(uint16_data):
    from rsmtdf.transforms.pixels import NODATA_FILL
    from rsmtdf.errors import RsmtdfError
    from rsmtdf.config.recipe import load_recipe
    from rsmtdf.pipeline.scaling import resolve_scaling

    _, recipe = uint16_data
    r = load_recipe(recipe)
    stats = {"dtype": "uint16", "bands": [{"count": 1, "p2": 10.0 * b, "p98": 100.0 * (b + 1)} for b in range(BANDS)]}
    assert resolve_scaling(r, "uint16", BANDS, stats).mode == "percentile"
    assert resolve_scaling(r, "uint16", BANDS, None).high == (65535.0,) * 3  # no statistics: the dtype's range
    assert resolve_scaling(r.override({"data.max_value": 4000}), "uint16", BANDS, stats).high == (4000.0,) * 3
    with pytest.raises(RsmtdfError, match="run `rsmtdf stats` first"):
        resolve_scaling(r.override({"data.scaling": "percentile"}), "uint16", BANDS, None)
    with pytest.raises(RsmtdfError, match="band 5 asked for"):
        resolve_scaling(r.override({"student.bands": [0, 1, 2, 5]}), "uint16", BANDS, stats)
    # 8-bit data: the dtype's range even with statistics, and bit for bit what networks always got
    byte = resolve_scaling(r, "uint8", 3, {**stats, "dtype": "uint8", "bands": stats["bands"][:3]})
    assert byte.mode == "dtype"
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    valid = np.ones((32, 32), bool)
    valid[:4] = False
    before = np.clip(image.astype(np.float32) / 255.0, 0.0, 1.0)
    before[~valid] = NODATA_FILL
    assert byte.unit(image, valid).tobytes() == before.tobytes()
