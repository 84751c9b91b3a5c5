"""Stage two: cached/online parity, resume after SIGKILL, teacher-free checkpoints, DDP, real scenes, errors."""

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
import torch

from conftest import ROOT, extracted, run_cli, write_recipe
from rsmtdf.data.datasets import open_dataset
from rsmtdf.errors import RsmtdfError
from rsmtdf.data.splits import make_splits, read_list

STUDENT = """
[student]
encoder = "vit_small_patch14_dinov2"
pretrained = false
translator_hidden = 64
kwargs = { embed_dim = 48, depth = 4, num_heads = 3 }
[train]
batch_size = 2
lr = 1e-4
head_lr_multiplier = 10.0
workers = 0
eval_every = 1000
"""
TEACHERS = '["effnet_lite0", "effnet_lite1"]'
SIZES = "{ effnet_lite0 = 56, effnet_lite1 = 28 }"  # lite1 at 28 px: the CLIP-like second student pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_root):
    """A finalized cache of the generated scenes and a recipe with a tiny ViT student."""
    return extracted(tmp_path_factory.mktemp("train"), synthetic_root, STUDENT)


def _train(setup, run: Path, *extra: str, check: bool = True, env: dict | None = None):
    recipe, cache, _ = setup
    return run_cli("train", "--cache", cache, "--split", "10pct", "-r", recipe, "--run-dir", run, *extra, check=check, env=env)


