"""Bad input ends in one line that names the file and the problem, a non-zero exit and no traceback,
and leaves an existing cache untouched (DESIGN §7). Every case runs the real CLI's `main()` (in this
process, as `run_cli` does; one case through the interpreter, as `run_process` does)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_process, write_recipe
from PIL import Image

PROGRESS = re.compile(r"\d+/\d+ \[")  # a tqdm bar: "…| 3/6 [00:00<…"


def error_line(proc, *needles: str) -> str:
    """Assert the run failed with exactly one `error:` line on stderr (progress bars aside) holding
    every needle, no traceback anywhere and nothing on stdout; return the line."""
    shown = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode != 0, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.stdout.strip() == "", shown
    lines = [ln for ln in proc.stderr.split("\n") if ln.strip() and "\r" not in ln and not PROGRESS.search(ln)]
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("error: "), shown
    assert line == [ln for ln in proc.stderr.split("\n") if ln.strip()][-1], shown  # the last thing said
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (the folder's state, byte for byte)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def extract(recipe: Path, cache: Path, *args: str):
    return run_cli("extract-features", "-r", recipe, "-o", cache, "--workers", "0", "--device", "cpu", *args)


@pytest.fixture(scope="module")
def splits(tmp_path_factory, synthetic_root) -> Path:
    """Split lists of the generated scenes; a corrupted copy has the same ids, so they fit it too."""
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.data.splits import make_splits

    out = tmp_path_factory.mktemp("splits")
    make_splits(open_dataset("loveda", synthetic_root), out)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory, synthetic_root, splits) -> tuple[Path, Path]:
    """(recipe, cache): a complete cache extracted from the generated scenes, shared by the
    'existing cache' cases (each checks it is byte-identical afterwards)."""
    work = tmp_path_factory.mktemp("made")
    recipe = write_recipe(work / "recipe.toml", synthetic_root, splits)
    cache = work / "cache"
    run_cli("extract-features", "-r", recipe, "-o", cache, "--workers", "0", "--device", "cpu", check=True)
    return recipe, cache


def bad_copy(tmp_path: Path, synthetic_root: Path, splits: Path) -> tuple[Path, Path]:
    """(root, recipe) of a copy of the generated scenes, to be corrupted by the test."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root, write_recipe(tmp_path / "recipe.toml", root, splits)


def train_file(root: Path, kind: str) -> Path:
    """A training scene's image or mask file (kind: images_png / masks_png)."""
    return sorted((root / "Train" / "Urban" / kind).glob("*.png"))[0]


# ---- bad images and masks ----------------------------------------------------------------------


def test_unreadable_image(tmp_path, synthetic_root, splits):
    root, recipe = bad_copy(tmp_path, synthetic_root, splits)
    image = train_file(root, "images_png")
    image.write_bytes(np.random.default_rng(0).bytes(4000))
    error_line(extract(recipe, tmp_path / "cache"), str(image), "unreadable")


def test_truncated_image(tmp_path, synthetic_root, splits):
    """The first half of a real PNG: GDAL's fast path would decode it to zeros without a word.
    Run with loader workers so the error travels from a worker process as a line."""
    root, recipe = bad_copy(tmp_path, synthetic_root, splits)
    image = train_file(root, "images_png")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    proc = run_cli("extract-features", "-r", recipe, "-o", tmp_path / "cache", "--workers", "2", "--device", "cpu")
    error_line(proc, str(image), "truncated")


def test_mask_of_wrong_size(tmp_path, synthetic_root, splits):
    root, recipe = bad_copy(tmp_path, synthetic_root, splits)
    mask = train_file(root, "masks_png")
    Image.fromarray(np.ones((256, 256), np.uint8)).save(mask)
    error_line(extract(recipe, tmp_path / "cache"), str(mask), "256×256", "512×512")


def test_mask_codes_outside_class_table(tmp_path, synthetic_root, splits):
    root, recipe = bad_copy(tmp_path, synthetic_root, splits)
    mask = train_file(root, "masks_png")
    codes = np.array(Image.open(mask))
    codes[100:110, 100:110] = 9  # LoveDA codes are 0..7
    Image.fromarray(codes).save(mask)
    error_line(extract(recipe, tmp_path / "cache"), str(mask), "mask code 9 (100 px)", "neither a class nor ignored")


