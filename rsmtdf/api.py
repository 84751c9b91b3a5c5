"""The two stages as functions of a recipe, for users driving rsmtdf from their own Python code.

They run exactly what `rsmtdf extract-features` and `rsmtdf train` run (the same resolve layer,
the same defaults), so one recipe gives the same cache from either. Named `extract_features` and
`train_student` because `rsmtdf.pipeline.extract` and `rsmtdf.train` implement them."""

from __future__ import annotations

from pathlib import Path

from .cache.store import FeatureCache
from .config.recipe import Recipe, load_recipe
from .pipeline.extract import extract_recipe
from .pipeline.resolve import default_run_dir
from .train.trainer import Trainer


def _recipe(recipe: Recipe | str | Path | None) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def extract_features(recipe: Recipe | str | Path | None, output: str | Path | None = None, *,
                     teacher_weights: dict[str, str] | None = None, device: str = "auto", workers: int = 2,
                     batch_size: int = 8, shard_index: int | None = None, num_shards: int | None = None,
                     shard_samples: int | None = None, progress: bool = True) -> FeatureCache:
    """Stage one: run the recipe's teachers over its dataset's training tiles and views into a cache
    at `output` (a path or fsspec URL; default cache/<dataset>, a folder recipe's cache/<file name>),
    resumably; this process's shards are its rank's among a torchrun or SLURM launch unless given.
    Returns the open cache (complete once every worker's shards are written)."""
    _, output = extract_recipe(_recipe(recipe), None if output is None else str(output), teacher_weights,
                               shard_index=shard_index, num_shards=num_shards, shard_samples=shard_samples,
                               batch_size=batch_size, num_workers=workers, device=device, progress=progress)
    return FeatureCache.open(output)


def train_student(recipe: Recipe | str | Path | None, cache: str | Path | None = None, split: str = "5pct",
                  run_dir: str | Path | None = None, *, teachers: str = "cached", device: str = "auto",
                  teacher_weights: dict[str, str] | None = None, resume: bool = False, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Stage two: train the student from `cache` (or with `teachers="online"` and no cache) on the
    labeled split `split`, into `run_dir` (default runs/<dataset>-<split>); returns the last step's
    losses with `steps`, `steps_per_s` and `best` (mIoU of student and EMA and its step)."""
    r = _recipe(recipe)
    trainer = Trainer(None if cache is None else str(cache), split, r, Path(run_dir or default_run_dir(r, split)),
                      teachers, device, teacher_weights, resume, progress=progress, overwrite=overwrite)
    return trainer.fit()