def _losses(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_cached_and_online_see_the_same_targets_and_losses(setup, tmp_path):
    from rsmtdf.config.recipe import load_recipe
    from rsmtdf.train.trainer import Trainer
    from rsmtdf.train.losses import targets_for

    recipe, cache, _ = setup
    r = load_recipe(recipe)
    cached = Trainer(str(cache), "10pct", r, tmp_path / "a", "cached", progress=False)
    online = Trainer(str(cache), "10pct", r, tmp_path / "b", "online", progress=False)
    for bc, bo in zip(cached.batches(0, 0), online.batches(0, 0)):
        assert torch.equal(bc.xs, bo.xs) and torch.equal(bc.box, bo.box)
        tc = targets_for("cached", [], bc, None)
        to = targets_for("online", online.teachers, bo, None)
        assert tc.keys() == to.keys() == {"effnet_lite0", "effnet_lite1"}
        for name in tc:  # same targets to float16 rounding (one fp16 ulp over float32 batch noise)
            torch.testing.assert_close(tc[name], to[name], rtol=2**-10, atol=1e-5 * to[name].abs().max().item())

    _train(setup, tmp_path / "cached", "--max-steps", "20")
    _train(setup, tmp_path / "online", "--max-steps", "20", "--teachers", "online")
    lc, lo = _losses(tmp_path / "cached"), _losses(tmp_path / "online")
    assert len(lc) == len(lo) == 20
    for a, b in zip(lc, lo):
        for key in ("loss", "loss_sup", "loss_unsup", "loss_distill"):
            assert abs(a[key] - b[key]) <= 1e-3 * max(abs(a[key]), 1e-8), (a["step"], key, a[key], b[key])


def test_online_without_a_cache_replays_the_views_a_cache_would_hold(setup, tmp_path):
    recipe, _, _ = setup
    _train(setup, tmp_path / "with", "--max-steps", "3", "--teachers", "online")
    run_cli("train", "--split", "10pct", "-r", recipe, "--run-dir", tmp_path / "without", "--max-steps", "3",
            "--teachers", "online", check=True)
    for a, b in zip(_losses(tmp_path / "with"), _losses(tmp_path / "without"), strict=True):
        assert a == b
    proc = run_cli("train", "--split", "10pct", "-r", recipe, "--run-dir", tmp_path / "x")
    _assert_one_line_error(proc, "--teachers cached needs --cache")


def test_online_strong_runs_on_the_mixed_input(setup, tmp_path):
    """online-strong's teachers see the strong, CutMixed input, online's the clean views: the first
    step (same weights, same batch) has the same supervised loss and another distillation loss."""
    proc = _train(setup, tmp_path / "strong", "--max-steps", "2", "--teachers", "online-strong")
    assert "trained 2 steps" in proc.stdout
    _train(setup, tmp_path / "online", "--max-steps", "2", "--teachers", "online")
    strong, online = _losses(tmp_path / "strong")[0], _losses(tmp_path / "online")[0]
    assert strong["loss_sup"] == online["loss_sup"] and np.isfinite(strong["loss_distill"])
    assert abs(strong["loss_distill"] - online["loss_distill"]) > 1e-3 * online["loss_distill"]


def _cli(setup, run: Path, *extra: str) -> list[str]:
    recipe, cache, _ = setup
    return [sys.executable, "-m", "rsmtdf.cli", "train", "--cache", str(cache), "--split", "10pct", "-r", str(recipe),
            "--run-dir", str(run), *extra]


def test_resume_after_sigkill_continues_the_same_trajectory(setup, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ("--max-steps", "8", "--checkpoint-every", "4")
    subprocess.run(_cli(setup, whole, *args), check=True, capture_output=True, cwd=ROOT)
    proc = subprocess.Popen(_cli(setup, killed, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = killed / "latest.pt", time.time() + 300
    while time.time() < deadline and not latest.exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(latest, weights_only=True)["step"]
    assert step == 4, "the kill must land between the mid-run checkpoint and the end"
    subprocess.run(_cli(setup, killed, *args, "--resume"), check=True, capture_output=True, cwd=ROOT)
    a = torch.load(whole / "latest.pt", weights_only=True)
    b = torch.load(killed / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for part in ("student", "ema"):
        for key in a[part]:
            diff = (a[part][key].float() - b[part][key].float()).abs().max().item() if a[part][key].numel() else 0
            assert diff < 1e-6, (part, key, diff)
    # the steps the killed run logged past its checkpoint are replayed and logged once
    assert [r["step"] for r in _losses(killed)] == list(range(1, 9))
    for x, y in zip(_losses(whole), _losses(killed), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(abs(x["loss"]), 1e-8), (x, y)


def test_checkpoint_holds_no_teacher(setup, tmp_path):
    _train(setup, tmp_path / "run", "--max-steps", "1")
    path = tmp_path / "run" / "latest.pt"
    ckpt = torch.load(path, weights_only=True)
    assert {k.split(".")[0] for k in ckpt["student"]} == {"encoder", "head", "translators", "projections"}
    student_bytes = sum(v.numel() * v.element_size() for v in ckpt["student"].values())
    # student + EMA + AdamW's two moments: 4 copies of the student, and nothing teacher-sized
    teacher_bytes = sum(p.numel() * 4 for p in __import__("timm").create_model("tf_efficientnet_lite0").parameters())
    assert 4 * student_bytes <= path.stat().st_size < 4 * student_bytes * 1.1 + 200_000
    assert teacher_bytes > 0.25 * path.stat().st_size  # a teacher inside would have been seen


def test_torchrun_two_processes_on_cpu(setup, tmp_path):
    recipe, cache, _ = setup
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rsmtdf.cli", "train",
         "--cache", str(cache), "--split", "10pct", "-r", str(recipe), "--run-dir", str(run), "--max-steps", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "latest.pt"]
    assert torch.load(run / "latest.pt", weights_only=True)["step"] == 2
    assert proc.stdout.count("trained 2 steps") == 1  # rank 0 alone reports


def _scores_by_hand(checkpoint: Path, root: Path, ids: list[str]) -> tuple[float, list[float | None]]:
    """OA and per-class IoU (percent; None where a class is in neither truth nor prediction) of the
    checkpoint's EMA model on whole tiles padded to the patch, counted here in numpy."""
    from rsmtdf.pipeline.trained import load_trained
    from rsmtdf.transforms.pixels import to_unit_rgb

    net, ident, _ = load_trained(checkpoint, "ema")
    ds, k = open_dataset("loveda", root), len(ident.class_names)
    cm = np.zeros((k, k), np.int64)
    for sid in ids:
        s = ds.load(ds.index(sid))
        x = torch.from_numpy(to_unit_rgb(s.image, valid=s.valid)).permute(2, 0, 1)[None]
        h, w = x.shape[-2:]
        x = torch.nn.functional.pad(x, (0, -w % net.patch, 0, -h % net.patch))
        with torch.no_grad():
            pred = net(x).logits[0, :, :h, :w].argmax(0).numpy()
        keep = s.mask != 255
        cm += np.bincount(k * s.mask[keep].astype(np.int64) + pred[keep], minlength=k * k).reshape(k, k)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = [100 * cm[c, c] / union[c] if union[c] else None for c in range(k)]
    return 100 * np.trace(cm) / cm.sum(), iou


def test_real_scenes_extract_train_evaluate(tmp_path, loveda_sample):
    splits = tmp_path / "splits"
    make_splits(open_dataset("loveda", loveda_sample), splits)
    recipe = write_recipe(tmp_path / "r.toml", loveda_sample, splits, teachers=TEACHERS, sizes=SIZES, extra=STUDENT)
    run_cli("extract-features", "-r", recipe, "-o", tmp_path / "cache", "--workers", "0", check=True)
    run_cli("train", "--cache", tmp_path / "cache", "--split", "1pct", "-r", recipe, "--run-dir", tmp_path / "run",
            "--max-steps", "3", check=True)
    out = run_cli("evaluate", "--checkpoint", tmp_path / "run" / "best.pt", "--split", "test", check=True).stdout
    for name in ("background", "building", "road", "water", "barren", "forest", "agriculture"):
        assert name in out
    metrics = json.loads((tmp_path / "run" / "best-test-whole-rsmtdf.json").read_text())
    assert metrics["model"] == "ema" and len(metrics["IoU"]) == 7
    oa, iou = _scores_by_hand(tmp_path / "run" / "best.pt", loveda_sample, read_list(splits, "test"))
    assert metrics["OA"] == pytest.approx(oa, abs=1e-9)
    assert [v is None for v in metrics["IoU"]] == [v is None for v in iou]
    assert [v for v in metrics["IoU"] if v is not None] == pytest.approx([v for v in iou if v is not None], abs=1e-9)
    run_cli("evaluate", "--checkpoint", tmp_path / "run" / "best.pt", "--split", "val", "--mode", "sliding",
            "--pictures", "1", check=True)
    sliding = json.loads((tmp_path / "run" / "best-val-sliding-rsmtdf.json").read_text())
    present = [v for k, v in enumerate(sliding["IoU"]) if v is not None and k in sliding["scored"]]
    assert sliding["mode"] == "sliding" and sliding["mIoU"] == pytest.approx(sum(present) / len(present), abs=1e-9)
    from PIL import Image

    pictures = list((tmp_path / "run" / "best-val-sliding-pictures").glob("*.png"))
    assert len(pictures) == 1
    assert Image.open(pictures[0]).size == (3 * 512 + 2 * 4, 512)  # image | truth | prediction

    # map a whole georeferenced scene: the class map keeps its CRS and transform
    import rasterio
    from rasterio.transform import from_origin

    scene = np.array(Image.open(loveda_sample / "Val/Rural/images_png/2.png"))[:300, :450]
    geo = from_origin(500000, 4200000, 0.3, 0.3)
    with rasterio.open(tmp_path / "scene.tif", "w", driver="GTiff", width=450, height=300, count=3, dtype="uint8",
                       crs="EPSG:32650", transform=geo) as dst:
        dst.write(scene.transpose(2, 0, 1))
    run_cli("predict", tmp_path / "scene.tif", "--checkpoint", tmp_path / "run" / "best.pt", "--out", tmp_path / "maps",
            check=True)
    with rasterio.open(tmp_path / "maps" / "scene.tif") as src:
        assert (src.width, src.height, src.count, src.dtypes[0]) == (450, 300, 1, "uint8")
        assert src.crs.to_string() == "EPSG:32650" and src.transform == geo
        assert src.read(1).max() < 7 and src.colormap(1)[0][3] == 255


def _assert_one_line_error(proc, *words: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.strip()][-1]
    assert line.startswith("error:"), proc.stderr[-2000:]
    for w in words:
        assert w in line, (w, line)


def test_refuses_cache_for_another_teacher_set_or_dataset(setup, tmp_path):
    recipe, cache, tmp = setup
    other = write_recipe(tmp_path / "r.toml", load_recipe_root(recipe), tmp / "splits", teachers='["effnet_lite1"]',
                         sizes="{ effnet_lite1 = 28 }", extra=STUDENT)
    _assert_one_line_error(run_cli("train", "--cache", cache, "--split", "10pct", "-r", other, "--run-dir", tmp_path / "r"),
                           str(cache), "teachers")
    potsdam = tmp_path / "p.toml"
    potsdam.write_text(recipe.read_text().replace('dataset = "loveda"', 'dataset = "potsdam"'))
    _assert_one_line_error(run_cli("train", "--cache", cache, "--split", "10pct", "-r", potsdam, "--run-dir", tmp_path / "r"),
                           "dataset")


def test_refuses_changed_split_lists_and_unknown_split(setup, tmp_path):
    recipe, cache, tmp = setup
    _assert_one_line_error(_train(setup, tmp_path / "r", "--split", "7pct", check=False), "7pct", "10pct")
    lst = tmp / "splits" / "val.txt"
    saved = lst.read_text()
    try:
        lst.write_text(saved + "Train/Rural/0_0\n")
        _assert_one_line_error(_train(setup, tmp_path / "r", check=False), "splits.sha256", "in the cache")
    finally:
        lst.write_text(saved)
    assert not (tmp_path / "r" / "latest.pt").exists()


def test_refuses_cache_made_with_other_split_lists(setup, tmp_path):
    recipe, cache, tmp = setup
    make_splits(open_dataset("loveda", load_recipe_root(recipe)), tmp_path / "other", seed=7)
    other = tmp_path / "o.toml"
    other.write_text(recipe.read_text().replace(str(tmp / "splits"), str(tmp_path / "other")))
    proc = run_cli("train", "--cache", cache, "--split", "10pct", "-r", other, "--run-dir", tmp_path / "r")
    _assert_one_line_error(proc, str(cache), "splits.sha256", str(tmp_path / "other"))


def load_recipe_root(recipe: Path) -> str:
    from rsmtdf.config.recipe import load_recipe

    return load_recipe(recipe).data.root


def test_refuses_unfinalized_cache(setup, tmp_path):
    recipe, _, _ = setup
    run_cli("extract-features", "-r", recipe, "-o", tmp_path / "half", "--workers", "0", "--num-shards", "2",
            "--shard-index", "0", "--shard-samples", "1", check=True)
    proc = run_cli("train", "--cache", tmp_path / "half", "--split", "10pct", "-r", recipe, "--run-dir", tmp_path / "r")
    _assert_one_line_error(proc, "not finalized", "3 shards unwritten")


def test_refuses_checkpoint_of_another_model_or_class_count(setup, tmp_path):
    recipe, cache, tmp = setup
    run = tmp_path / "run"
    _train(setup, run, "--max-steps", "1")
    before = (run / "latest.pt").read_bytes()
    wider = tmp_path / "w.toml"
    wider.write_text(recipe.read_text().replace("embed_dim = 48", "embed_dim = 96"))
    proc = run_cli("train", "--cache", cache, "--split", "10pct", "-r", wider, "--run-dir", run, "--resume")
    _assert_one_line_error(proc, "latest.pt", "another model")
    assert (run / "latest.pt").read_bytes() == before  # left untouched

    # a cache whose class table differs: a folder dataset with 3 classes
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    from PIL import Image

    for name in ("a", "b"):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "images" / f"{name}.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "masks" / f"{name}.png")
    fr = tmp_path / "f.toml"
    fr.write_text(f'[data]\ndataset = "folder"\nroot = "{folder}"\nsplits = "{tmp_path / "fs"}"\nclasses = ["a", "b", "c"]\n'
                  f'[views]\ncount = 1\ncrop_size = 56\n[teachers]\nnames = ["effnet_lite0"]\nsizes = {{ effnet_lite0 = 56 }}\n')
    run_cli("make-splits", "-r", fr, "--val-fraction", "0.5", "--allow-missing-classes", check=True)
    run_cli("extract-features", "-r", fr, "-o", tmp_path / "fcache", "--workers", "0", check=True)
    proc = run_cli("evaluate", "--checkpoint", run / "latest.pt", "--cache", tmp_path / "fcache", "--split", "val")
    _assert_one_line_error(proc, "latest.pt", "7 classes", "3")


def test_refuses_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    _assert_one_line_error(run_cli("evaluate", "--checkpoint", bad), "best.pt", "not a readable checkpoint")


def test_the_next_batchs_reads_run_while_this_batch_is_used():
    """`one_ahead`: work on item k+1 is under way in its thread while item k is in use, items come
    in order with their results, and a failure reaches the caller at its own item."""
    import threading

    from rsmtdf.train.loader import one_ahead

    second = threading.Event()

    def work(k: int) -> int:
        if k == 1:
            second.set()
        if k == 3:
            raise RsmtdfError("chunk 3 is damaged")
        return 10 * k

    batches = one_ahead(iter(range(5)), work)
    assert next(batches) == (0, 0)
    assert second.wait(5), "the next item's work had not started while the first was in use"
    assert [next(batches) for _ in range(2)] == [(1, 10), (2, 20)]
    with pytest.raises(RsmtdfError, match="chunk 3"):
        next(batches)
