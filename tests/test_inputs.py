"""The bad-input sweep: every recipe value and command-line option is checked before any work
starts, and each bad one ends in one `error:` line naming the file or option, the key, the value
and what is allowed, with a non-zero exit, no traceback and nothing written. The real CLI (`main()`)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from conftest import model_identity, run_cli, write_recipe
from test_errors import error_line

from rsmtdf.data.datasets import DATASETS
from rsmtdf.models.student import DECODERS
from rsmtdf.config.recipe import DataConfig, Recipe, StudentConfig, load_recipe


@pytest.fixture(scope="module")
def base(tmp_path_factory, synthetic_root) -> tuple[Path, Path]:
    """(folder, recipe) of a valid tiny recipe over the generated scenes, with split lists."""
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.data.splits import make_splits

    work = tmp_path_factory.mktemp("inputs")
    make_splits(open_dataset("loveda", synthetic_root), work / "splits")
    return work, write_recipe(work / "recipe.toml", synthetic_root, work / "splits", sizes="{ effnet_lite0 = 56 }")


def _extract(recipe: Path, out: Path, *args: str):
    return run_cli("extract-features", "-r", recipe, "-o", out, "--workers", "0", "--device", "cpu", *args)


def _with(base_recipe: Path, path: Path, section: str, line: str) -> Path:
    """The base recipe with `line` added to (or replacing the same key in) [section]."""
    text, name = base_recipe.read_text(), line.split("=")[0].strip()
    kept = [ln for ln in text.splitlines() if not (ln.split("=")[0].strip() == name and "=" in ln)]
    out, placed = [], False
    for ln in kept:
        out.append(ln)
        if ln.strip() == f"[{section}]":
            out.append(line)
            placed = True
    if not placed:
        out += [f"[{section}]", line]
    path.write_text("\n".join(out) + "\n")
    return path


# ---- recipe values of the wrong type, range or name ----------------------------------------------------

RECIPE_CASES = [
    ("views", 'count = "four"', ['[views] count = "four"', "expected an integer >= 1"]),
    ("views", "count = 2.7", ["[views] count = 2.7", "expected an integer >= 1"]),
    ("views", "count = 0", ["[views] count = 0", "expected an integer >= 1"]),
    ("views", "crop_size = 224.9", ["[views] crop_size = 224.9", "expected an integer"]),
    ("views", "crop_size = 230", ["[views] crop_size = 230", "multiple of the student's patch 14"]),
    ("views", "scale_range = 0.5", ["[views] scale_range = 0.5", "expected a list of 2 numbers"]),
    ("views", "scale_range = [2.0, 0.5]", ["[views] scale_range = [2.0, 0.5]", "low <= high"]),
    ("views", "scale_range = [0.5, 1.0, 2.0]", ["scale_range", "a list of 2 numbers"]),
    ("views", 'hflip = "no"', ['[views] hflip = "no"', "expected true or false"]),
    ("views", "hflip = 0", ["[views] hflip = 0", "expected true or false"]),
    ("views", "colour = 1", ["[views] colour", "unknown key", "crop_size"]),
    ("teachers", 'names = "effnet_lite0"', ['[teachers] names = "effnet_lite0"', "expected a list of strings"]),
    ("teachers", "names = []", ["[teachers] names = []", "non-empty"]),
    ("teachers", 'names = ["effnet_lite0", "effnet_lite0"]', ["names", "without repeats"]),
    ("teachers", 'names = ["dinov3"]', ["[teachers] names", "unknown teacher 'dinov3'", "effnet_lite0"]),
    ("teachers", 'storage = "float8"', ['[teachers] storage = "float8"', 'one of "float16", "int8", "int4", "pca", "auto"']),
    ("teachers", "group_size = 7", ["[teachers] group_size = 7", "even and >= 2"]),
    ("teachers", "min_cosine = 1.5", ["[teachers] min_cosine = 1.5", "in [0, 1]"]),
    ("teachers", "probe_samples = 0", ["[teachers] probe_samples = 0", ">= 1"]),
    ("teachers", "sizes = { effnet_lite0 = 0 }", ["[teachers] sizes", ">= 1"]),
    ("student", "fusion_weights = [0.8]", ["[student] fusion_weights = [0.8]", "a list of 2 numbers"]),
    ("student", 'decoder = "huge"', ['[student] decoder = "huge"', 'one of "small", "base"']),
    ("student", 'encoder = "no_such_net"', ['[student] encoder = "no_such_net"', "timm model name"]),
    ("train", "conf_thresh = 1.5", ["[train] conf_thresh = 1.5", "in [0, 1]"]),
    ("train", "ema_momentum = -0.1", ["[train] ema_momentum = -0.1", "in [0, 1]"]),
    ("train", 'distill_loss = "l1"', ['[train] distill_loss = "l1"', 'one of "mse", "cosine"']),
    ("train", "batch_size = 0", ["[train] batch_size = 0", ">= 1"]),
    ("train", "lr = -1e-4", ["[train] lr = -0.0001", "> 0"]),
    ("data", 'dataset = "landsat"', ['[data] dataset = "landsat"', '"loveda"', '"folder"']),
    ("data", "bands = [0, 1]", ["[data] bands = [0, 1]", "a list of 3 integers"]),
    ("data", "bands = [0, 1, -1]", ["[data] bands = [0, 1, -1]", "band indices >= 0"]),
    ("colours", "urban = 1", ["unknown recipe section [colours]", "train"]),
]


@pytest.mark.parametrize("section, line, needles", RECIPE_CASES, ids=[f"{s}.{ln}" for s, ln, _ in RECIPE_CASES])
def test_bad_recipe_value(base, tmp_path, section, line, needles):
    _, recipe = base
    bad = _with(recipe, tmp_path / "bad.toml", section, line)
    out = tmp_path / "cache"
    found = error_line(_extract(bad, out), str(bad), *needles)
    assert found.startswith(f"error: {bad}: ")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_not_toml_and_missing_recipe(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[views\ncount = 2\n")
    error_line(_extract(bad, tmp_path / "cache"), str(bad), "not valid TOML")
    error_line(_extract(tmp_path / "none.toml", tmp_path / "cache"), "none.toml", "recipe not found")
    assert not (tmp_path / "cache").exists()


def test_band_index_outside_the_raster_leaves_no_cache(base, tmp_path):
    _, recipe = base
    bad = _with(recipe, tmp_path / "bad.toml", "data", "bands = [0, 1, 5]")
    out = tmp_path / "cache"
    error_line(_extract(bad, out), str(bad), "[data] bands = [0, 1, 5]", "has 3 bands", "0 to 2")
    assert not out.exists() and not list(tmp_path.glob("cache*"))


# ---- command-line options that override a recipe key, and those that are no key ---------------------

EXTRACT_OPTIONS = [
    (["--views", "0"], ["--views 0: expected an integer >= 1"]),
    (["--views", "-2"], ["--views -2: expected an integer >= 1"]),
    (["--crop-size", "0"], ["--crop-size 0: expected an integer >= 1"]),
    (["--crop-size", "230"], ["--crop-size 230: expected a multiple of the student's patch 14", "e.g. 224"]),
    (["--shard-samples", "-3"], ["--shard-samples -3: expected an integer >= 1"]),
    (["--batch-size", "0"], ["--batch-size 0: expected an integer >= 1"]),
    (["--num-shards", "0"], ["--num-shards 0: expected an integer >= 1"]),
    (["--workers", "-1"], ["--workers -1: expected an integer >= 0"]),
    (["--teacher", "effnet_lite9"], ["--teacher", "unknown teacher 'effnet_lite9'"]),
    (["--storage", "float8"], ["--storage float8: expected one of \"float16\", \"int8\""]),
]


@pytest.mark.parametrize("args, needles", EXTRACT_OPTIONS, ids=[" ".join(a) for a, _ in EXTRACT_OPTIONS])
def test_bad_extract_option(base, tmp_path, args, needles):
    _, recipe = base
    out = tmp_path / "cache"
    error_line(_extract(recipe, out, *args), *needles)
    assert not out.exists()


TRAIN_OPTIONS = [
    (["--batch-size", "0"], ["--batch-size 0: expected an integer >= 1"]),
    (["--max-steps", "0"], ["--max-steps 0: expected an integer >= 1"]),
    (["--epochs", "-1"], ["--epochs -1: expected an integer >= 1"]),
    (["--lr", "0"], ["--lr 0.0: expected a number > 0"]),
    (["--workers", "-2"], ["--workers -2: expected an integer >= 0"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every -1: expected an integer >= 0"]),
    (["--resume", "--overwrite"], ["--resume --overwrite: choose one"]),
    (["--new-schedule"], ["--new-schedule: only with --resume"]),
    (["--teachers", "offline"], ["--teachers offline", "cached, online, online-strong"]),
]


@pytest.mark.parametrize("args, needles", TRAIN_OPTIONS, ids=[" ".join(a) for a, _ in TRAIN_OPTIONS])
def test_bad_train_option(base, tmp_path, args, needles):
    """Checked before the cache is even opened: the cache named here does not exist."""
    _, recipe = base
    run = tmp_path / "run"
    error_line(run_cli("train", "--cache", tmp_path / "no-cache", "--split", "10pct", "-r", recipe, "--run-dir", run,
                       "--teachers", "online", *args), *needles)
    assert not run.exists()


def test_bad_estimate_options(base, tmp_path):
    _, recipe = base
    error_line(run_cli("inspect", "--estimate", "-r", recipe, "--views", "0"), "--views 0")
    error_line(run_cli("inspect", "--estimate", "-r", recipe, "--probe", "0"), "--probe 0")


# ---- checkpoints -----------------------------------------------------------------------------------------


def test_checkpoint_whose_weights_do_not_fit_its_config(tmp_path):
    """A real checkpoint whose recorded config says translator_hidden 16 but whose weights are of a
    model with 32: one line, not the 94-line state-dict traceback."""
    from rsmtdf.models.checkpoint import save_checkpoint
    from rsmtdf.models.student import Student, TeacherSlot

    slot = TeacherSlot("effnet_lite0", dim=40, grid=4, input_size=56)
    tiny = {"embed_dim": 48, "depth": 2, "num_heads": 3}
    net = Student("vit_small_patch14_dinov2", 3, 56, [slot], translator_hidden=32, **tiny)
    config = {**net.config, "translator_hidden": 16}
    path = tmp_path / "best.pt"
    save_checkpoint({"identity": model_identity(["a", "b", "c"]), "model": config, "split": "-", "student": net.state_dict(),
                     "ema": net.state_dict(), "recipe": '{"views": {"crop_size": 56}}'}, path)
    error_line(run_cli("evaluate", "--checkpoint", path), str(path), "weights do not fit", "size mismatch")


# ---- the schema itself ------------------------------------------------------------------------------------


def test_schema_names_match_the_registries():
    hints = typing.get_type_hints
    assert set(typing.get_args(hints(DataConfig)["dataset"])) == set(DATASETS)
    assert set(typing.get_args(hints(StudentConfig)["decoder"])) == set(DECODERS)


def test_recipes_round_trip_and_overrides_are_checked(tmp_path):
    for path in sorted(Path(__file__).resolve().parents[1].glob("pipeline/*.toml")):
        recipe = load_recipe(path)
        assert Recipe.from_dict(recipe.to_dict(), "again") == recipe, path
    r = load_recipe(None).override({"views.count": 3, "train.lr": 1}, origin={"views.count": "--views"})
    assert r.views.count == 3 and r.train.lr == 1.0 and isinstance(r.train.lr, float)
    from rsmtdf.errors import RsmtdfError

    with pytest.raises(RsmtdfError, match=r"^--set views.hflip=\"no\": expected true or false$"):
        r.override({"views.hflip": "no"})
    with pytest.raises(RsmtdfError, match=r"^--set views.colour: unknown recipe key 'views.colour'$"):
        r.override({"views.colour": 1})
