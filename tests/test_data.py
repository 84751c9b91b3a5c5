"""Datasets: the real LoveDA scenes through the DWL tiling, the colour-mask tables, folders, GeoTIFFs."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from rsmtdf.data.classes import DEEPGLOBE, POTSDAM
from rsmtdf.data.datasets import open_dataset
from rsmtdf.transforms.pixels import to_unit_rgb
from rsmtdf.errors import RsmtdfError
from rsmtdf.data.splits import make_splits, read_list, splits_sha256


def test_loveda_real_scenes_tile_and_decode(loveda_sample):
    ds = open_dataset("loveda", loveda_sample)
    assert len(ds.ids_in("train")) == 8 and len(ds.ids_in("val")) == 4
    for rec in ds.records:
        raw = np.array(Image.open(rec.mask))
        row, col, size, _ = rec.window  # (row, col, height, width): LoveDA tiles are square
        raw_tile = raw[row : row + size, col : col + size]
        s = ds.load(ds.index(rec.id))
        assert s.image.shape == (512, 512, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (512, 512)
        assert set(np.unique(s.mask)) <= set(range(7)) | {255}
        # per-class pixel counts equal the raw mask's, shifted by one; raw 0 (no-data) → 255
        counts = np.bincount(s.mask.ravel(), minlength=256)
        raw_counts = np.bincount(raw_tile.ravel(), minlength=256)
        assert list(counts[:7]) == list(raw_counts[1:8])
        assert counts[255] == raw_counts[0]
        assert np.array_equal(s.image, np.array(Image.open(rec.image))[row : row + size, col : col + size])


def test_loveda_ids_are_tiles_of_scenes(loveda_sample):
    ds = open_dataset("loveda", loveda_sample)
    assert ds.ids_in("train")[:4] == [f"Train/Rural/0_{k}" for k in range(4)]
    assert {r.domain for r in ds.records} == {"rural"}


def test_splits_are_deterministic_nested_and_hashed(tmp_path, synthetic_root):
    ds = open_dataset("loveda", synthetic_root)
    a, b = tmp_path / "a", tmp_path / "b"
    make_splits(ds, a, seed=3)
    make_splits(ds, b, seed=3)
    assert splits_sha256(a) == splits_sha256(b)
    make_splits(ds, tmp_path / "c", seed=4)
    assert splits_sha256(a) != splits_sha256(tmp_path / "c")
    train = set(ds.ids_in("train"))
    for name in ("1pct", "5pct", "10pct"):
        lab, unl = set(read_list(a, f"{name}/labeled")), set(read_list(a, f"{name}/unlabeled"))
        assert lab | unl == train and not lab & unl
        assert {i.split("/")[1] for i in lab} == {"Rural", "Urban"}  # at least one per domain
    assert set(read_list(a, "1pct/labeled")) <= set(read_list(a, "10pct/labeled"))
    val, test = read_list(a, "val"), read_list(a, "test")
    assert sorted(val + test) == sorted(ds.ids_in("val")) and not set(val) & set(test)


def test_real_splits_of_the_sample(tmp_path, loveda_sample):
    make_splits(open_dataset("loveda", loveda_sample), tmp_path)
    assert len(read_list(tmp_path, "1pct/labeled")) == 1 and len(read_list(tmp_path, "1pct/unlabeled")) == 7
    assert len(read_list(tmp_path, "val")) == 2 and len(read_list(tmp_path, "test")) == 2


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.mark.parametrize("name,table", [("potsdam", POTSDAM), ("deepglobe", DEEPGLOBE)])
def test_colour_masks_decode_in_dwl_order(tmp_path, name, table):
    colours = list(table.colors)
    mask = np.zeros((32, 32, 3), np.uint8)
    for k, c in enumerate(colours):
        mask[k * 4 : (k + 1) * 4] = c
    mask[len(colours) * 4 :] = colours[0]
    _write_png(tmp_path / "Train/images/a.png", np.full((32, 32, 3), 100, np.uint8))
    _write_png(tmp_path / "Train/masks/a.png", mask)
    ds = open_dataset(name, tmp_path)
    decoded = ds.load(0).mask
    for k in range(len(colours)):
        assert (decoded[k * 4 : (k + 1) * 4] == k).all()
    mask[0, 0] = (12, 34, 56)
    _write_png(tmp_path / "Train/masks/a.png", mask)
    with pytest.raises(RsmtdfError, match=r"a.png: mask colour #0c2238 \(1 px\) is neither a class nor ignored"):
        open_dataset(name, tmp_path).load(0)


# The published colour legends (ISPRS 2D labeling benchmark; DeepGlobe land cover challenge), in the
# DWL order the reference's class indices follow: colour -> class name, written out here, not read from
# the tables under test.
LEGENDS = {
    "potsdam": [((255, 255, 255), "impervious surface"), ((0, 0, 255), "building"), ((0, 255, 255), "low vegetation"),
                ((0, 255, 0), "tree"), ((255, 255, 0), "car"), ((255, 0, 0), "clutter")],
    "deepglobe": [((0, 255, 255), "urban"), ((255, 255, 0), "agriculture"), ((255, 0, 255), "rangeland"),
                  ((0, 255, 0), "forest"), ((0, 0, 255), "water"), ((255, 255, 255), "barren"), ((0, 0, 0), "unknown")],
}


@pytest.mark.parametrize("name", LEGENDS)
def test_the_published_legend_decodes_to_its_classes_in_dwl_order(tmp_path, name):
    """A mask painted with each legend colour in turn decodes to that colour's class, at the index
    of its place in the legend (DWL's index masks, and so the reference's class indices)."""
    legend = LEGENDS[name]
    mask = np.zeros((4 * len(legend), 8, 3), np.uint8)
    for k, (rgb, _) in enumerate(legend):
        mask[4 * k : 4 * (k + 1)] = rgb
    _write_png(tmp_path / "Train/images/a.png", np.full(mask.shape, 100, np.uint8))
    _write_png(tmp_path / "Train/masks/a.png", mask)
    ds = open_dataset(name, tmp_path)
    decoded = ds.load(0).mask
    for k, (_, class_name) in enumerate(legend):
        assert (decoded[4 * k : 4 * (k + 1)] == k).all() and ds.classes.names[k] == class_name


def test_folder_geotiff_any_bands_keeps_geo(tmp_path):
    """A 4-band uint16 GeoTIFF with its CRS and transform, read whole through the folder dataset."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    data = np.random.default_rng(0).integers(0, 4000, (4, 20, 30)).astype(np.uint16)
    transform = from_origin(500000, 4200000, 0.5, 0.5)
    with rasterio.open(tmp_path / "images/t1.tif", "w", driver="GTiff", width=30, height=20, count=4,
                       dtype="uint16", crs="EPSG:32633", transform=transform) as dst:
        dst.write(data)
    _write_png(tmp_path / "masks/t1.png", np.ones((20, 30), np.uint8))
    ds = open_dataset("folder", tmp_path, ["a", "b"])
    s = ds.load(0)
    assert s.image.shape == (20, 30, 4) and s.image.dtype == np.uint16
    assert np.array_equal(s.image, data.transpose(1, 2, 0))
    assert s.crs == "EPSG:32633" and s.transform == tuple(transform)[:6]
    rgb = to_unit_rgb(s.image, (2, 1, 0), 4000.0)
    assert rgb.shape == (20, 30, 3) and np.allclose(rgb[..., 0], data[2] / 4000.0)


