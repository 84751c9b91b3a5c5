"""Class tables in the codes people have, and split lists that can train.

Generated 64² GeoTIFF scenes in the folder layout: a 0/255 road mask (refused without a code table,
trained with one), an undeclared code, colour masks, ignored codes; `make-splits` counting class
pixels, refusing a labeled list without a class, holding out whole scenes with --val-fraction; two
folder recipes with their own default paths; band indices checked when the recipe is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli, tiny_student
from test_errors import error_line
from typer.testing import CliRunner

from rsmtdf.cli import app
from rsmtdf.transforms.pixels import IGNORE
from rsmtdf.data.classes import LOVEDA
from rsmtdf.cache import FeatureCache
from rsmtdf.pipeline.resolve import cache_dataset, class_table, default_cache, resolve_dataset
from rsmtdf.data.datasets import open_dataset
from rsmtdf.errors import RsmtdfError
from rsmtdf.config.recipe import load_recipe
from rsmtdf.data.splits import read_list

SIZE = 64
STUDENT = """
[views]
count = 1
crop_size = 56
[teachers]
names = ["effnet_lite0"]
sizes = { effnet_lite0 = 56 }
""" + tiny_student(32, lr=1e-4, eval_every=1000)


def write_tif(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype) as dst:
        dst.write(array)
    return path


def road_scenes(root: Path, n: int = 4, road: int = 255) -> Path:
    """n scenes with a horizontal road (mask code `road`) at a different height on background 0."""
    rng = np.random.default_rng(0)
    for k in range(n):
        write_tif(root / "images" / f"s{k}.tif", rng.integers(0, 255, (3, SIZE, SIZE), dtype=np.uint8))
        mask = np.zeros((1, SIZE, SIZE), np.uint8)
        mask[0, 8 * k + 4 : 8 * k + 12] = road
        write_tif(root / "masks" / f"s{k}.tif", mask)
    return root


def recipe_file(path: Path, root: Path, data: str, splits: Path | None = None) -> Path:
    where = f'splits = "{splits}"\n' if splits else ""
    path.write_text(f'[data]\ndataset = "folder"\nroot = "{root}"\n{where}{data}\n{STUDENT}')
    return path


def cli(*args) -> tuple[int, str]:
    """In-process run of a command expected to succeed: (exit code, output and any exception)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + ("" if result.exception is None else repr(result.exception))


def test_a_0_255_mask_without_a_code_table_is_refused_naming_the_code_and_its_pixels(tmp_path):
    root = road_scenes(tmp_path / "roads")
    ds = open_dataset("folder", root, ["background", "road"])
    with pytest.raises(RsmtdfError, match=r"s0\.tif: mask code 255 \(512 px\) is neither a class nor ignored") as e:
        ds.load(0)
    assert "background = 0, road = 1" in str(e.value) and "[data] codes" in str(e.value)
    recipe = recipe_file(tmp_path / "roads.toml", root, 'classes = ["background", "road"]', tmp_path / "splits")
    error_line(run_cli("make-splits", "-r", recipe, "--val-fraction", "0.25"), "roads/masks/s", "mask code 255 (512 px)")
    assert not (tmp_path / "splits").exists()  # a refused split writes nothing


def test_with_codes_road_pixels_are_counted_and_the_model_trains(tmp_path):
    root = road_scenes(tmp_path / "roads")
    splits = tmp_path / "splits"
    recipe = recipe_file(tmp_path / "roads.toml", root,
                         'classes = ["background", "road"]\ncodes = { background = 0, road = 255 }', splits)
    ds = resolve_dataset(load_recipe(recipe))
    assert (ds.load(0).mask == 1).sum() == 8 * SIZE
    code, out = cli("make-splits", "-r", recipe, "--val-fraction", "0.25")
    assert code == 0, out
    counts = json.loads((splits / "class_counts.json").read_text())
    labeled = counts["pixels"]["10pct/labeled.txt"]
    assert counts["classes"] == ["background", "road"] and labeled[1] > 0 and sum(labeled) % (SIZE * SIZE) == 0
    assert "labeled pixels per class" in out and "road" in out
    code, out = cli("extract-features", "-r", recipe, "-o", tmp_path / "cache", "--workers", "0", "--device", "cpu")
    assert code == 0, out
    code, out = cli("train", "--cache", tmp_path / "cache", "--split", "10pct", "-r", recipe,
                    "--run-dir", tmp_path / "run", "--max-steps", "2")
    assert code == 0, out
    # the cache keeps its table: reopened from its identity, road is still class 1
    again = cache_dataset(FeatureCache.open(tmp_path / "cache"))
    assert (again.load(0).mask == 1).sum() == 8 * SIZE
    # a recipe that reads the masks otherwise (255 ignored, not road) may not train from this cache
    other = recipe_file(tmp_path / "other.toml", root, 'classes = ["background", "road"]\n'
                        'codes = { background = 0, road = 1 }\nignore_codes = [255]', splits)
    error_line(run_cli("train", "--cache", tmp_path / "cache", "--split", "10pct", "-r", other,
                       "--run-dir", tmp_path / "run2", "--max-steps", "2"),
               "cache", "dataset.classes.codes[1] is nothing (refused) in the cache, 'road' in", "(and 1 more",
               "other.toml")
    assert not (tmp_path / "run2" / "best.pt").exists()