def test_image_without_mask(tmp_path, synthetic_root, splits):
    root, recipe = bad_copy(tmp_path, synthetic_root, splits)
    mask = train_file(root, "masks_png")
    mask.unlink()
    image = mask.parent.parent / "images_png" / mask.name
    error_line(extract(recipe, tmp_path / "cache"), str(image), "no mask")


# ---- dataset folders -----------------------------------------------------------------------------


def test_empty_dataset_folder(tmp_path, splits):
    root = tmp_path / "empty"
    root.mkdir()
    recipe = write_recipe(tmp_path / "recipe.toml", root, splits)
    error_line(extract(recipe, tmp_path / "cache"), str(root), "no images")
    assert not (tmp_path / "cache").exists()


def test_missing_dataset_folder(tmp_path, splits):
    root = tmp_path / "nowhere"
    recipe = write_recipe(tmp_path / "recipe.toml", root, splits)
    error_line(extract(recipe, tmp_path / "cache"), str(root), "does not exist")
    assert not (tmp_path / "cache").exists()


# ---- output paths that hold something else ---------------------------------------------------------


def test_cache_from_another_dataset_untouched(tmp_path, made):
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.data.splits import make_splits
    from rsmtdf.data.synthetic import make_landcover_dataset

    _, cache = made
    other = make_landcover_dataset(tmp_path / "other", train_scenes=2, val_scenes=1, size=512, seed=2)
    make_splits(open_dataset("loveda", other), tmp_path / "splits")
    recipe = write_recipe(tmp_path / "recipe.toml", other, tmp_path / "splits")
    before, beside = tree_hashes(cache), sorted(cache.parent.iterdir())
    line = error_line(extract(recipe, cache), str(cache), "different cache", "dataset")
    assert str(other) in line  # says which dataset was asked for
    assert tree_hashes(cache) == before
    assert sorted(cache.parent.iterdir()) == beside  # no half-made store beside it either


def test_cache_from_another_teacher_set_untouched(made):
    recipe, cache = made
    before, beside = tree_hashes(cache), sorted(cache.parent.iterdir())
    error_line(extract(recipe, cache, "--teacher", "effnet_lite1"), str(cache), "different cache",
               "teachers is [effnet_lite0] in the cache, [effnet_lite1] in --teacher effnet_lite1")
    assert tree_hashes(cache) == before
    assert sorted(cache.parent.iterdir()) == beside


def test_output_folder_that_is_not_a_cache(tmp_path, made):
    recipe, _ = made
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.txt").write_text("not a cache\n")
    before = tree_hashes(folder)
    error_line(extract(recipe, folder), str(folder), "not an rsmtdf cache")
    assert tree_hashes(folder) == before
    assert sorted(tmp_path.iterdir()) == [folder]


# ---- reading commands ----------------------------------------------------------------------------------


@pytest.mark.parametrize("run", [run_cli, run_process], ids=["in-process", "process"])
def test_inspect_missing_path(tmp_path, run):
    """Also through a real interpreter: its exit status, stderr and stdout are what `run_cli` reports."""
    missing = tmp_path / "no-such-cache"
    proc = run("inspect", missing)
    error_line(proc, str(missing), "no cache")
    assert proc.returncode == 2
    assert not missing.exists()


def test_in_process_runs_show_what_a_process_would(tmp_path, monkeypatch):
    """An exception nobody catches is a traceback on stderr and status 1; a warning is a line on
    stderr (pytest's filters do not hide it): error_line would refuse either."""
    import warnings

    from rsmtdf.cache import FeatureCache

    def broken(path):
        warnings.warn("a warning the user sees", UserWarning)
        raise ValueError("a bug")

    monkeypatch.setattr(FeatureCache, "open", broken)
    proc = run_cli("inspect", tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "UserWarning: a warning the user sees" in proc.stderr
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("ValueError: a bug")
    with pytest.raises(AssertionError):
        error_line(proc)


def test_show_unknown_sample(tmp_path, made):
    _, cache = made
    before = tree_hashes(cache)
    out = tmp_path / "x.png"
    error_line(run_cli("show", cache, "--sample", "Train/Nowhere/99_0", "--out", out),
               str(cache), "Train/Nowhere/99_0")
    assert not out.exists()
    assert tree_hashes(cache) == before
