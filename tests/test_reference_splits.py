"""The reference's DWL split lists for Potsdam and DeepGlobe: committed with the reference's counts,
named as our DWL-prepared datasets name their samples, and checked against a dataset folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli
from rsmtdf.data.datasets import open_dataset
from rsmtdf.errors import RsmtdfError
from rsmtdf.config.recipe import load_recipe
from rsmtdf.data.splits import check_lists, read_list

MIRROR = Path("/work/.mirror/earth-insights+RS-MTDF/repo")
# Lines per list in the reference (earth-insights/RS-MTDF, splits/), counted from its files.
REFERENCE_COUNTS = {
    "potsdam": {"1pct/labeled.txt": 32, "1pct/unlabeled.txt": 3251, "5pct/labeled.txt": 164,
                "5pct/unlabeled.txt": 3119, "10pct/labeled.txt": 328, "10pct/unlabeled.txt": 2955,
                "val.txt": 1094, "test.txt": 1095},
    "deepglobe": {"1pct/labeled.txt": 120, "1pct/unlabeled.txt": 11925, "5pct/labeled.txt": 602,
                  "5pct/unlabeled.txt": 11443, "10pct/labeled.txt": 1204, "10pct/unlabeled.txt": 10841,
                  "100pct/labeled.txt": 12045, "100pct/unlabeled.txt": 0, "val.txt": 4015, "test.txt": 4015},
}
REFERENCE_DIR = {"potsdam": "Potsdam", "deepglobe": "deepglobe"}


@pytest.mark.parametrize("dataset", sorted(REFERENCE_COUNTS))
def test_recipes_point_at_committed_lists_with_the_references_counts(dataset):
    splits = ROOT / load_recipe(ROOT / "pipeline" / f"{dataset}.toml").data.splits
    assert splits == ROOT / "pipeline" / "splits" / dataset
    found = {p.relative_to(splits).as_posix(): len(read_list(splits, p.relative_to(splits).with_suffix("").as_posix()))
             for p in splits.rglob("*.txt")}
    assert found == REFERENCE_COUNTS[dataset]
    for pct in {k.split("/")[0] for k in found if "/" in k}:
        labeled, unlabeled = read_list(splits, f"{pct}/labeled"), read_list(splits, f"{pct}/unlabeled")
        assert not set(labeled) & set(unlabeled) and len(set(labeled)) == len(labeled)


@pytest.mark.parametrize("dataset", sorted(REFERENCE_COUNTS))
def test_committed_lists_are_the_references_names(dataset):
    """Line for line the reference's lists, each `<dir>/<image> <dir>/<mask>` line reduced to the image's stem."""
    if not MIRROR.is_dir():
        pytest.skip(f"the reference's git mirror is absent: {MIRROR}")
    for rel, count in REFERENCE_COUNTS[dataset].items():
        ref_rel = rel.replace("pct/", "/")
        text = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:splits/{REFERENCE_DIR[dataset]}/{ref_rel}"],
                              capture_output=True, text=True, check=True).stdout
        expected = [Path(line.split()[0]).stem for line in text.splitlines() if line.strip()]
        ours = read_list(ROOT / "pipeline" / "splits" / dataset, rel.removesuffix(".txt"))
        assert ours == expected and len(ours) == count, rel


def dwl_potsdam(root: Path, names: list[str]) -> Path:
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    for k, name in enumerate(names):
        Image.fromarray(np.full((32, 32, 3), 10 * k, np.uint8)).save(root / "image" / f"{name}_RGB.tif")
        Image.fromarray(np.full((32, 32), k % 6, np.uint8)).save(root / "label" / f"{name}_label.tif")
    return root


def test_dwl_potsdam_folder_ids_and_index_masks(tmp_path):
    root = dwl_potsdam(tmp_path / "P", ["top_potsdam_2_10_1", "top_potsdam_2_10_2"])
    ds = open_dataset("potsdam", root)
    assert ds.ids == ["top_potsdam_2_10_1_RGB", "top_potsdam_2_10_2_RGB"]
    assert int(ds.load(1).mask.max()) == 1  # index masks: 1 = building


def test_dwl_deepglobe_folder_ids_and_index_masks(tmp_path):
    crops = tmp_path / "D" / "data_cropped"
    crops.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(crops / "100_sat_3.jpg")
    Image.fromarray(np.full((32, 32), 6, np.uint8)).save(crops / "100_mask_3.png")
    ds = open_dataset("deepglobe", tmp_path / "D")
    assert ds.ids == ["100_sat_3"]
    assert ds.classes.names[int(ds.load(0).mask[0, 0])] == "unknown"


def lists(folder: Path, **files: list[str]) -> Path:
    for rel, names in files.items():
        path = folder / f"{rel.replace('__', '/')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{n}\n" for n in names))
    return folder


def test_check_lists_resolves_every_name_and_names_the_first_missing(tmp_path):
    root = dwl_potsdam(tmp_path / "P", ["top_potsdam_2_10_1", "top_potsdam_2_10_2", "top_potsdam_2_10_3"])
    ds = open_dataset("potsdam", root)
    good = lists(tmp_path / "good", _1pct__labeled=["top_potsdam_2_10_1_RGB"], _1pct__unlabeled=["top_potsdam_2_10_2_RGB"],
                 val=["top_potsdam_2_10_3_RGB"], test=[])
    assert check_lists(good, ds) == {"_1pct/labeled.txt": 1, "_1pct/unlabeled.txt": 1, "test.txt": 0, "val.txt": 1}
    bad = lists(tmp_path / "bad", val=["top_potsdam_2_10_3_RGB", "top_potsdam_7_7_9_RGB", "top_potsdam_7_7_8_RGB"])
    with pytest.raises(RsmtdfError) as err:
        check_lists(bad, ds)
    message = str(err.value)
    assert message.startswith(f"{bad / 'val.txt'}: line 2 names 'top_potsdam_7_7_9_RGB', which {root} does not hold")
    assert "2 of 3 names missing" in message and "\n" not in message


def test_check_splits_cli_one_line(tmp_path):
    root = dwl_potsdam(tmp_path / "P", ["top_potsdam_2_10_1"])
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\ndataset = "potsdam"\nroot = "{root}"\nsplits = "{ROOT / "pipeline/splits/potsdam"}"\n')
    proc = run_cli("check-splits", "-r", recipe)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(lines) == 1
    assert lines[0].startswith(f"error: {ROOT / 'pipeline/splits/potsdam/10pct/labeled.txt'}: line 1 names ")
    total = sum(REFERENCE_COUNTS["potsdam"].values())
    present = sum(f.read_text().split().count("top_potsdam_2_10_1_RGB") for f in (ROOT / "pipeline/splits/potsdam").rglob("*.txt"))
    assert f"{total - present} of {total} names missing" in lines[0]
    ok = lists(tmp_path / "ok", val=["top_potsdam_2_10_1_RGB"])
    out = run_cli("check-splits", "-r", recipe, "--splits", ok, check=True).stdout
    assert out.splitlines()[-1] == f"all 1 names in 1 lists of {ok} resolve in {root}"
