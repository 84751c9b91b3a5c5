"""One identity: what a cache or model was made from is resolved once, recorded, and compared field by
field wherever it is read back. Each test here is a disagreement the release before the identity type
let through (train ignoring `[views]`, `[teachers] sizes`, `data.root` and the teachers' normalisation;
evaluate not re-checking split lists; statistics changing unnoticed; the API and the CLI making
different caches; evaluate and predict at different precisions), or a bad input it met with a
traceback or a silent fix (a device the machine lacks, ±inf pixels, a run folder left behind)."""

from __future__ import annotations

import hashlib
import json
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import zarr
from conftest import run_cli, train_cli, write_recipe
from PIL import Image
from test_errors import error_line, tree_hashes

from rsmtdf.errors import RsmtdfError


@pytest.fixture(scope="module")
def trained(student_cache, tmp_path_factory) -> Path:
    """latest.pt of one training step from the shared cache."""
    run = tmp_path_factory.mktemp("identity-run") / "run"
    run_cli(*train_cli(student_cache, run, "--max-steps", "1"), check=True)
    return run / "latest.pt"


def _copy_cache(student_cache, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shared cache and of its split lists, to change without touching the originals."""
    _, cache, tmp = student_cache
    shutil.copytree(cache, tmp_path / "cache")
    shutil.copytree(tmp / "splits", tmp_path / "splits")
    return tmp_path / "cache", tmp_path / "splits"


def _edit_attrs(cache: Path, edit) -> None:
    meta = json.loads((cache / "zarr.json").read_text())
    edit(meta["attributes"])
    (cache / "zarr.json").write_text(json.dumps(meta))


# ---- train compares the recipe's identity with the cache's ------------------------------------------------


@pytest.mark.parametrize("sets, says", [
    (["views.count=3"], "views.count is 2 in the cache, 3 in --set views.count=3"),
    (["views.scale_range=[0.75, 1.5]"], "views.scale_range is [0.5, 2] in the cache, [0.75, 1.5] in --set"),
    (["views.seed=5"], "views.seed is 0 in the cache, 5 in --set views.seed=5"),
    (["views.hflip=false"], "views.hflip is true in the cache, false in --set views.hflip=false"),
    (["teachers.sizes={ effnet_lite0 = 56, effnet_lite1 = 42 }"],
     "teachers.effnet_lite1.input_size is 28 in the cache, 42 in --set teachers.sizes="),
])
def test_train_refuses_a_recipe_whose_views_or_teacher_sizes_differ_naming_the_field(student_cache, tmp_path, sets,
                                                                                       says):
    args = train_cli(student_cache, tmp_path / "run", "--max-steps", "1")
    error_line(run_cli(*args, *[a for s in sets for a in ("--set", s)]), str(student_cache[1]), says)
    assert not (tmp_path / "run").exists()


def test_train_takes_the_data_from_another_root_when_its_samples_are_the_cache_s(student_cache, synthetic_root,
                                                                                 tmp_path):
    """Data moves between machines: the recipe's root is used, and must hold the cache's samples."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(synthetic_root, moved)
    run_cli(*train_cli(student_cache, tmp_path / "run", "--max-steps", "1", "--set", f"data.root={moved}"), check=True)
    recorded = json.loads((tmp_path / "run" / "recipe.toml").read_text().split("root = ")[1].split("\n")[0])
    assert recorded == str(moved)
    for png in (moved / "Train" / "Rural" / "images_png").glob("*.png"):  # fewer scenes: other samples
        png.unlink()
        (moved / "Train" / "Rural" / "masks_png" / png.name).unlink()
        break
    line = error_line(run_cli(*train_cli(student_cache, tmp_path / "run2", "--set", f"data.root={moved}")),
                      str(student_cache[1]), "dataset.ids_sha256 is", f"at {moved}) in --set data.root=")
    assert str(synthetic_root) in line  # where the cache's samples were found


def test_a_teacher_normalisation_other_than_the_cache_s_is_refused(student_cache, tmp_path):
    """A cache whose teacher was fed other statistics (an older registry, a hand edit) is another cache:
    training and a resumed extraction refuse it, naming the field."""
    recipe = student_cache[0]
    cache, splits = _copy_cache(student_cache, tmp_path)

    def renormalise(attrs):
        attrs["teachers"][0]["mean"] = [0.485, 0.456, 0.406]
    _edit_attrs(cache, renormalise)
    before = tree_hashes(cache)
    sets = ("--set", f"data.splits={splits}")
    error_line(run_cli("train", "--cache", cache, "--split", "10pct", "-r", recipe, "--run-dir", tmp_path / "r", *sets),
               str(cache), "teachers.effnet_lite0.mean is [0.485, 0.456, 0.406] in the cache, [0.5, 0.5, 0.5] in")
    error_line(run_cli("extract-features", "-r", recipe, "-o", cache, "--workers", "0", *sets), str(cache),
               "holds a different cache: teachers.effnet_lite0.mean")
    assert tree_hashes(cache) == before


# ---- everything checked before anything is written -------------------------------------------------------


@pytest.mark.parametrize("device, says", [("cuda:7", "--device cuda:7: this machine has"), ("bogus", "not a device")])
def test_a_device_the_machine_lacks_is_one_line_and_writes_nothing(student_cache, tmp_path, device, says):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    recipe = student_cache[0]
    error_line(run_cli("extract-features", "-r", recipe, "-o", tmp_path / "cache", "--device", device), says)
    error_line(run_cli(*train_cli(student_cache, tmp_path / "run", "--device", device)), says)
    assert sorted(tmp_path.iterdir()) == []


def test_a_cache_with_no_shard_written_does_not_pin_its_device(student_cache, tmp_path):
    """A run that made the cache and wrote no shard (it stopped, say, on a device it could not use)
    recorded its device; a rerun elsewhere takes the cache over instead of refusing it."""
    from rsmtdf.cache import FeatureCache
    from rsmtdf.cache.format import TeacherLayout
    from rsmtdf.config.recipe import load_recipe
    from rsmtdf.pipeline.resolve import resolve

    recipe = student_cache[0]
    resolved = resolve(load_recipe(recipe))
    teachers = resolved.teachers()
    layouts = [TeacherLayout(t.name, t.num_tokens, t.dim) for t in teachers]
    FeatureCache.create(str(tmp_path / "cache"), resolved.dataset.ids_in("train"), resolved.built(teachers),
                        {"compute": {"device": "cuda", "batch_size": 8}, "recipe": resolved.recipe.to_toml()},
                        layouts, shard_samples=4)
    out = run_cli("extract-features", "-r", recipe, "-o", tmp_path / "cache", "--workers", "0", "--shard-samples", "4",
                  check=True).stdout
    assert "cache complete" in out
    assert FeatureCache.open(tmp_path / "cache").attrs["compute"] == {"device": "cpu", "batch_size": 8}


def test_infinite_pixels_are_nodata_like_nan(tmp_path):
    """float32 rasters: ±inf (an overflow, a sensor's flag) is no data, as NaN is: masked, filled, ignored,
    never clipped to full or no brightness."""
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.transforms.pixels import IGNORE, NODATA_FILL, to_unit_rgb, unit_pixels

    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    image = np.full((3, 8, 8), 0.25, np.float32)
    image[:, 0, 0], image[1, 0, 1], image[:, 0, 2] = np.inf, -np.inf, np.nan
    with rasterio.open(tmp_path / "images" / "a.tif", "w", driver="GTiff", width=8, height=8, count=3,
                       dtype="float32") as dst:
        dst.write(image)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "masks" / "a.png")
    sample = open_dataset("folder", tmp_path, ["a", "b"]).load(0)
    assert sample.valid is not None and not sample.valid[0, :3].any() and sample.valid[0, 3:].all()
    assert (sample.mask[0, :3] == IGNORE).all() and (sample.mask[1] == 1).all()
    pixels = np.moveaxis(image, 0, -1)
    for valid in (None, sample.valid):  # masked by the reader, and without its validity too
        unit = to_unit_rgb(pixels, valid=valid)
        np.testing.assert_array_equal(unit[0, :3], np.tile(np.float32(NODATA_FILL), (3, 1)))
        assert (unit[1:] == 0.25).all()
        device = unit_pixels(torch.from_numpy(pixels), valid=None if valid is None else torch.from_numpy(valid))
        assert torch.equal(device, torch.from_numpy(unit))


