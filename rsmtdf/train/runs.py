"""Run folders: a run is never overwritten, and a resumed run continues the same log and schedule.

- A folder holding a run (a checkpoint or a metrics log) refuses a new `train` unless `--resume`
  (continue it) or `--overwrite` (move it aside to `<name>.old-<time>`; nothing is deleted).
- `--resume` cuts `metrics.jsonl` back to the checkpoint's step before appending, so the steps a
  killed run logged after its last checkpoint (and replays now) appear once.
- `--resume` with another total schedule (steps, epochs, batch, processes) is refused unless
  `--new-schedule`, because the poly learning rate is a function of the total.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import RsmtdfError
from ..config.recipe import TrainConfig
from ..utils.files import write_whole

RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl")
DECISIVE = ("total", "batch_size", "processes", "accumulate")  # what the learning rate and the data order per step depend on


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a `run_dir` training may not write into: one holding a run, unless resumed or moved
    aside; a resume without a checkpoint; a path that is a file."""
    if resume and overwrite:
        raise RsmtdfError("--resume --overwrite: choose one (continue the run, or move it aside and start afresh)")
    if run_dir.exists() and not run_dir.is_dir():
        raise RsmtdfError(f"{run_dir}: is a file, not a run folder; choose another --run-dir")
    if resume:
        if not (run_dir / "latest.pt").is_file():
            raise RsmtdfError(f"{run_dir}: --resume, but there is no latest.pt to continue from")
        return
    if holds_run(run_dir) and not overwrite:
        found = ", ".join(name for name in RUN_FILES if (run_dir / name).exists())
        raise RsmtdfError(f"{run_dir}: holds a run ({found}); continue it with --resume, or move it aside with "
                          "--overwrite (nothing is deleted), or choose another --run-dir")


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool, move: bool = True) -> Path | None:
    """Check that training may write into `run_dir` (`check_run_dir`); with `overwrite` (and `move`:
    rank 0 alone moves) put an existing run aside. Returns where it went, or None."""
    check_run_dir(run_dir, resume, overwrite)
    if resume or not holds_run(run_dir) or not move:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, k = run_dir.with_name(f"{run_dir.name}.old-{stamp}"), 1
    while aside.exists():
        aside, k = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{k}"), k + 1
    os.rename(run_dir, aside)
    return aside


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` (evaluations at `step` too: they precede its checkpoint)
    and drop the rest, including a line cut short by a kill; replaced whole. Returns lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    write_whole(path, "".join(f"{line}\n" for line in keep))
    return len(lines) - len(keep)


def schedule_changes(old: dict, new: dict) -> list[str]:
    """What differs between a checkpoint's schedule and this run's, as "key old → new" phrases."""
    return [f"{key} {old[key]} → {new.get(key)}" for key in old if old[key] != new.get(key)]


def check_schedule(checkpoint: Path, step: int, old: dict, new: dict, accept: bool) -> str | None:
    """Refuse a resume on another schedule unless `accept`; then return the line that says what changes."""
    changes = schedule_changes(old, new)
    if not any(old.get(k, new[k]) != new[k] for k in DECISIVE):  # e.g. epochs changed under a fixed --max-steps
        return None
    if not accept:
        raise RsmtdfError(f"{checkpoint}: the run was made with another schedule ({', '.join(changes)}); resume "
                          "with the same options, or add --new-schedule to continue on the new one")
    if step >= new["total"]:
        raise RsmtdfError(f"{checkpoint}: the run is at step {step}, already past the new schedule's "
                          f"{new['total']} steps")
    return (f"--new-schedule: {', '.join(changes)}; from step {step} the learning rate follows the poly "
            f"schedule of {new['total']} steps (it was {old.get('total')})")


def micro_batches(tr: TrainConfig, world: int) -> int:
    """Micro-batches per optimiser step: `accumulate`, or what `global_batch` asks of this many processes."""
    if tr.global_batch is None:
        return tr.accumulate
    per_pass = tr.batch_size * world
    k, rest = divmod(tr.global_batch, per_pass)
    if rest or not k or (tr.accumulate not in (1, k)):
        raise RsmtdfError(f"[train] global_batch = {tr.global_batch} is not batch_size {tr.batch_size} × {world} "
                          f"process{'es' * (world > 1)} × a whole number of micro-batches"
                          + (f" (accumulate = {tr.accumulate} asks for {tr.accumulate * per_pass})" if rest == 0 and k else ""))
    return k

