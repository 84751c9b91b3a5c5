"""Gradient accumulation (`[train] accumulate`, `global_batch`): k micro-batches of b are one batch
of k·b (every loss normalised over the whole step), the schedule, EMA, logs and checkpoints count
optimiser steps, a resume is exact, DDP runs it, and a global batch that does not divide is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, killed_at_step, train_run
from rsmtdf.config.recipe import load_recipe


def _trainer(student_cache, run: Path, **train):
    from rsmtdf.train.trainer import Trainer

    recipe, cache, _ = student_cache
    r = load_recipe(recipe, [f"train.{k}={v}" for k, v in train.items()])
    return Trainer(str(cache), "10pct", r, run, "cached", progress=False)


def _halves(inp, k: int) -> list:
    """`inp` cut along the batch into k micro-batches of equal size."""
    def part(v, i):
        return v if v is None else ({n: t.chunk(k)[i] for n, t in v.items()} if isinstance(v, dict) else v.chunk(k)[i])
    return [dataclasses.replace(inp, **{f.name: part(getattr(inp, f.name), i) for f in dataclasses.fields(inp)})
            for i in range(k)]


def _grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}


def test_k_micro_batches_of_b_are_one_batch_of_k_b(student_cache, tmp_path):
    """Same weights, same 4 samples: one step on them whole and one step on them as 2 micro-batches
    of 2 give the same losses and gradients. The micro-batches score different numbers of labeled
    and valid unlabeled pixels, so averaging per micro-batch would not (checked below). No CutMix box
    here: CutMix pairs samples within a micro-batch, which is the one thing that legitimately differs."""
    whole = _trainer(student_cache, tmp_path / "whole", batch_size=4)
    split = _trainer(student_cache, tmp_path / "split", batch_size=2, accumulate=2)
    inp = next(whole.batches(0, 0))
    inp = dataclasses.replace(inp, box=torch.zeros_like(inp.box), y=inp.y.clone(), ignore=inp.ignore.clone())
    inp.y[0, : inp.y.shape[1] // 2] = 255  # micro-batch 1 scores a quarter fewer labeled pixels
    inp.ignore[3, :, : inp.ignore.shape[2] // 3] = 255  # micro-batch 2 a sixth fewer unlabeled ones
    a, b = whole.train_step(inp), split.train_step(_halves(inp, 2))
    for key in ("loss", "loss_sup", "loss_unsup", "loss_distill", "mask_ratio"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    ga, gb = _grads(whole), _grads(split)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6 * ga[name].abs().max().item() + 1e-9)
    assert whole.step == split.step == 1
    for pa, pb in zip(whole.ema.parameters(), split.ema.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)

    # the normalisers matter: each micro-batch averaged on its own gives another supervised loss
    naive = _trainer(student_cache, tmp_path / "naive", batch_size=4)
    parts = [naive.train_step(m) for m in _halves(inp, 2)]
    assert abs((parts[0]["loss_sup"] + parts[1]["loss_sup"]) / 2 - a["loss_sup"]) > 1e-3 * a["loss_sup"]


def test_schedule_logs_and_checkpoints_count_optimiser_steps(student_cache, tmp_path):
    one = _trainer(student_cache, tmp_path / "one")
    two = _trainer(student_cache, tmp_path / "two", accumulate=2)
    assert two.steps_per_epoch == one.steps_per_epoch // 2 and two.total == two.recipe.train.epochs * two.steps_per_epoch
    run = tmp_path / "run"
    train_run(student_cache, run, "--max-steps", "3", "--set", "train.accumulate=2")
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    lr = load_recipe(student_cache[0]).train.lr
    assert [r["lr"] for r in rows] == pytest.approx([lr * (1 - s / 3) ** 0.9 for s in range(3)])
    ckpt = torch.load(run / "latest.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["scheduler"]["schedule"]["accumulate"] == 2


def test_resume_with_accumulation_is_exact(student_cache, tmp_path):
    args = ("--max-steps", "4", "--checkpoint-every", "2", "--set", "train.accumulate=2")
    train_run(student_cache, tmp_path / "whole", *args)
    with killed_at_step(2):
        assert train_run(student_cache, tmp_path / "stopped", *args, check=False).returncode != 0
    train_run(student_cache, tmp_path / "stopped", *args, "--resume")
    a, b = (torch.load(tmp_path / r / "latest.pt", weights_only=True) for r in ("whole", "stopped"))
    assert a["step"] == b["step"] == 4
    for part in ("student", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    # a resume with another accumulation is another schedule
    proc = train_run(student_cache, tmp_path / "stopped", "--max-steps", "4", "--resume", check=False)
    assert proc.returncode != 0 and "accumulate 2 → 1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value, says", [(5, "global_batch = 5 is not batch_size 2 × 1 process"),
                                         (1, "global_batch = 1 is not batch_size 2")])
def test_a_global_batch_that_does_not_divide_is_refused(student_cache, tmp_path, value, says):
    proc = train_run(student_cache, tmp_path / "r", "--max-steps", "1", "--set", f"train.global_batch={value}",
                     check=False)
    assert proc.returncode != 0 and says in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_global_batch_sets_the_accumulation(student_cache, tmp_path):
    assert _trainer(student_cache, tmp_path / "g", global_batch=4).accumulate == 2  # batch 2, one process


def test_torchrun_two_processes_accumulate(student_cache, tmp_path):
    """2 processes × 2 micro-batches × 1: gradients synced once per step (`no_sync` on the first)."""
    recipe, cache, _ = student_cache
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rsmtdf.cli", "train",
         "--cache", str(cache), "--split", "10pct", "-r", str(recipe), "--run-dir", str(run), "--max-steps", "2",
         "--batch-size", "1", "--set", "train.global_batch=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run / "latest.pt", weights_only=True)
    schedule = ckpt["scheduler"]["schedule"]
    assert ckpt["step"] == 2 and (schedule["processes"], schedule["accumulate"]) == (2, 2)
