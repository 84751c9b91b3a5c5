"""The two stages as functions of a recipe, for users driving rsmtdf from their own Python code.

Named `extract_features` and `train_student` because `rsmtdf.extract` and `rsmtdf.train` are the
modules that implement them (a package attribute cannot be both)."""

from __future__ import annotations

from pathlib import Path

from .cache import FeatureCache
from .recipe import Recipe, load_recipe


def _recipe(recipe: Recipe | str | Path | None) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def extract_features(recipe: Recipe | str | Path | None, output: str | Path | None = None, *,
            teacher_weights: dict[str, str] | None = None, device: str = "cpu", workers: int = 2,
            batch_size: int = 8, shard_index: int = 0, num_shards: int = 1, progress: bool = True) -> FeatureCache:
    """Stage one: run the recipe's teachers over its dataset's training tiles and views into a cache
    at `output` (a path or fsspec URL; default cache/<dataset>), resumably; returns the open cache
    (complete once every worker's shards are written)."""
    from .data import open_recipe_dataset
    from .extract import extract as extract_shards
    from .scaling import dataset_scaling
    from .teachers import build_teachers

    r = _recipe(recipe)
    data, t = r.data, r.teachers
    output = str(output or f"cache/{data.dataset}")
    dataset = open_recipe_dataset(data)
    extract_shards(dataset, data.splits, r.view_spec(),
                   build_teachers(list(t.names), teacher_weights, sizes=t.sizes), output, shard_index=shard_index,
                   num_shards=num_shards, batch_size=batch_size, num_workers=workers, storage=t.storage,
                   device=device, scaling=dataset_scaling(r, dataset)[0].teachers(), progress=progress)
    return FeatureCache.open(output)


def train_student(recipe: Recipe | str | Path | None, cache: str | Path | None = None, split: str = "5pct",
          run_dir: str | Path | None = None, *, teachers: str = "cached", device: str = "cpu",
          teacher_weights: dict[str, str] | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Stage two: train the student from `cache` (or with `teachers="online"` and no cache) on the
    labeled split `split`, into `run_dir` (default runs/<dataset>-<split>); returns the last step's
    losses with `steps`, `steps_per_s` and `best` (mIoU of student and EMA and its step)."""
    from .train import Trainer

    r = _recipe(recipe)
    run_dir = Path(run_dir or f"runs/{r.data.dataset}-{split}")
    trainer = Trainer(None if cache is None else str(cache), split, r, run_dir, teachers, device, teacher_weights,
                      resume, progress=progress)
    return trainer.fit()