def test_an_undeclared_code_is_refused_naming_it_and_ignore_codes_become_ignore(tmp_path):
    root = road_scenes(tmp_path / "roads", n=1, road=1)
    mask = np.zeros((1, SIZE, SIZE), np.uint8)
    mask[0, :3] = 9
    mask[0, 3:5] = 200
    write_tif(root / "masks" / "s0.tif", mask)
    data = load_recipe(recipe_file(tmp_path / "r.toml", root, 'classes = ["a", "b"]\ncodes = { a = 0, b = [1, 2] }'))
    with pytest.raises(RsmtdfError, match=r"mask codes 9 \(192 px\), 200 \(128 px\) are neither a class nor ignored"):
        resolve_dataset(data).load(0)
    data = load_recipe(recipe_file(tmp_path / "r.toml", root, 'classes = ["a", "b"]\ncodes = { a = 0, b = [1, 2] }\n'
                                   "ignore_codes = [9, 200]"))
    decoded = resolve_dataset(data).load(0).mask
    assert (decoded[:5] == IGNORE).all() and (decoded[5:] == 0).all()


def test_colour_masks_with_a_colour_table(tmp_path):
    root = tmp_path / "colours"
    write_tif(root / "images" / "c.tif", np.zeros((3, SIZE, SIZE), np.uint8))
    rgb = np.zeros((3, SIZE, SIZE), np.uint8)
    rgb[:, : SIZE // 2] = np.array([255, 0, 0], np.uint8)[:, None, None]
    write_tif(root / "masks" / "c.tif", rgb)
    data = load_recipe(recipe_file(tmp_path / "r.toml", root, 'classes = ["ground", "roof"]\n'
                                   "colors = { ground = [0, 0, 0], roof = [255, 0, 0] }"))
    decoded = resolve_dataset(data).load(0).mask
    assert (decoded[: SIZE // 2] == 1).all() and (decoded[SIZE // 2 :] == 0).all()
    data = load_recipe(recipe_file(tmp_path / "r.toml", root, 'classes = ["ground", "roof"]\n'
                                   "colors = { ground = [0, 0, 0], roof = [0, 0, 255] }"))
    with pytest.raises(RsmtdfError, match=r"mask colour #ff0000 \(2 048 px\) is neither a class nor ignored"):
        resolve_dataset(data).load(0)


@pytest.mark.parametrize("data, key, says", [
    ('classes = ["a", "b"]\ncodes = { a = 0, c = 1 }', "[data] codes", "'c' is not a class"),
    ('classes = ["a", "b"]\ncodes = { a = 0, b = [0, 1] }', "[data] codes", "code 0 is given to both 'a' and 'b'"),
    ('classes = ["a", "b"]\ncodes = { a = 0 }', "[data] codes", "class 'b' has no code or colour"),
    ('classes = ["a", "b"]\ncodes = { a = 0, b = 1 }\nignore_codes = [1]', "[data] ignore_codes", "also class 'b'"),
    ('classes = ["a", "b"]\npalette = { a = "red" }', "[data] palette", '"#rrggbb"'),
    ('classes = ["a", "b"]\ncolors = { a = [0, 0, 300], b = [1, 1, 1] }', "[data] colors", "0..255"),
])
def test_class_table_keys_are_checked_when_the_recipe_is_read(tmp_path, data, key, says):
    recipe = recipe_file(tmp_path / "r.toml", tmp_path, data)
    error_line(run_cli("recipe", "show", "-r", recipe), str(recipe), key, says)


def test_known_datasets_keep_their_tables_and_take_a_palette(tmp_path):
    recipe = tmp_path / "l.toml"
    recipe.write_text('[data]\ndataset = "loveda"\npalette = { road = "#102030" }\n')
    table = class_table(load_recipe(recipe).data)
    assert table.codes == LOVEDA.codes and table.names == LOVEDA.names
    assert table.colours()[2].tolist() == [16, 32, 48] and table.colours()[1].tolist() == [255, 0, 0]
    recipe.write_text('[data]\ndataset = "loveda"\ncodes = { road = 3 }\n')
    error_line(run_cli("recipe", "show", "-r", recipe), "[data] codes", "has its own class table")


def test_make_splits_refuses_a_labeled_list_missing_a_class_unless_allowed(tmp_path):
    root = road_scenes(tmp_path / "roads")
    splits = tmp_path / "splits"
    recipe = recipe_file(tmp_path / "r.toml", root,
                         'classes = ["background", "road", "water"]\ncodes = { background = 0, road = 255, water = 3 }',
                         splits)
    error_line(run_cli("make-splits", "-r", recipe, "--val-fraction", "0.25"), str(splits / "1pct" / "labeled.txt"),
              "'water' never occurs", "--allow-missing-classes")
    assert not splits.exists()
    code, out = cli("make-splits", "-r", recipe, "--val-fraction", "0.25", "--allow-missing-classes")
    assert code == 0, out
    assert json.loads((splits / "class_counts.json").read_text())["pixels"]["10pct/labeled.txt"][2] == 0


def test_no_validation_images_is_refused_with_the_hint_and_val_fraction_holds_out_whole_scenes(tmp_path):
    root = road_scenes(tmp_path / "roads", n=5)
    splits = tmp_path / "splits"
    recipe = recipe_file(tmp_path / "r.toml", root, 'classes = ["background", "road"]\n'
                         "codes = { background = 0, road = 255 }\ntile_size = 32", splits)
    error_line(run_cli("make-splits", "-r", recipe), "no validation images", "--val-fraction")
    code, out = cli("make-splits", "-r", recipe, "--val-fraction", "0.4", "--allow-missing-classes")
    assert code == 0, out
    scene = lambda sid: sid.split("@")[0]  # noqa: E731
    held = {scene(s) for s in read_list(splits, "val") + read_list(splits, "test")}
    trained = {scene(s) for s in read_list(splits, "10pct/labeled") + read_list(splits, "10pct/unlabeled")}
    assert len(held) == 2 and not held & trained and len(trained) == 3  # 2 of 5 scenes, every tile of them
    assert len(read_list(splits, "val")) + len(read_list(splits, "test")) == 2 * 4


def test_two_folder_recipes_get_their_own_default_split_and_cache_paths(tmp_path):
    first = recipe_file(tmp_path / "orchards.toml", tmp_path, 'classes = ["a", "b"]')
    second = recipe_file(tmp_path / "vineyards.toml", tmp_path, 'classes = ["a", "b"]')
    recipes = [load_recipe(r) for r in (first, second)]
    assert [r.data.splits for r in recipes] == ["pipeline/splits/orchards", "pipeline/splits/vineyards"]
    assert [default_cache(r) for r in recipes] == ["cache/orchards", "cache/vineyards"]
    assert load_recipe("pipeline/loveda.toml").data.splits == "pipeline/splits/loveda"


@pytest.mark.parametrize("command", ["make-splits", "extract-features"])
def test_a_band_index_outside_the_raster_is_refused_before_any_work(tmp_path, command):
    root = road_scenes(tmp_path / "roads", n=2)
    recipe = recipe_file(tmp_path / "r.toml", root, 'classes = ["background", "road"]\n'
                         "codes = { background = 0, road = 255 }\nbands = [0, 1, 5]", tmp_path / "splits")
    extra = ["--val-fraction", "0.5"] if command == "make-splits" else ["-o", tmp_path / "cache"]
    error_line(run_cli(command, "-r", recipe, *extra), "bands", "s0.tif", "has 3 bands")
    assert not (tmp_path / "splits").exists() and not (tmp_path / "cache").exists()