def test_a_run_refused_for_a_damaged_cache_leaves_its_run_folder_as_it_was(student_cache, tmp_path):
    recipe = student_cache[0]
    cache, splits = _copy_cache(student_cache, tmp_path)
    for shard in sorted((cache / "teachers").glob("*/c/**/*")):
        if shard.is_file():
            data = bytearray(shard.read_bytes())
            data[: len(data) - 1024] = bytes(b ^ 0xFF for b in data[: len(data) - 1024])  # the chunks, not the index
            shard.write_bytes(bytes(data))
    run = tmp_path / "run"
    args = ["train", "--split", "10pct", "-r", recipe, "--run-dir", run, "--max-steps", "1", "--set", f"data.splits={splits}"]
    error_line(run_cli(*args, "--cache", cache), str(cache), "damaged chunk")
    assert not (run / "metrics.jsonl").exists() and not (run / "latest.pt").exists()
    run_cli(*args, "--cache", student_cache[1], check=True)  # the same folder takes the run once the cache is sound
    assert (run / "latest.pt").is_file()


# ---- class tables, bands, datasets ---------------------------------------------------------------------


def test_one_default_class_table_for_a_folder_and_the_255_hint(tmp_path):
    """The folder dataset's default table (codes 0..K-1, nothing else) is the same whether it comes
    from a recipe or from class names; a 255 in the masks is refused with the likely fix."""
    from rsmtdf.config.recipe import load_recipe
    from rsmtdf.data.classes import folder_classes
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.pipeline.resolve import class_table

    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[0] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    recipe = write_recipe(tmp_path / "r.toml", tmp_path, tmp_path / "splits", dataset="folder",
                          data='classes = ["land", "water"]')
    from_recipe, from_names = class_table(load_recipe(recipe).data), open_dataset("folder", tmp_path, ["land", "water"]).classes
    assert from_recipe.codes == from_names.codes == folder_classes(("land", "water")).codes == {0: 0, 1: 1}
    with pytest.raises(RsmtdfError, match=r"mask code 255 \(8 px\).*add ignore_codes = \[255\] to \[data\]"):
        open_dataset("folder", tmp_path, ["land", "water"]).load(0)


