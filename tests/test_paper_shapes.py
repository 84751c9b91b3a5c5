"""The paper's shapes end to end: pipeline/loveda.toml's own architectures (DINOv2-B at 518 and
CLIP-L at 224 as teachers, a DINOv2-S + DPT student at 518) through the command line as a user runs
it, on real LoveDA tiles. Every other test runs at 28-224 px with small teachers, so this is the
one that notices a change breaking the recipe the paper trains with.

No DINOv2/CLIP weights exist offline: random weights for each network are written to files (in
float16, as the loaders accept any float dtype; CLIP-L's visual tower is 608 MB so, not 1.2 GB) and
handed over the way a user hands real ones: `--teacher-weights NAME=PATH` and
`--set student.pretrained="PATH"`. One view of one training scene's four tiles, one step of batch
1 + 1, one tile each in val and test.

Time: about 60 s on 2 cores (`pytest -q -n 0 tests/test_paper_shapes.py`: 56 s and 64 s measured,
of which ~15 s writing the weights, ~25 s extracting, ~20 s training with its validation, ~5 s
evaluating); peak RSS of the pytest process 3.0-3.3 GB (/usr/bin/time -v). Deselect with
`-m "not paper_shapes"`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli

pytestmark = pytest.mark.paper_shapes

TEACHER_SHAPES = {"dinov2_vitb14": (1369, 768), "clip_vitl14": (256, 1024)}  # DESIGN §3: tokens × channels
BYTES_PER_VIEW = 2 * (1369 * 768 + 256 * 1024)  # float16: 2 627 072 B, the 2.63 MB per (tile, view) README states
STUDENT = "vit_small_patch14_dinov2.lvd142m"  # pipeline/loveda.toml's [student] encoder


def random_weights(folder: Path) -> dict[str, Path]:
    """Random float16 weights of the recipe's teachers and student encoder, in the files' layouts
    their loaders read: timm state dicts, and open_clip's with its `visual.` prefix."""
    import timm
    from safetensors.torch import save_file

    from rsmtdf.models.teachers import Teacher, teacher_config

    files = {}
    for name, prefix in (("dinov2_vitb14", ""), ("clip_vitl14", "visual.")):
        state = Teacher(teacher_config(name), pretrained=False).model.state_dict()
        files[name] = folder / f"{name}.safetensors"
        save_file({prefix + k: v.half().contiguous() for k, v in state.items()}, str(files[name]))
        del state
    student = timm.create_model(STUDENT, pretrained=False).state_dict()
    files["student"] = folder / "student.safetensors"
    save_file({k: v.half().contiguous() for k, v in student.items()}, str(files["student"]))
    return files


def one_scene(loveda_sample: Path, root: Path) -> Path:
    """A LoveDA folder holding one training scene and one validation scene (links to the sample)."""
    for split, scene in (("Train", "0"), ("Val", "2")):
        for kind in ("images_png", "masks_png"):
            link = root / split / "Rural" / kind / f"{scene}.png"
            link.parent.mkdir(parents=True)
            link.symlink_to(loveda_sample / split / "Rural" / kind / f"{scene}.png")
    return root


def test_the_loveda_recipe_extracts_trains_and_evaluates_at_the_papers_shapes(tmp_path, loveda_sample):
    from rsmtdf.cache.format import raw_bytes_per_sample
    from rsmtdf.cache.store import FeatureCache
    from rsmtdf.utils.files import sha256_file

    recipe, data, splits = ROOT / "pipeline" / "loveda.toml", one_scene(loveda_sample, tmp_path / "LoveDA"), tmp_path / "splits"
    weights = random_weights(tmp_path)
    at = ["-r", recipe, "--root", data, "--set", f'data.splits="{splits}"']
    run_cli("make-splits", *at, "--allow-missing-classes", check=True)  # one scene lacks most classes
    for name in ("val", "test"):  # one tile each: evaluation costs seconds a tile at 518
        (splits / f"{name}.txt").write_text((splits / f"{name}.txt").read_text().splitlines()[0] + "\n")

    run_cli("extract-features", *at, "--views", "1", "-o", tmp_path / "cache", "--workers", "0", "--batch-size", "2",
            *(x for n in TEACHER_SHAPES for x in ("--teacher-weights", f"{n}={weights[n]}")), check=True)
    cache = FeatureCache.open(str(tmp_path / "cache"))
    assert cache.attrs["complete"] and len(cache.ids) == 4
    assert {lay.name: (lay.tokens, lay.dim) for lay in cache.layouts} == TEACHER_SHAPES
    for name, (tokens, dim) in TEACHER_SHAPES.items():
        array = cache.group[f"teachers/{name}"]
        assert array.shape == (4, 1, tokens, dim) and array.dtype == "float16"
        assert torch.isfinite(torch.from_numpy(array[0, 0])).all()
    assert raw_bytes_per_sample(cache.layouts, 1, "float16") == BYTES_PER_VIEW
    stored = sum(cache.bytes_stored(n) for n in TEACHER_SHAPES) / 4  # no compressor: data, checksums, metadata
    assert BYTES_PER_VIEW <= stored <= 1.001 * BYTES_PER_VIEW
    made = {t.name: t for t in cache.identity.teachers}
    assert {n: made[n].weights_sha256 for n in TEACHER_SHAPES} == {n: sha256_file(weights[n]) for n in TEACHER_SHAPES}
    assert (made["dinov2_vitb14"].input_size, made["clip_vitl14"].input_size) == (518, 224)

    run = tmp_path / "run"
    run_cli("train", "--cache", tmp_path / "cache", "--split", "1pct", "--set", f'student.pretrained="{weights["student"]}"',
            "--batch-size", "1", "--max-steps", "1", "--workers", "0", "--run-dir", run, check=True)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = next(s for s in steps if "loss" in s)
    for key in ("loss", "loss_sup", "loss_unsup", "loss_distill"):
        assert math.isfinite(losses[key]), (key, losses)
    assert losses["loss_distill"] > 0  # both teachers' targets reached the loss
    ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["identity"]["views"]["crop_size"] == 518 and ckpt["model"]["crop_size"] == 518
    assert ckpt["model"]["encoder"] == STUDENT and ckpt["model"]["translator_hidden"] == 1024
    assert [t["name"] for t in ckpt["identity"]["teachers"]] == list(TEACHER_SHAPES)
    from safetensors.torch import load_file

    # the student started from the file: one step at lr 5e-6 moves a weight by about the lr
    start = load_file(str(weights["student"]))["patch_embed.proj.weight"].float()
    assert torch.allclose(ckpt["student"]["encoder.model.patch_embed.proj.weight"], start, atol=1e-4)

    out = run_cli("evaluate", "--checkpoint", run / "best.pt", "--split", "test", check=True).stdout
    assert "mIoU" in out
    report = json.loads((run / "best-test-whole-rsmtdf.json").read_text())
    assert report["split"] == "test" and report["mode"] == "whole"
    for model in ("student", "ema"):
        scores = report["models"][model]
        assert len(scores["IoU"]) == 7 and all(math.isfinite(scores[k]) for k in ("mIoU", "OA", "kappa", "mF1"))
