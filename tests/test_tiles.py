"""Large rasters as tiles, unlabeled scenes, masks on another grid, and the real LoveDA sample
unchanged by the windowed reading path.

The rasters are small generated GeoTIFFs (a few hundred px, tile 64) written with rasterio: a 4-band
uint16 scene whose top-left tiles are nodata, a scene whose mask lies on a coarser, shifted grid, and
an unlabeled scene without a mask."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli, tiny_student
from rasterio.transform import from_origin
from test_errors import error_line
from typer.testing import CliRunner

from rsmtdf.transforms.pixels import IGNORE
from rsmtdf.cache.identity import DatasetIdentity
from rsmtdf.data.datasets import open_dataset
from rsmtdf.errors import RsmtdfError
from rsmtdf.data.splits import check_lists, make_splits, read_list
from rsmtdf.data.tiling import TileGrid

TILE = 64
CLASSES = ["land", "water"]
CRS = "EPSG:32650"
ORIGIN = (500000.0, 4200000.0)
MASK_NODATA = 7
STUDENT = tiny_student(32, lr=1e-4, eval_every=1000)


def write_tif(path: Path, array: np.ndarray, transform=None, nodata: float | None = None) -> Path:
    """(bands, h, w) array as a GeoTIFF (georeferenced when `transform` is given)."""
    geo = {"crs": CRS, "transform": transform} if transform is not None else {}
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, nodata=nodata, **geo) as dst:
        dst.write(array)
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """images/a.tif: 200×150, 4 bands uint16, nodata 0 over its two top-left tiles, mask on its grid
    with nodata 7 in a band of rows; images/b.tif: 130×130 (4 bands uint16, as every raster of a
    dataset) whose mask has 2 m pixels on a shifted extent; unlabeled/u.tif: 128×128 without a mask."""
    root = tmp_path_factory.mktemp("tiles")
    for d in ("images", "masks", "unlabeled"):
        (root / d).mkdir()
    rng = np.random.default_rng(0)
    grid = from_origin(*ORIGIN, 1.0, 1.0)
    a = rng.integers(1, 60000, (4, 200, 150), dtype=np.uint16)
    a[:, :TILE, : 2 * TILE] = 0
    write_tif(root / "images" / "a.tif", a, grid, nodata=0)
    mask_a = rng.integers(0, 2, (1, 200, 150), dtype=np.uint8)
    mask_a[:, 150:160] = MASK_NODATA
    write_tif(root / "masks" / "a.tif", mask_a, grid, nodata=MASK_NODATA)
    b_grid = from_origin(ORIGIN[0] + 1000, ORIGIN[1], 1.0, 1.0)
    write_tif(root / "images" / "b.tif", rng.integers(1, 60000, (4, 130, 130), dtype=np.uint16), b_grid)
    coarse = from_origin(ORIGIN[0] + 1010, ORIGIN[1] - 4, 2.0, 2.0)  # starts 10 px right and 4 px down
    write_tif(root / "masks" / "b.tif", rng.integers(0, 2, (1, 50, 50), dtype=np.uint8), coarse)
    write_tif(root / "unlabeled" / "u.tif", rng.integers(1, 60000, (4, 128, 128), dtype=np.uint16),
              from_origin(ORIGIN[0] + 2000, ORIGIN[1], 1.0, 1.0))
    return root


def tiled(root: Path):
    return open_dataset("folder", root, CLASSES, tile_size=TILE)


@pytest.mark.parametrize("data, needle", [
    ({"tile_stride": 32}, "[data] tile_stride = 32: needs [data] tile_size"),
    ({"dataset": "folder", "classes": CLASSES, "tile_size": 64, "tile_stride": 65}, "expected at most tile_size (64)"),
    ({"tile_size": 256}, "[data] tile_size = 256: LoveDA's protocol cuts its scenes into 512 px tiles"),
    ({"dataset": "folder", "classes": CLASSES, "tile_size": 0}, "[data] tile_size = 0: expected an integer"),
])
def test_tile_keys_are_checked_when_the_recipe_is_read(data, needle):
    from rsmtdf.config.recipe import Recipe

    with pytest.raises(RsmtdfError) as err:
        Recipe.from_dict({"data": data}, "r.toml")
    assert str(err.value).startswith("r.toml: ") and needle in str(err.value)


@pytest.mark.parametrize("shape", [(200, 150), (128, 128), (130, 64), (50, 70)])
@pytest.mark.parametrize("stride", [TILE, 40])
def test_tiles_cover_the_scene_on_the_grid_with_no_pixel_lost(shape, stride):
    windows = TileGrid(TILE, stride).windows(*shape)
    seen = np.zeros(shape, int)
    for w in windows:
        r, c, h, wd = int(w.row_off), int(w.col_off), int(w.height), int(w.width)
        assert r % stride == 0 and c % stride == 0 and 0 < h <= TILE and 0 < wd <= TILE
        assert r + h <= shape[0] and c + wd <= shape[1]  # cut at the edge, never past it
        seen[r : r + h, c : c + wd] += 1
    assert (seen >= 1).all()
    if stride == TILE:
        assert (seen == 1).all()


def test_a_tile_read_by_window_equals_the_region_of_the_whole_raster(scenes, monkeypatch):
    from rsmtdf.io import raster

    reads = []
    original = raster.RasterReader.read_raw
    monkeypatch.setattr(raster.RasterReader, "read_raw",
                        lambda self, window: reads.append((self.path.name, window)) or original(self, window))
    ds = tiled(scenes)
    reads.clear()  # the listing's nodata check reads windows too
    a_ids = [i for i in ds.ids if i.startswith("a@")]
    with rasterio.open(scenes / "images" / "a.tif") as src, rasterio.open(scenes / "masks" / "a.tif") as msrc:
        full, transform, mask = src.read().transpose(1, 2, 0), src.transform, msrc.read(1)
    for sid in a_ids:
        r = ds.records[ds.index(sid)]
        row, col, h, w = r.window
        assert sid == f"a@{row}_{col}"
        s = ds.load(ds.index(sid))
        assert s.image.dtype == np.uint16 and s.image.shape == (h, w, 4)
        assert np.array_equal(s.image, full[row : row + h, col : col + w])
        region = mask[row : row + h, col : col + w]
        assert np.array_equal(s.mask, np.where(region == MASK_NODATA, IGNORE, region))  # mask nodata: ignored
        assert s.transform == tuple(transform @ rasterio.Affine.translation(col, row))[:6] and s.crs == CRS
        assert {(int(x.row_off), int(x.col_off), int(x.height), int(x.width)) for _, x in reads} == {(row, col, h, w)}
        reads.clear()
    assert (ds.load(ds.index("a@128_0")).mask[150 - 128 : 160 - 128] == IGNORE).all()


def test_all_nodata_tiles_are_skipped_and_counted(scenes):
    ds = tiled(scenes)
    a_ids = [i for i in ds.ids if i.startswith("a@")]
    assert len(a_ids) == 4 * 3 - 2 and "a@0_0" not in a_ids and "a@0_64" not in a_ids and "a@0_128" in a_ids
    assert ds.skipped_empty == 2 and DatasetIdentity.of(ds).empty_tiles_skipped == 2
    untiled = open_dataset("folder", scenes, CLASSES)
    assert sorted(untiled.ids) == ["a", "b", "unlabeled/u"] and untiled.skipped_empty == 0


def test_a_misaligned_mask_is_resampled_onto_the_image_grid(scenes, tmp_path):
    ds = tiled(scenes)
    with rasterio.open(scenes / "masks" / "b.tif") as msrc:
        coarse = msrc.read(1)
    rows, cols = np.mgrid[0:130, 0:130]
    mr, mc = np.floor((rows + 0.5 - 4) / 2).astype(int), np.floor((cols + 0.5 - 10) / 2).astype(int)
    inside = (mr >= 0) & (mr < 50) & (mc >= 0) & (mc < 50)
    expected = np.full((130, 130), IGNORE, np.uint8)  # outside the mask's extent: ignored
    expected[inside] = coarse[mr[inside], mc[inside]]
    for sid in [i for i in ds.ids if i.startswith("b@")]:
        row, col, h, w = ds.records[ds.index(sid)].window
        assert np.array_equal(ds.load(ds.index(sid)).mask, expected[row : row + h, col : col + w]), sid
    # without georeferencing on both sides a mask of another size cannot be aligned: refused, naming both grids
    plain = tmp_path / "plain"
    for d in ("images", "masks"):
        (plain / d).mkdir(parents=True)
    write_tif(plain / "images" / "p.tif", np.zeros((3, 96, 96), np.uint8), from_origin(*ORIGIN, 1.0, 1.0))
    write_tif(plain / "masks" / "p.tif", np.zeros((1, 48, 48), np.uint8))
    p = tiled(plain)
    with pytest.raises(RsmtdfError, match=r"p\.tif: mask grid 48×48 is not its image's grid 96×96 EPSG:32650"):
        p.load(0)


def test_unlabeled_scenes_go_only_to_unlabeled_lists_and_a_labeled_list_naming_one_is_refused(scenes, tmp_path):
    ds = tiled(scenes)
    maskless = {r.id for r in ds.records if not r.labeled}
    assert maskless == {f"unlabeled/u@{r}_{c}" for r in (0, 64) for c in (0, 64)}
    assert ds.load(ds.index("unlabeled/u@0_0")).mask is None
    splits = tmp_path / "splits"
    make_splits(ds, splits, val_fraction=0.5)
    for name in ("1pct", "5pct", "10pct"):
        assert maskless <= set(read_list(splits, f"{name}/unlabeled"))
        assert not maskless & set(read_list(splits, f"{name}/labeled"))
    assert not maskless & set(read_list(splits, "val") + read_list(splits, "test"))
    check_lists(splits, ds)
    labeled = splits / "10pct" / "labeled.txt"
    labeled.write_text(labeled.read_text() + "unlabeled/u@64_0\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[data]\ndataset = "folder"\nroot = "{scenes}"\nsplits = "{splits}"\nclasses = {CLASSES}\n'
                      f"tile_size = {TILE}\n")
    error_line(run_cli("check-splits", "-r", recipe), str(labeled), "unlabeled/u@64_0", "has no mask",
               "only unlabeled lists")


def test_tiled_folder_extract_train_inspect_and_show(scenes, tmp_path):
    """End to end in-process on the tiled folder with its unlabeled scene: make-splits, extraction
    (its summary counts the nodata tiles), 2 training steps, inspect, and show drawing a tile's view."""
    from PIL import Image

    from rsmtdf.cli import app
    from rsmtdf.inspect.show import PLACEHOLDER

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[data]\ndataset = "folder"\nroot = "{scenes}"\nsplits = "{tmp_path / "splits"}"\n'
                      f"classes = {CLASSES}\ntile_size = {TILE}\n"
                      '[views]\ncount = 1\ncrop_size = 56\n[teachers]\nnames = ["effnet_lite0"]\n'
                      f"sizes = {{ effnet_lite0 = 56 }}\n{STUDENT}")
    runner = CliRunner()

    def cli(*args) -> str:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    cli("make-splits", "-r", recipe, "--val-fraction", "0.5")
    cache = tmp_path / "cache"
    out = cli("extract-features", "-r", recipe, "-o", cache, "--workers", "0", "--device", "cpu")
    assert "2 tiles of the scenes hold only nodata" in out
    cli("train", "--cache", cache, "--split", "10pct", "-r", recipe, "--run-dir", tmp_path / "run", "--max-steps", "2")
    assert (tmp_path / "run" / "latest.pt").is_file()
    assert re.search(r"samples at .*, tiles \d+² every \d+ px", cli("inspect", cache))
    picture = tmp_path / "show.png"
    cli("show", cache, "--sample", "unlabeled/u@64_64", "--out", picture)
    view = np.asarray(Image.open(picture).convert("RGB"))[:160, :160]
    assert not (view == PLACEHOLDER).all(), "show drew the placeholder: the tiled dataset was not found again"


