"""The cache: read-back exactness, resumability under SIGKILL, sharded workers, inspect, estimate, show."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from conftest import ROOT, run_cli, write_recipe
from rsmtdf.cache import FeatureCache
from rsmtdf.data.datasets import open_dataset
from rsmtdf.transforms.pixels import to_unit_rgb
from rsmtdf.pipeline.extract import extract
from rsmtdf.pipeline.resolve import resolve
from rsmtdf.config.recipe import load_recipe
from rsmtdf.data.splits import make_splits
from rsmtdf.transforms.views import apply_view


def _extract(recipe: Path, out: Path, sets: tuple[str, ...] = (), **kw):
    resolved = resolve(load_recipe(recipe, list(sets)))
    teachers = resolved.teachers()
    kw = {"shard_samples": 2, "num_workers": 0, "progress": False, **kw}
    return extract(resolved, teachers, str(out), **kw), resolved.dataset, teachers, resolved.recipe


def _arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: a[:] for name, a in g.arrays()} | {f"teachers/{n}": a[:] for n, a in g["teachers"].arrays()}


def _assert_same_cache(a: Path, b: Path) -> None:
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys()
    for name in xa:
        assert np.array_equal(xa[name], xb[name]), name


def test_read_back_equals_teacher_on_each_stored_view(tiny):
    recipe, out = tiny
    summary, ds, teachers, r = _extract(recipe, out)
    cache = FeatureCache.open(out)
    assert cache.attrs["complete"] and summary.missing == []
    reader = cache.reader()
    crop = r.views.crop_size
    for i, sid in enumerate(cache.ids):
        sample = ds.load(ds.index(sid))
        rgb = to_unit_rgb(sample.image)
        for a, view in enumerate(cache.views_of(i)):
            crop_img = torch.from_numpy(apply_view(rgb, view, crop).transpose(2, 0, 1))[None]
            for t in teachers:
                want = t.targets(crop_img)[0].numpy()
                got = reader.read(i, a)[t.name]
                assert got.shape == want.shape
                # float16 rounding (one fp16 ulp, 2^-10 relative) over float32 batch-size noise, which
                # is absolute (~1e-6 of the tensor's range: other conv kernels for another batch size)
                np.testing.assert_allclose(got, want, rtol=2**-10, atol=1e-5 * np.abs(want).max())


def test_cache_written_with_the_former_blosc_default_reads_the_same(tiny, tmp_path):
    """The default codec changed (Blosc-zstd → none, crc32c kept): a cache made before keeps its
    codec in each array's metadata and reads exactly as a new one."""
    import shutil

    from zarr.codecs import BloscCodec

    from rsmtdf.cache.format import checksummed

    recipe, out = tiny
    _extract(recipe, out)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    g = zarr.open_group(str(old), mode="r+", use_consolidated=False)
    for name, arr in list(g["teachers"].arrays()):
        data = arr[:]
        g["teachers"].create_array(name, shape=arr.shape, chunks=arr.chunks, shards=arr.shards, dtype=arr.dtype,
                                   fill_value=arr.fill_value, dimension_names=arr.metadata.dimension_names,
                                   attributes=dict(arr.attrs), overwrite=True,
                                   compressors=checksummed(BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")))[:] = data
    zarr.consolidate_metadata(str(old))
    new_arr, old_arr = (zarr.open_group(str(p), mode="r")["teachers/effnet_lite0"] for p in (out, old))
    assert [type(c).__name__ for c in new_arr.compressors] == ["Crc32cCodec"]
    assert [type(c).__name__ for c in old_arr.compressors] == ["BloscCodec", "Crc32cCodec"]
    a, b = FeatureCache.open(out).reader(), FeatureCache.open(old).reader()
    for i in range(2):
        for name, x in a.read(i, 1).items():
            assert np.array_equal(x, b.read(i, 1)[name])
        assert b.read(i, 1, as_stored=True)["effnet_lite0"].dtype == np.float16


def test_int8_storage_is_close_and_smaller(tiny, tmp_path):
    recipe, out = tiny
    _extract(recipe, out)
    _extract(recipe, tmp_path / "int8", sets=("teachers.storage=int8",))
    a, b = FeatureCache.open(out), FeatureCache.open(tmp_path / "int8")
    for i in range(2):
        x, y = a.reader().read(i, 0)["effnet_lite0"], b.reader().read(i, 0)["effnet_lite0"]
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)
        assert cos[np.linalg.norm(x, axis=-1) > 0].min() > 0.999
    assert b.bytes_stored("effnet_lite0") < 0.7 * a.bytes_stored("effnet_lite0")


def test_rerun_skips_every_shard_and_changes_nothing(tiny):
    recipe, out = tiny
    first, *_ = _extract(recipe, out)
    before = _arrays(out)
    again, *_ = _extract(recipe, out)
    assert first.shards_done == 3 and again.shards_done == 0 and again.shards_skipped == 3
    assert again.samples == 0
    for name, value in _arrays(out).items():
        assert np.array_equal(value, before[name])


def test_unwritten_samples_are_rejected_on_read(tiny):
    recipe, out = tiny
    _extract(recipe, out, shard_index=0, num_shards=2)
    cache = FeatureCache.open(out)
    assert cache.missing_shards() == [1] and not cache.attrs["complete"]
    cache.reader().read(0, 0)
    from rsmtdf.errors import RsmtdfError

    with pytest.raises(RsmtdfError, match="sample 2 .* view 0"):
        cache.reader().read(2, 0)


def _cli_extract(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rsmtdf.cli", "extract-features", "-r", str(recipe), "-o", str(out),
            "--shard-samples", "1", "--workers", "0", *extra]


def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted(tmp_path, synthetic_root):
    splits = tmp_path / "splits"
    make_splits(open_dataset("loveda", synthetic_root), splits)
    recipe = write_recipe(tmp_path / "r.toml", synthetic_root, splits, views=6, crop=224, sizes="{}")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_cli(*_cli_extract(recipe, ref)[3:], check=True)

    proc = subprocess.Popen(_cli_extract(recipe, killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_dir = killed / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not (done_dir.is_dir() and any(done_dir.iterdir())):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = FeatureCache.open(killed)
    done = partial.done_flags()
    assert 0 < done.sum() < len(done), "the kill must land mid-extraction"
    assert not partial.attrs["complete"]

    out = run_cli(*_cli_extract(recipe, killed)[3:], check=True)  # the kill needed a process; the rerun does not
    assert f"skipped {int(done.sum())}" in out.stdout
    assert FeatureCache.open(killed).attrs["complete"]
    _assert_same_cache(ref, killed)


def test_two_workers_equal_one(tiny, tmp_path):
    recipe, out = tiny
    run_cli(*_cli_extract(recipe, out)[3:], check=True)
    two = tmp_path / "two"
    procs = [subprocess.Popen(_cli_extract(recipe, two, "--num-shards", "2", "--shard-index", str(k)), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()[-2000:]
    cache = FeatureCache.open(two)
    if not cache.attrs["complete"]:  # both finished at once: either may finalize; a re-run always does
        run_cli(*_cli_extract(recipe, two)[3:], check=True)
    _assert_same_cache(out, two)


def test_shard_defaults_come_from_torchrun_env(tiny):
    recipe, out = tiny
    proc = run_cli(*_cli_extract(recipe, out)[3:], env={"RANK": "1", "WORLD_SIZE": "2"}, check=True)
    assert "incomplete" in proc.stdout
    assert FeatureCache.open(out).missing_shards() == [0, 2, 4]


def test_inspect_table_and_estimate_within_5_percent(tiny):
    recipe, out = tiny
    run_cli(*_cli_extract(recipe, out)[3:], check=True)
    table = run_cli("inspect", out, check=True).stdout
    cache = FeatureCache.open(out)
    assert "state     complete" in table and "loveda: 6 samples" in table
    assert re.search(r"effnet_lite0\s+tf_efficientnet_lite0 L3 @64\s+\(6, 2, 16, 112\)\s+float16", table)
    assert "2 per sample, crop 56" in table
    assert "classes   7: background, building, road" in table
    assert re.search(r"input     bands \[0, 1, 2\] of uint8 data", table), table
    est = run_cli("inspect", "--estimate", "-r", recipe, check=True).stdout
    predicted = _parse_bytes(re.search(r"on disk\s+([\d.]+ \w+)", est).group(1))
    real = sum(cache.bytes_stored(t["name"]) for t in cache.attrs["teachers"])
    assert abs(predicted - real) / real < 0.05, (predicted, real)
    raw = _parse_bytes(re.search(r"raw\s+([\d.]+ \w+)", est).group(1))
    assert abs(raw - 6 * 2 * 16 * 112 * 2) / raw < 0.01
    from rsmtdf.data.tilecache import sample_bytes

    ds = open_dataset("loveda", load_recipe(recipe).data.root)
    decoded = _parse_bytes(re.search(r"decoded\s+([\d.]+ \w+)", est).group(1))  # every tile decoded in memory
    want = sum(sample_bytes(ds.load(ds.index(i))) for i in ds.ids_in("train"))
    assert abs(decoded - want) / want < 0.05, (decoded, want)
    # each storage kind at the recipe's teacher (16 tokens × 112 channels): float16 2·C, pca C/2 per token
    assert re.search(r"float16 ← the recipe's\s+0.00 MB \(3,584 B\)\s+0.0 GB", est), est
    assert re.search(r"pca \(a quarter of float16\)\s+0.00 MB \(896 B\)", est), est
    assert "step      not predicted" in est and "student's patch 14 does not divide" in est, est  # 64 px
    at_crop = run_cli("inspect", "--estimate", "-r", recipe, "--probe", "1", "--set",
                      "teachers.sizes={ effnet_lite0 = 56 }", check=True).stdout  # 56 px: a step the student trains
    assert re.search(r"pca \(a quarter of float16\)\s+0.00 MB \(\d+ B\)\s+0.0 GB\s+[\d.]+ GB/s", at_crop), at_crop
    assert re.search(r"step\s+[\d.]+ ms per GPU \(predicted: [\d.]+ TFLOP at 30%", at_crop), at_crop


def test_estimate_per_kind_at_the_paper_shapes_for_loveda():
    """`inspect --estimate`'s lines per storage kind for LoveDA's recipe (DINOv2-B@518 1369×768 +
    CLIP-L@224 256×1024 per (tile, view), 10,088 training tiles × 8 views) and the reads per GPU at
    the step predicted for its student (`inspect.step`, shared with `bench feed`: 7.32 TFLOP, 24.7 ms
    at 30 % of the H200's bf16 peak), each against the arithmetic written out here."""
    from rsmtdf.cache.format import TeacherLayout
    from rsmtdf.inspect.compact import storage_estimate
    from rsmtdf.inspect.step import StepModel
    from rsmtdf.models.student import TeacherSlot

    recipe = load_recipe(ROOT / "pipeline" / "loveda.toml")
    slots = [TeacherSlot("dinov2_vitb14", 768, 37, 518), TeacherSlot("clip_vitl14", 1024, 16, 224)]
    step = StepModel.of_recipe(recipe, 7, slots).predicted()
    assert step["step_s"] == pytest.approx(0.0247, rel=0.01) and step["flops"] == pytest.approx(7.32e12, rel=0.01)
    layouts = [TeacherLayout("dinov2_vitb14", 1369, 768), TeacherLayout("clip_vitl14", 256, 1024)]
    text = "\n".join(storage_estimate(layouts, recipe.views.count, 10_088, recipe.teachers.storage, 16, step,
                                     recipe.train.batch_size))
    want = {"float16 ← the recipe's": (1369 * 768 * 2 + 256 * 1024 * 2, "2.63 MB", "212.0 GB"),
            "int8 (per-token scale)": (1369 * (768 + 2) + 256 * (1024 + 2), "1.32 MB", "106.3 GB"),
            "int4 (groups of 16)": (1369 * (384 + 96) + 256 * (512 + 128), "0.82 MB", "66.3 GB"),
            "pca (a quarter of float16)": (1369 * 384 + 256 * 512, "0.66 MB", "53.0 GB")}
    for label, (b, mb, gb) in want.items():
        line = next(t for t in text.splitlines() if t.strip().startswith(label))
        assert f"{mb} ({b:,} B)" in line and gb in line and f"{10_088 * 8 * b / 1e9:.1f} GB" in line, line
        assert f"{2 * 8 * b / step['step_s'] / 1e9:.2f} GB/s" in line, line  # 8 + 8 (tile, view)s per step
    assert want["pca (a quarter of float16)"][0] == 656_768 <= 660_000
    assert "24.7 ms per GPU" in text and "16 (tile, view) targets read per step" in text


def test_inspect_reports_missing_shards(tiny):
    recipe, out = tiny
    run_cli(*_cli_extract(recipe, out, "--num-shards", "3", "--shard-index", "0")[3:], check=True)
    table = run_cli("inspect", out, check=True).stdout
    assert "INCOMPLETE: 4 of 6 shards missing [1, 2, 4, 5]" in table


def _parse_bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def test_show_writes_png_with_teacher_grid_panels(tiny, tmp_path):
    recipe, out = tiny
    _extract(recipe, out)
    sid = FeatureCache.open(out).ids[0]
    png = tmp_path / "show.png"
    run_cli("show", out, "--sample", sid, "--out", png, check=True)
    from rsmtdf.inspect.show import render_sample

    layout = render_sample(FeatureCache.open(out), sid, tmp_path / "again.png")
    panel = layout["panels"]["effnet_lite0"]
    assert panel["grid"] == 4
    img = np.array(Image.open(png).convert("RGB"))
    f, g = panel["factor"], panel["grid"]
    x0, y0 = panel["boxes"][0]
    cut = img[y0 : y0 + g * f, x0 : x0 + g * f]
    assert np.array_equal(np.repeat(np.repeat(cut[::f, ::f], f, 0), f, 1), cut)


def test_fsspec_url_output(tiny):
    """A cache written to an fsspec URL (in-memory filesystem here; s3:// etc. work the same)."""
    recipe, out = tiny
    summary, *_ = _extract(recipe, "memory://rsmtdf-test/cache")
    assert summary.missing == [] and summary.shards_done == 3
    cache = FeatureCache.open("memory://rsmtdf-test/cache")
    assert cache.attrs["complete"] and len(cache.ids) == 6
    _extract(recipe, out)
    local = FeatureCache.open(out)
    for i in range(6):
        assert np.array_equal(cache.reader().read(i, 1)["effnet_lite0"], local.reader().read(i, 1)["effnet_lite0"])
    again, *_ = _extract(recipe, "memory://rsmtdf-test/cache")
    assert again.shards_skipped == 3


def test_a_batch_read_through_zarr_has_all_its_chunks_in_flight_at_once(tmp_path, monkeypatch):
    """Stores without the direct shard-file path (object storage, other codecs) read a batch's
    chunks concurrently through zarr's async API: the batch waits about one round trip, not one per
    chunk. The store here sees every chunk request in flight together, and the values are zarr's."""
    import asyncio

    import rsmtdf.cache.reader as reader_mod
    from rsmtdf.bench.feed import _targets_store
    from rsmtdf.cache import CacheReader

    class InFlight(zarr.storage.WrapperStore):
        now = peak = 0

        async def get(self, key, prototype, byte_range=None):
            InFlight.now += 1
            InFlight.peak = max(InFlight.peak, InFlight.now)
            try:
                await asyncio.sleep(0.01)  # a round trip
                return await super().get(key, prototype, byte_range)
            finally:
                InFlight.now -= 1

    shapes = {"t1": (9, 8, 28), "t2": (4, 16, 28)}
    url = _targets_store(tmp_path / "c.zarr", 6, 2, shapes, None, 3)
    monkeypatch.setattr(reader_mod, "open_store", lambda u, read_only: InFlight(zarr.storage.LocalStore(u, read_only=True)))
    pairs = [(i, i % 2) for i in range(6)]
    rows = CacheReader(url, list(shapes), "float16", [str(i) for i in range(6)]).read_batch(pairs, as_stored=True)
    group = zarr.open_group(url, mode="r")
    for (i, a), row in zip(pairs, rows):
        for name in shapes:
            assert np.array_equal(row[name], group[f"teachers/{name}"][i, a])
    assert InFlight.peak >= len(pairs) * len(shapes), InFlight.peak