def test_loveda_missing_domain_or_split_is_fine(tmp_path, loveda_sample):
    import shutil

    shutil.copytree(loveda_sample / "Train", tmp_path / "Train")
    ds = open_dataset("loveda", tmp_path)  # no Val/, no Urban/
    assert len(ds) == 8 and ds.ids_in("val") == []


def test_committed_loveda_splits_are_make_splits_of_the_official_numbering(tmp_path):
    """pipeline/splits/loveda is make_splits(seed 0) over the official release's file numbering."""
    from pathlib import Path

    from conftest import ROOT
    from rsmtdf.data.datasets import LoveDA, Record

    ranges = {("Train", "Rural"): range(0, 1366), ("Train", "Urban"): range(1366, 2522),
              ("Val", "Rural"): range(2522, 3514), ("Val", "Urban"): range(3514, 4191)}
    ds = LoveDA.__new__(LoveDA)
    ds.root = Path("LoveDA")
    ds.records = sorted([Record(f"{s}/{d}/{n}_{k}", Path(), Path(), s.lower(), d.lower(), (0, 0, 512))
                         for (s, d), r in ranges.items() for n in r for k in range(4)], key=lambda r: r.id)
    make_splits(ds, tmp_path, seed=0)
    assert splits_sha256(tmp_path) == splits_sha256(ROOT / "pipeline" / "splits" / "loveda")
    assert len(read_list(tmp_path, "1pct/labeled")) == 101  # 1 % of 5464 rural + 4624 urban tiles


def test_the_devices_scaling_is_bit_equal_to_the_hosts():
    """`unit_pixels` (tensors, what training runs on the device) and `to_unit_rgb` (numpy, the
    CPU's faster path) are one arithmetic: bit-equal for 8/16-bit, signed and float rasters, with
    NaN, nodata masks, per-band low/high, a fill, band selection and a single band repeated."""
    import torch

    from rsmtdf.transforms.pixels import pick_bands, to_unit_rgb, unit_pixels

    rng = np.random.default_rng(0)
    for dtype, top in ((np.uint8, 255), (np.uint16, 4000), (np.int16, 3000), (np.float32, 2.0)):
        image = (rng.random((40, 50, 4)) * top).astype(dtype)
        if dtype == np.float32:
            image[3, 4, 1] = np.nan
        valid = rng.random((40, 50)) > 0.1
        for bands, kw in (((0, 1, 2), {}), ((2, 0, 1), {"max_value": 200.0}),
                          ((3, 0, 1), {"max_value": [100, 200, 300], "low": [10, 0, 5], "valid": valid}),
                          ((0, 1, 2, 3), {"valid": valid, "fill": (0.1, 0.2, 0.3, 0.0)})):
            want = to_unit_rgb(image, bands, **kw)
            tensor_kw = {**kw, "valid": torch.from_numpy(kw["valid"])} if "valid" in kw else kw
            got = unit_pixels(torch.from_numpy(pick_bands(image, bands)), **tensor_kw).numpy()
            assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want), (dtype, bands, kw)
        single = image[..., :1]
        assert np.array_equal(unit_pixels(torch.from_numpy(pick_bands(single, (0, 1, 2)))).numpy(),
                              to_unit_rgb(single, (0, 1, 2)))
