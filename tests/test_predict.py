"""`rsmtdf predict`: streamed windows equal a whole-scene computation, nodata stays nodata, outputs are
COGs with the input's georeferencing, a killed run leaves nothing at the output name, and one bad
scene ends in one line while the others are written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import ROOT, run_cli
from rasterio.transform import from_origin
from rasterio.windows import Window
from test_errors import PROGRESS

from rsmtdf.bench.predict import random_checkpoint, write_scene
from rsmtdf.data.classes import LOVEDA
from rsmtdf.transforms.pixels import NODATA_FILL, to_unit_rgb
from rsmtdf.errors import RsmtdfError
from rsmtdf.transforms.scaling import BandScaling
from rsmtdf.predict.blend import Tiling, blend_weight, blended_blocks
from rsmtdf.predict.mapping import find_scenes
from rsmtdf.pipeline.trained import load_trained
from rsmtdf.io.raster import RasterReader, grid_offsets, window_grid

WINDOW, STRIDE = 56, 37
GEO = from_origin(500000, 4200000, 0.3, 0.3)
K = len(LOVEDA.names)
ONE = {"OMP_NUM_THREADS": "1"}  # CLI runs with one torch thread (see one_thread)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the in-process forwards: on a shared 2-core machine two intra-op threads
    can run a hundred times slower (BENCHMARKS.md, "Why --threads 1")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny ViT/14 student (56 px crop) saved as a checkpoint."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    random_checkpoint(path, WINDOW, {"embed_dim": 48, "depth": 4, "num_heads": 3})
    return path


def _pixels(h: int, w: int, bands: int = 3, seed: int = 0) -> np.ndarray:
    """(bands, h, w) uint8 in 1..255 with structure (blocks of colour) and noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 256, (bands, h // 40 + 1, w // 40 + 1))
    img = np.repeat(np.repeat(coarse, 40, 1), 40, 2)[:, :h, :w]
    return np.clip(img + rng.integers(-20, 21, img.shape), 1, 255).astype(np.uint8)


def nodata_scene(path: Path, h: int = 230, w: int = 310, mirrored: bool = False) -> Path:
    """3-band scene, nodata = 0, with a nodata rectangle larger than two windows (top left, or top
    right when `mirrored`: window rows then end in skipped windows) and a few scattered nodata
    pixels; blocks of 64 so windows cross block edges."""
    img = _pixels(h, w)
    img[:, :120, :150] = 0
    img[:, 200, 250:260] = 0
    if mirrored:
        img = np.ascontiguousarray(img[:, :, ::-1])
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs="EPSG:32650",
                       transform=GEO, nodata=0, tiled=True, blockxsize=64, blockysize=64) as dst:
        dst.write(img)
    return path


def alpha_scene(path: Path, h: int = 150, w: int = 170) -> Path:
    """RGBA scene whose alpha band hides a region holding ordinary, non-zero pixel values."""
    img = _pixels(h, w, 4, seed=1)
    img[3] = 255
    img[3, 40:90, 60:130] = 0
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=4, dtype="uint8", crs="EPSG:32650",
                       transform=GEO, photometric="RGB", alpha="YES") as dst:
        dst.write(img)
    return path