def test_a_one_band_recipe_refusal_suggests_grey(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", tmp_path, tmp_path / "splits", dataset="folder",
                          data='classes = ["a", "b"]\nbands = [0]')
    error_line(run_cli("recipe", "show", "-r", recipe), "[data] bands = [0]", "bands = [0, 0, 0]")


def test_a_folder_mixing_dtypes_is_refused_naming_both_rasters(tmp_path):
    """A dataset's pixels are scaled by one record: a uint8 scene beside a uint16 one would otherwise be
    divided by 65535 (the first record's range), nearly black."""
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    for name, dtype in (("a", np.uint16), ("b", np.uint8)):
        with rasterio.open(tmp_path / "images" / f"{name}.tif", "w", driver="GTiff", width=8, height=8, count=3,
                           dtype=np.dtype(dtype).name) as dst:
            dst.write(np.ones((3, 8, 8), dtype))
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    recipe = write_recipe(tmp_path / "r.toml", tmp_path, tmp_path / "splits", dataset="folder",
                          data='classes = ["a", "b"]')
    error_line(run_cli("make-splits", "-r", recipe, "--val-fraction", "0.5"), "b.tif: uint8 with 3 bands",
               "a.tif is uint16 with 3", "one dtype and band count")


def test_dataset_names_are_defined_once():
    from rsmtdf.config.recipe import DataConfig, DatasetName
    from rsmtdf.data.datasets import DATASETS

    assert typing.get_args(DatasetName) == tuple(DATASETS)
    assert typing.get_type_hints(DataConfig)["dataset"] is DatasetName


# ---- evaluate and the split lists; statistics ------------------------------------------------------------


def test_evaluate_refuses_split_lists_changed_since_the_cache_or_checkpoint(student_cache, trained, tmp_path):
    cache, splits = _copy_cache(student_cache, tmp_path)

    def moved(attrs):
        attrs["splits"]["dir"] = str(splits)
    _edit_attrs(cache, moved)
    args = ["evaluate", "--checkpoint", trained, "--split", "val", "--out", tmp_path / "m.json"]
    run_cli(*args, "--cache", cache, check=True)
    (splits / "val.txt").write_text((splits / "val.txt").read_text() + "Train/Rural/0_0\n")
    error_line(run_cli(*args, "--cache", cache), str(cache), "splits.sha256", f"(lists at {splits}) in the lists at")
    error_line(run_cli(*args, "--set", f"data.splits={splits}"), str(trained), "evaluated on other split lists")


def test_band_statistics_changed_after_extraction_are_refused(student_cache, tmp_path):
    recipe = student_cache[0]
    cache, splits = _copy_cache(student_cache, tmp_path)
    sets = ("--set", f"data.splits={splits}")
    run_cli("stats", "-r", recipe, *sets, "--no-progress", check=True)  # statistics appear beside the lists
    error_line(run_cli("train", "--cache", cache, "--split", "10pct", "-r", recipe, "--run-dir", tmp_path / "r", *sets),
               str(cache), "splits.stats_sha256 is none", "in the cache")
    stats = json.loads((splits / "band_stats.json").read_text())
    stats["ids_sha256"] = "0" * 64
    (splits / "band_stats.json").write_text(json.dumps(stats))
    error_line(run_cli("train", "--cache", cache, "--split", "10pct", "-r", recipe, "--run-dir", tmp_path / "r", *sets),
               "band_stats.json", "other tiles than the split lists", "run `rsmtdf stats` again")


