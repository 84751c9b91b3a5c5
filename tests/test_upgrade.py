"""What rsmtdf 0.1 wrote still works: its cache, checkpoints and export sidecars are read with their
identity upgraded (tests/fixtures/v0.1, written by that release). The cache's data is generated again
here, byte for byte the same scenes, somewhere else than the cache recorded: moved data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "v0.1"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> dict[str, Path]:
    """The fixture cache copied, its scenes and split lists made again (as its README says)."""
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.data.splits import make_splits
    from rsmtdf.data.synthetic import make_landcover_dataset

    tmp = tmp_path_factory.mktemp("legacy")
    shutil.copytree(FIXTURE / "cache", tmp / "cache")
    data = make_landcover_dataset(tmp / "data", train_scenes=2, val_scenes=1, size=512, seed=7)
    make_splits(open_dataset("loveda", data), tmp / "splits")
    return {"cache": tmp / "cache", "data": data, "splits": tmp / "splits", "tmp": tmp}


def _moved(legacy: dict[str, Path]) -> list[str]:
    return ["--set", f"data.root={legacy['data']}", "--set", f"data.splits={legacy['splits']}"]


def test_a_cache_of_rsmtdf_0_1_opens_with_its_identity_upgraded_and_trains(legacy, tmp_path):
    from rsmtdf.cache import FeatureCache

    cache = FeatureCache.open(legacy["cache"])
    ident = cache.identity
    assert ident.dataset.name == "loveda" and ident.dataset.tile == ident.dataset.tile_stride == 512
    assert ident.splits.stats_sha256 is None  # not recorded then: not compared
    assert ident.input.fill == (0.485, 0.456, 0.406) and [t.name for t in ident.teachers] == ["effnet_lite0"]
    shown = run_cli("inspect", legacy["cache"], check=True).stdout
    assert "4 samples at /tmp/legacy/work/data" in shown and "effnet_lite0" in shown
    before = {p: p.read_bytes() for p in legacy["cache"].rglob("*") if p.is_file()}
    run = tmp_path / "run"
    out = run_cli("train", "--cache", legacy["cache"], "--split", "10pct", "--run-dir", run, "--max-steps", "1",
                  *_moved(legacy), check=True).stdout
    assert "trained 1 steps" in out and (run / "latest.pt").is_file()
    assert {p: p.read_bytes() for p in legacy["cache"].rglob("*") if p.is_file()} == before  # read, never written


def _legacy_checkpoint(path: Path) -> Path:
    """The fixture checkpoint's every entry but its tensors, with fresh weights of the model its config
    describes (the tensors would be 41 MB of random numbers)."""
    from rsmtdf.models.student import Student

    meta = json.loads((FIXTURE / "checkpoint-meta.json").read_text())
    net = Student.from_config(meta["identity"]["model"])
    state = net.state_dict()
    optimizer = torch.optim.AdamW(net.parameters())
    torch.save({**meta, "student": state, "ema": state, "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state()}}, path)
    return path


def test_a_checkpoint_of_rsmtdf_0_1_loads_evaluates_and_exports(legacy, tmp_path):
    from rsmtdf.data.classes import LOVEDA
    from rsmtdf.pipeline.trained import load_trained

    ckpt = _legacy_checkpoint(tmp_path / "latest.pt")
    net, ident, recipe = load_trained(ckpt)
    assert ident.class_names == list(LOVEDA.names) and recipe.data.dataset == "loveda" and net.config["crop_size"] == 56
    assert ident.student_input is not None and ident.views is None  # what 0.1 recorded, and what it did not
    out = run_cli("evaluate", "--checkpoint", ckpt, "--split", "val", *_moved(legacy), check=True).stdout
    assert "mIoU" in out
    run_cli("export", "--checkpoint", ckpt, check=True)
    side = json.loads((tmp_path / "latest.safetensors.json").read_text())
    assert side["format"] == "rsmtdf-export-2" and side["identity"]["dataset"]["name"] == "loveda"


def test_an_export_of_rsmtdf_0_1_loads(tmp_path):
    from safetensors.torch import save_file

    from rsmtdf.models.student import Student
    from rsmtdf.pipeline.trained import load_model

    side = json.loads((FIXTURE / "export-sidecar.json").read_text())
    assert side["format"] == "rsmtdf-export-1"
    net = Student.from_config(side["model"])
    save_file(net.state_dict(), str(tmp_path / "latest.safetensors"))
    (tmp_path / "latest.safetensors.json").write_text(json.dumps(side))
    loaded, ident, recipe = load_model(tmp_path / "latest.safetensors")
    assert ident.class_names == side["classes"] and ident.student_input.bands == (0, 1, 2)
    x = torch.rand(1, 3, 56, 56)
    assert torch.equal(loaded(x).logits, net.eval()(x).logits)
