"""`rsmtdf demo`: the pipeline end to end on generated scenes, offline, in a few minutes on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .cache.store import FeatureCache
from .config.recipe import load_recipe
from .data.datasets import open_dataset
from .data.splits import make_splits, read_list
from .data.synthetic import make_landcover_dataset
from .evaluate.evaluator import evaluate
from .evaluate.metrics import format_table
from .inspect.show import render_sample
from .inspect.summary import format_cache
from .pipeline.extract import extract
from .pipeline.resolve import resolve
from .train.trainer import Trainer

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "pipeline" / "demo.toml"


def run_demo(workdir: Path, steps: int = 12, echo: Callable[[str], None] = print) -> None:
    """Generate scenes → split lists → extract a cache with EfficientNet-Lite teachers → inspect it →
    train the fusion student briefly from the cache → evaluate on the test split."""
    data_dir, splits_dir, cache_dir, run_dir = (workdir / n for n in ("data", "splits", "cache", "run"))
    recipe = load_recipe(DEMO_RECIPE).override({"data.root": str(data_dir), "data.splits": str(splits_dir)})
    if not (data_dir / "Train").is_dir():
        echo(f"[1/5] generating land-cover scenes in {data_dir}")
        make_landcover_dataset(data_dir, train_scenes=4, val_scenes=2, size=512, seed=0)
    counts = make_splits(open_dataset("loveda", data_dir), splits_dir, seed=0)
    echo(f"[2/5] split lists in {splits_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    resolved = resolve(recipe)
    summary = extract(resolved, resolved.teachers(), str(cache_dir), shard_samples=8, num_workers=recipe.train.workers,
                      device="cpu")
    echo(f"[3/5] {summary.line()}")
    cache = FeatureCache.open(str(cache_dir))
    echo(format_cache(cache))
    picture = workdir / "features.png"
    render_sample(cache, cache.ids[0], picture, resolved.dataset)
    echo(f"      PCA picture of the teachers' features: {picture}")

    trainer = Trainer(str(cache_dir), "10pct", recipe.override({"train.max_steps": steps}), run_dir, device="cpu",
                      progress=True, overwrite=True)
    result = trainer.fit()
    echo(f"[4/5] trained {result['steps']} steps from the cache ({result['steps_per_s']:.2f} steps/s), "
         f"checkpoints in {run_dir}")
    metrics = evaluate(trainer.ema, trainer.dataset, read_list(splits_dir, "test"), len(trainer.class_names),
                       trainer.device, "whole", recipe.views.crop_size, trainer.scaling,
                       pictures=workdir / "predictions", num_pictures=2)
    echo("[5/5] EMA model on the test split:\n" + format_table(metrics, trainer.class_names))
    echo(f"      training curves: {run_dir / 'curves.png'}; image | truth | prediction: {workdir / 'predictions'}")
    echo(f"demo done in {workdir}: a few steps on generated data, so expect low scores; "
         f"`rsmtdf train --cache {cache_dir} --split 10pct` trains for real (the cache keeps its recipe)")