# ---- one resolve layer --------------------------------------------------------------------------------


def test_the_api_and_the_cli_make_the_same_cache_from_one_recipe(student_cache, tmp_path):
    import rsmtdf

    recipe = student_cache[0]
    run_cli("extract-features", "-r", recipe, "-o", tmp_path / "cli", "--workers", "0", check=True)
    rsmtdf.extract_features(recipe, tmp_path / "api", workers=0, progress=False)
    attrs = [zarr.open_group(str(tmp_path / k), mode="r").attrs.asdict() for k in ("cli", "api")]
    assert attrs[0] == attrs[1] and "recipe" in attrs[0]
    assert tree_hashes(tmp_path / "cli") == tree_hashes(tmp_path / "api")


def test_evaluate_and_predict_run_at_one_precision(trained, synthetic_root, tmp_path, monkeypatch):
    """One inference policy: with CPU autocast switched on, both evaluation and mapping run the
    student under it; without, neither does."""
    import rsmtdf.models.student as student_mod
    from rsmtdf.evaluate.evaluator import evaluate_checkpoint
    from rsmtdf.predict.mapping import map_scenes

    seen: list[tuple[bool, torch.dtype]] = []
    forward = student_mod.Student.forward

    def spy(self, x):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, x)

    monkeypatch.setattr(student_mod.Student, "forward", spy)
    scene = sorted((synthetic_root / "Val").glob("*/images_png/*.png"))[0]
    for policy, expected in (({}, {(False, torch.get_autocast_dtype("cpu"))}), ({"cpu": torch.bfloat16},
                                                                                {(True, torch.bfloat16)})):
        monkeypatch.setattr(student_mod, "INFERENCE_AUTOCAST", policy)
        seen.clear()
        evaluate_checkpoint(trained, "val", device="cpu")
        evaluated = set(seen)
        seen.clear()
        map_scenes([str(scene)], trained, tmp_path / f"maps-{len(policy)}", device="cpu", echo=lambda line: None)
        assert evaluated == set(seen) == expected


def test_the_identity_refusal_names_its_field_and_both_values_in_one_place():
    """The comparison itself: nested records by path, may-differ fields skipped, unknown fields
    compared only where both sides know them."""
    from dataclasses import replace

    from rsmtdf.cache.identity import DatasetIdentity, Identity, SplitsIdentity, TeacherIdentity
    from rsmtdf.data.classes import LOVEDA
    from rsmtdf.transforms.views import ViewSpec

    teacher = TeacherIdentity("t", "timm", "m", 224, 3, False, (0.5,) * 3, (0.5,) * 3)
    a = Identity(DatasetIdentity("loveda", "a" * 64, LOVEDA, 512, 512, "/here"), SplitsIdentity("b" * 64, "none", "/x"),
                 ViewSpec(8, 518), (teacher,), "float16")
    moved = replace(a, dataset=replace(a.dataset, root="/there"), splits=replace(a.splits, dir="/y"),
                    teachers=(replace(teacher, grid=14, weights={"hub_repo": "elsewhere"}),))
    assert a.differences(moved) == []  # where the data and lists lie, weights' source, a grid not known on one side
    repainted = replace(a.dataset.classes, palette=((0, 0, 0),) * 7)
    assert a.differences(replace(a, dataset=replace(a.dataset, classes=repainted))) == []
    with pytest.raises(RsmtdfError) as e:
        a.require(replace(a, views=ViewSpec(4, 518)), "cache/x", "the cache", "pipeline/mine.toml")
    assert str(e.value) == "cache/x: views.count is 8 in the cache, 4 in pipeline/mine.toml"
    recoded = replace(a.dataset.classes, codes={**LOVEDA.codes, 0: 0})
    with pytest.raises(RsmtdfError, match=r"dataset.classes.codes\[0\] is ignore in the cache, 'background' in r"):
        a.require(replace(a, dataset=replace(a.dataset, classes=recoded)), "c", "the cache", "r")
    assert hashlib.sha256(json.dumps(a.record(), sort_keys=True).encode()).hexdigest() == \
        hashlib.sha256(json.dumps(Identity.from_record(a.record(), "x").record(), sort_keys=True).encode()).hexdigest()