def reference(net, path: Path, tiling: Tiling) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) blended probabilities and (H, W) validity from the whole scene held in memory:
    every window of the grid run alone, Gaussian-weighted softmax summed over the full arrays. The
    model sees what training feeds: nodata pixels as NODATA_FILL, outside the scene 0 (views' pad)."""
    with rasterio.open(path) as src:
        data = src.read()[:3].transpose(1, 2, 0)
        valid = (src.read_masks()[:3] > 0).any(0)
    x = to_unit_rgb(data, (0, 1, 2), valid=valid)
    h, w = valid.shape
    s = tiling.window
    xp = np.zeros((max(h, s), max(w, s), 3), np.float32)
    vp = np.zeros(xp.shape[:2], bool)
    xp[:h, :w], vp[:h, :w] = x, valid
    sums = np.zeros((K + 1, *xp.shape[:2]), np.float64)
    weight = blend_weight(s)
    with torch.no_grad():
        for row in window_grid(h, w, s, tiling.stride):
            for win in row:
                r, c = int(win.row_off), int(win.col_off)
                v = vp[r : r + s, c : c + s]
                if not v.any():
                    continue
                tile = torch.from_numpy(np.ascontiguousarray(xp[r : r + s, c : c + s])).permute(2, 0, 1)[None]
                p = net(tile).logits.softmax(1)[0].numpy()
                sums[:K, r : r + s, c : c + s] += p * weight * v
                sums[K, r : r + s, c : c + s] += weight * v
    sums = sums[:, :h, :w]
    ok = sums[K] > 0
    return sums[:K] / np.where(ok, sums[K], 1), ok


def streamed(net, path: Path, tiling: Tiling) -> tuple[np.ndarray, np.ndarray, int]:
    """The same from `blended_blocks`, assembled; also how many windows were skipped as outside."""
    with rasterio.open(path) as src:
        h, w = src.height, src.width
    sums = np.full((K + 1, h, w), np.nan, np.float32)
    outside = []
    for win, block in blended_blocks(net, path, BandScaling(), tiling, "cpu", lambda run, out: outside.append(out)):
        r, c = int(win.row_off), int(win.col_off)
        block = block.cpu().numpy()
        assert np.isnan(sums[0, r : r + block.shape[1], c : c + block.shape[2]]).all(), "a block written twice"
        sums[:, r : r + block.shape[1], c : c + block.shape[2]] = block
    assert not np.isnan(sums).any(), "a pixel no block covered"
    ok = sums[K] > 0
    return sums[:K] / np.where(ok, sums[K], 1), ok, sum(outside)


def assert_same_map(p: np.ndarray, ref: np.ndarray, ok: np.ndarray) -> None:
    """Probabilities within 1e-5, argmax identical except where the top two tie (to 1e-6)."""
    assert np.abs(p - ref).max() < 1e-5
    top2 = np.sort(ref, axis=0)[-2:]
    tie = top2[1] - top2[0] < 1e-6
    assert ((p.argmax(0) == ref.argmax(0)) | tie | ~ok).all()


@pytest.mark.parametrize("batch, mirrored", [(1, False), (5, False), (3, True)])
def test_streamed_blocks_equal_the_whole_scene_reference(tmp_path, checkpoint, batch, mirrored):
    net, _, _ = load_trained(checkpoint)
    scene = nodata_scene(tmp_path / "scene.tif", mirrored=mirrored)
    tiling = Tiling(WINDOW, STRIDE, batch)
    ref, ref_ok = reference(net, scene, tiling)
    p, ok, outside = streamed(net, scene, tiling)
    assert (ok == ref_ok).all()
    assert_same_map(p, ref, ok)
    assert outside > 0  # windows inside the nodata rectangle were skipped, not run
    ok = ok[:, ::-1] if mirrored else ok
    assert not ok[:120, :150].any() and not ok[200, 250:260].any() and ok[150:, 160:].mean() > 0.99


def test_a_scene_smaller_than_one_window(tmp_path, checkpoint):
    net, _, _ = load_trained(checkpoint)
    path = tmp_path / "small.tif"
    with rasterio.open(path, "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8") as dst:
        dst.write(_pixels(30, 40))
    tiling = Tiling(WINDOW, STRIDE, 2)
    ref, _ = reference(net, path, tiling)
    p, ok, _ = streamed(net, path, tiling)
    assert ok.all() and p.shape == (K, 30, 40)
    assert_same_map(p, ref, ok)


def test_cli_writes_cogs_that_keep_georeferencing_colours_classes_and_nodata(tmp_path, checkpoint):
    net, _, _ = load_trained(checkpoint)
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    nodata_scene(scenes / "a.tif", 600, 700)  # larger than a 512 tile: the COG gets an overview
    alpha_scene(scenes / "b.tif")
    proc = run_cli("predict", scenes, "--checkpoint", checkpoint, "--out", tmp_path / "maps", "--window", WINDOW,
                   "--stride", WINDOW, "--batch-size", 4, "--probabilities", "--confidence", check=True, env=ONE)
    assert proc.stdout.count("Mpx/s") == 2 and "windows" in proc.stdout and "nodata" in proc.stdout
    ref, ok = reference(net, scenes / "a.tif", Tiling(WINDOW, WINDOW))
    with rasterio.open(tmp_path / "maps" / "a.tif") as src:
        assert src.crs.to_string() == "EPSG:32650" and src.transform == GEO
        assert (src.width, src.height, src.count, src.dtypes[0], src.nodata) == (700, 600, 1, "uint8", 255)
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert src.block_shapes == [(512, 512)] and src.overviews(1) == [2]
        assert json.loads(src.tags()["classes"]) == list(LOVEDA.names)
        assert {k: src.colormap(1)[k] for k in range(K)} == {k: (*map(int, c), 255) for k, c in enumerate(LOVEDA.colours()[:K])}
        classes = src.read(1)
    expected = np.where(ok, ref.argmax(0), 255)
    top2 = np.sort(ref, axis=0)[-2:]
    assert ((classes == expected) | (top2[1] - top2[0] < 1e-6)).all()
    assert (classes[:120, :150] == 255).all()
    with rasterio.open(tmp_path / "maps" / "a.probabilities.tif") as src:
        assert src.count == K and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.crs == "EPSG:32650"
        probs = src.read()
    assert (probs[:, ~ok] == 255).all()
    assert np.abs(probs[:, ok].astype(int) - np.rint(ref[:, ok] * 254)).max() <= 1
    with rasterio.open(tmp_path / "maps" / "a.confidence.tif") as src:
        conf = src.read(1)
    assert np.abs(conf[ok].astype(int) - np.rint(ref.max(0)[ok] * 254)).max() <= 1
    with rasterio.open(tmp_path / "maps" / "b.tif") as src:
        b = src.read(1)
    assert (b[40:90, 60:130] == 255).all() and (np.delete(b, np.s_[40:90], 0) < K).all()
    assert not list((tmp_path / "maps").glob(".*")), "temporary files left behind"

    again = run_cli("predict", scenes, "--checkpoint", checkpoint, "--out", tmp_path / "maps", "--window", WINDOW,
                    "--stride", WINDOW, "--probabilities", "--confidence", check=True, env=ONE)
    assert again.stdout.count("skipped") == 2


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def test_sigkill_mid_scene_leaves_no_map_and_a_rerun_completes(tmp_path, checkpoint):
    scene = write_scene(tmp_path / "big.tif", 1200)
    out = tmp_path / "maps"
    args = [sys.executable, "-m", "rsmtdf.cli", "predict", str(scene), "--checkpoint", str(checkpoint), "--out",
            str(out), "--window", str(WINDOW), "--stride", str(WINDOW), "--batch-size", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ONE})
    _wait_for(out / ".big.tif.partial", proc)
    time.sleep(1.0)  # well into the scene (about a thousand windows)
    assert proc.poll() is None, "the scene finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (out / "big.tif").exists()
    run_cli("predict", scene, "--checkpoint", checkpoint, "--out", out, "--window", WINDOW, "--stride", WINDOW,
            check=True, env=ONE)
    with rasterio.open(out / "big.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and (src.read(1) < K).all()
    assert sorted(p.name for p in out.iterdir()) == ["big.tif"]


def test_a_truncated_scene_ends_in_one_line_and_the_others_are_written(tmp_path, checkpoint):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for name in ("a", "c"):
        alpha_scene(scenes / f"{name}.tif")
    whole = write_scene(tmp_path / "whole.tif", 600, block=128)
    data = whole.read_bytes()
    (scenes / "b.tif").write_bytes(data[: len(data) // 2])
    proc = run_cli("predict", scenes, "--checkpoint", checkpoint, "--out", tmp_path / "maps", "--window", WINDOW,
                   "--stride", WINDOW, env=ONE)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.split("\n") if ln.strip() and "\r" not in ln and not PROGRESS.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "b.tif" in lines[0], proc.stderr
    assert "truncated or corrupt" in lines[0]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["a.tif", "c.tif"]
    assert "2 of 3 inputs mapped" in proc.stdout


def test_refusals_are_one_line(tmp_path, checkpoint):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        alpha_scene(tmp_path / d / "same.tif")
    for args, words in [
        ((tmp_path / "x" / "same.tif", tmp_path / "y" / "same.tif"), ("same.tif", "would write")),
        ((tmp_path / "x", "--window", 50), ("--window 50", "multiple")),
        ((tmp_path / "x", "--stride", 0), ("--stride 0",)),
    ]:
        proc = run_cli("predict", *args, "--checkpoint", checkpoint, "--out", tmp_path / "maps")
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert all(w in lines[0] for w in words), (words, lines[0])
    assert not (tmp_path / "maps").exists()


# ---- the windowed reader ------------------------------------------------------------------------


def test_grid_covers_every_pixel_and_keeps_windows_inside():
    for length, size, stride in [(100, 56, 37), (56, 56, 37), (30, 56, 37), (1000, 512, 512), (513, 512, 448)]:
        shift = grid_offsets(length, size, stride)
        covered = np.zeros(max(length, size), bool)
        for o in shift:
            covered[o : o + size] = True
        assert covered[:length].all() and (length < size or shift[-1] + size == length)
        steps = [b - a for a, b in zip(shift, shift[1:])]
        assert all(0 < d <= stride for d in steps) and max(steps, default=0) - min(steps, default=0) <= 1  # even
        assert len(shift) == len(partial := grid_offsets(length, size, stride, "partial")) or length <= size
        assert partial[0] == 0 and all(b - a == stride for a, b in zip(partial, partial[1:]))
        assert partial[-1] < length <= partial[-1] + max(size, stride)


def test_window_reads_equal_the_full_array_with_band_selection_and_scaling(tmp_path):
    rng = np.random.default_rng(3)
    full = rng.integers(0, 4000, (4, 90, 120)).astype(np.uint16)
    path = tmp_path / "ms.tif"
    with rasterio.open(path, "w", driver="GTiff", width=120, height=90, count=4, dtype="uint16") as dst:
        dst.write(full)
    scaling = BandScaling((3, 1, 0), 4000.0)
    with RasterReader(path, scaling) as src:
        image, valid = src.read(Window(100, 70, 56, 56))  # runs past the right and bottom edges
    expect = to_unit_rgb(full.transpose(1, 2, 0)[70:, 100:], (3, 1, 0), 4000.0)
    assert np.array_equal(image[:20, :20], expect) and valid[:20, :20].all()
    assert not valid[20:].any() and not valid[:, 20:].any() and (image[20:] == 0).all()
    with pytest.raises(RsmtdfError, match="band 4 asked for, the raster has 4 bands"):
        RasterReader(path, BandScaling((4, 1, 0)))


def test_nan_and_single_band_rasters(tmp_path):
    data = np.linspace(0, 1, 40 * 50, dtype=np.float32).reshape(1, 40, 50)
    data[0, 5:10, 5:10] = np.nan
    path = tmp_path / "f.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=1, dtype="float32") as dst:
        dst.write(data)
    with RasterReader(path) as src:
        image, valid = src.read(Window(0, 0, 50, 40))
    assert image.shape == (40, 50, 3) and (image[valid, 0] == image[valid, 2]).all()
    assert not valid[5:10, 5:10].any() and valid.sum() == 40 * 50 - 25 and np.allclose(image[5:10, 5:10], NODATA_FILL)


def test_find_scenes_takes_files_folders_and_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for p in ("d/a.tif", "d/sub/b.tif", "d/.hidden.tif", "d/notes.txt", "c.jp2"):
        (tmp_path / p).write_bytes(b"")
    scenes, problems = find_scenes([str(tmp_path / "d"), str(tmp_path / "*.jp2"), str(tmp_path / "d" / "a.tif"),
                                    str(tmp_path / "missing.tif"), str(tmp_path / "*.png")])
    assert [p.name for p in scenes] == ["a.tif", "b.tif", "c.jp2"]
    assert len(problems) == 2 and "missing.tif: no such file" in problems[0] and "no file matches" in problems[1]