# ---- the real LoveDA sample yields what it yielded before the windowed path -----------------------

# sha256 of the decoded values, computed on the commit before tiles were read by window (04e60ec):
# the samples' ids, pixels, masks and validity; a 1-view effnet_lite0 extraction at 56/64 px (views,
# valid shares, ids and float16 features). Decoded values, not chunk files: the compressor may change.
# The features' digest was taken again when `apply_view` began to resample only its window (the same
# crop to 1e-4 of the range): 99 % of the float16 features are bit-equal, the rest one float16
# step apart, cosine >= 0.9999999; `views.resize_and_crop` still gives 7c896af1ef30a5c3...
LOVEDA_SAMPLES_SHA256 = "c79e0629e0f01a40b9a2652fa37dae6ac3aa3c68b2f8018b42e6874e344d6039"
LOVEDA_FEATURES_SHA256 = "c9686ef54d7f64cf505e75a8e13c14075a6b702a444ae870460fb26563155908"


def test_the_real_loveda_sample_gives_the_same_pixels_masks_and_features(loveda_sample, tmp_path):
    from rsmtdf.cache import FeatureCache
    from rsmtdf.config.recipe import load_recipe
    from rsmtdf.pipeline.extract import extract
    from rsmtdf.pipeline.resolve import resolve

    ds = open_dataset("loveda", loveda_sample)
    h = hashlib.sha256()
    for i, sid in enumerate(ds.ids):
        s = ds.load(i)
        h.update(sid.encode() + s.image.tobytes() + s.mask.tobytes())
        h.update(b"-" if s.valid is None else s.valid.tobytes())
    assert h.hexdigest() == LOVEDA_SAMPLES_SHA256
    make_splits(ds, tmp_path / "splits")
    resolved = resolve(load_recipe(None).override({
        "data.root": str(loveda_sample), "data.splits": str(tmp_path / "splits"), "views.count": 1,
        "views.crop_size": 56, "teachers.names": ["effnet_lite0"], "teachers.sizes": {"effnet_lite0": 64}}))
    extract(resolved, resolved.teachers(), str(tmp_path / "cache"), num_workers=0, progress=False, device="cpu")
    cache = FeatureCache.open(str(tmp_path / "cache"))
    reader = cache.reader()
    h = hashlib.sha256(np.asarray(cache.views_array()).tobytes() + np.asarray(cache.valid_array()).tobytes())
    for i, sid in enumerate(cache.ids):
        h.update(sid.encode() + reader.read(i, 0)["effnet_lite0"].tobytes())
    assert h.hexdigest() == LOVEDA_FEATURES_SHA256
