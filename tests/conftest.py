"""Shared fixtures: real LoveDA scenes when present, generated scenes always, a tiny recipe, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub

ROOT = Path(__file__).resolve().parents[1]
LOVEDA_SAMPLE = ROOT.parent / "shared" / "data" / "loveda-sample"


@pytest.fixture(scope="session")
def loveda_sample() -> Path:
    if not LOVEDA_SAMPLE.is_dir():
        pytest.skip(f"real LoveDA sample absent: {LOVEDA_SAMPLE} (it sits beside the repository in CI)")
    return LOVEDA_SAMPLE


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Generated LoveDA-layout scenes of 512² (one DWL tile each): 6 train, 2 val."""
    from rsmtdf.synthetic import make_landcover_dataset

    return make_landcover_dataset(tmp_path_factory.mktemp("synthetic"), train_scenes=3, val_scenes=1, size=512, seed=1)


def write_recipe(path: Path, data_root: Path, splits: Path, *, views: int = 2, crop: int = 56,
                 teachers: str = '["effnet_lite0"]', sizes: str = "{ effnet_lite0 = 64 }", extra: str = "") -> Path:
    """A tiny recipe: small crops and one fast real-weights teacher, so a test extracts in seconds."""
    path.write_text(f"""
[data]
dataset = "loveda"
root = "{data_root}"
splits = "{splits}"
[views]
count = {views}
crop_size = {crop}
[teachers]
names = {teachers}
sizes = {sizes}
{extra}
""")
    return path


@pytest.fixture()
def tiny(tmp_path, synthetic_root):
    """(recipe, cache path) for the generated scenes, with split lists written."""
    from rsmtdf.data import open_dataset
    from rsmtdf.splits import make_splits

    splits = tmp_path / "splits"
    make_splits(open_dataset("loveda", synthetic_root), splits)
    return write_recipe(tmp_path / "recipe.toml", synthetic_root, splits), tmp_path / "cache"


def run_cli(*args: str, cwd: Path | None = None, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rsmtdf ARGS` in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "rsmtdf.cli", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rsmtdf {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
