"""Run folders: never overwritten without --resume or --overwrite (which moves the run aside), a
resume cuts metrics.jsonl back to its checkpoint's step, and a changed schedule needs --new-schedule."""

from __future__ import annotations

import json

import torch
from conftest import train_run
from test_errors import error_line, tree_hashes


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_existing_run_is_refused_and_overwrite_moves_it_aside(student_cache, tmp_path):
    run = tmp_path / "run"
    train_run(student_cache, run, "--max-steps", "2")
    before = tree_hashes(run)
    line = error_line(train_run(student_cache, run, "--max-steps", "1", check=False), str(run), "holds a run", "--resume",
                      "--overwrite")
    assert "latest.pt" in line and "metrics.jsonl" in line
    assert tree_hashes(run) == before  # best.pt, latest.pt and the log untouched

    proc = train_run(student_cache, run, "--max-steps", "1", "--overwrite")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the run that was in {run} to {aside[0]}" in proc.stderr
    assert tree_hashes(aside[0]) == before  # moved whole, nothing deleted
    assert torch.load(run / "latest.pt", weights_only=True)["step"] == 1
    assert [r["step"] for r in _records(run) if "loss" in r] == [1]  # a fresh log, not two runs mixed


def test_resume_cuts_the_log_back_and_a_new_schedule_must_be_asked_for(student_cache, tmp_path):
    """A run whose log holds steps past its checkpoint (as a kill after step 4's checkpoint leaves
    it, with a line cut short) resumes with each step logged once."""
    run = tmp_path / "run"
    train_run(student_cache, run, "--max-steps", "4")
    log = run / "metrics.jsonl"
    kept = log.read_text()
    step4 = [r for r in _records(run) if r["step"] == 4]
    assert {"loss" in r for r in step4} == {True, False}  # step 4's losses and its evaluation
    replayed = [json.dumps({**json.loads(kept.splitlines()[0]), "step": s}) for s in (5, 6)]
    log.write_text(kept + "\n".join(replayed) + '\n{"step": 7, "lo')
    latest = (run / "latest.pt").read_bytes()

    line = error_line(train_run(student_cache, run, "--max-steps", "6", "--resume", check=False), "latest.pt",
                      "another schedule", "total 4 → 6", "--new-schedule")
    assert "max_steps 4 → 6" in line
    error_line(train_run(student_cache, run, "--max-steps", "4", "--batch-size", "1", "--resume", check=False),
               "another schedule", "batch_size 2 → 1")
    assert (run / "latest.pt").read_bytes() == latest and log.read_text().startswith(kept)

    proc = train_run(student_cache, run, "--max-steps", "6", "--resume", "--new-schedule")
    assert "--new-schedule: " in proc.stderr and "total 4 → 6" in proc.stderr and "from step 4" in proc.stderr
    records = _records(run)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert records[: len(kept.splitlines())] == [json.loads(x) for x in kept.splitlines()]
    assert torch.load(run / "latest.pt", weights_only=True)["step"] == 6

    error_line(train_run(student_cache, tmp_path / "empty", "--resume", check=False), "empty", "no latest.pt")
