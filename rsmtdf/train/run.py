"""One training run as `rsmtdf train` starts it: the recipe (the cache's own without -r), this
process's device and group, the trainer, its notes, the run, and the summary line."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..cache.store import FeatureCache
from ..config.recipe import Recipe
from ..errors import RsmtdfError
from ..pipeline.resolve import default_run_dir, recipe_of_cache
from .distributed import setup_distributed
from .trainer import Trainer


def train_recipe(cache: str | None, split: str, recipe: Recipe | None, sets: list[str] | None,
                 overrides: dict, origins: dict[str, str], run_dir: Path | None, echo: Callable[[str], None],
                 **options) -> dict:
    """Train from `cache` with `recipe` (None: the cache's own, `sets` applied) and the option
    `overrides` (recipe keys, named by `origins`); `options` go to `Trainer` (mode, device, weights,
    resume, ...). Rank 0 tells `echo` what it moved aside and what it noticed, then the summary."""
    if cache is None and recipe is None:
        raise RsmtdfError("train: give --cache, or a recipe (-r) with --teachers online to train without a cache")
    if options.get("new_schedule") and not options.get("resume"):
        raise RsmtdfError("--new-schedule: only with --resume (it accepts a resumed run's changed schedule)")
    r = (recipe if recipe is not None else recipe_of_cache(FeatureCache.open(cache), sets)).override(overrides, origins)
    options["device"] = setup_distributed(options.get("device", "auto"))
    run_dir = run_dir or default_run_dir(r, split)
    trainer = Trainer(cache, split, r, run_dir, **options)
    if trainer.rank == 0:
        if trainer.moved_aside is not None:
            echo(f"moved the run that was in {run_dir} to {trainer.moved_aside}")
        for note in trainer.notes:
            echo(note)
    result = trainer.fit()
    best = trainer.best
    result["line"] = (f"trained {result['steps']} steps ({result['steps_per_s']:.2f} steps/s), last loss "
                      f"{result.get('loss', float('nan')):.4f}; best val mIoU {best['mIoU']:.2f} (EMA "
                      f"{best['mIoU_ema']:.2f}) at step {best['step']}; checkpoints in {run_dir}")
    result["rank"] = trainer.rank
    return result
