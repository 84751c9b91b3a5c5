"""`rsmtdf demo`: the pipeline end to end on generated scenes, offline, in a few minutes on a CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from .recipe import load_recipe

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "pipeline" / "demo.toml"


def run_demo(workdir: Path, steps: int = 12) -> None:
    """Generate scenes → split lists → extract a cache with EfficientNet-Lite teachers → inspect it →
    train the fusion student briefly from the cache → evaluate on the test split."""
    from .cache import FeatureCache
    from .data import open_dataset
    from .evaluate import evaluate
    from .extract import extract
    from .metrics import format_table
    from .report import format_cache
    from .show import render_sample
    from .splits import make_splits, read_list
    from .synthetic import make_landcover_dataset
    from .teachers import build_teachers
    from .train import Trainer

    data_dir, splits_dir, cache_dir, run_dir = (workdir / n for n in ("data", "splits", "cache", "run"))
    recipe = load_recipe(DEMO_RECIPE).override({"data.root": str(data_dir), "data.splits": str(splits_dir)})
    if not (data_dir / "Train").is_dir():
        typer.echo(f"[1/5] generating land-cover scenes in {data_dir}")
        make_landcover_dataset(data_dir, train_scenes=4, val_scenes=2, size=512, seed=0)
    dataset = open_dataset("loveda", data_dir)
    counts = make_splits(dataset, splits_dir, seed=0)
    typer.echo(f"[2/5] split lists in {splits_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    teachers = build_teachers(list(recipe.teachers.names), sizes=recipe.teachers.sizes)
    summary = extract(dataset, str(splits_dir), recipe.view_spec(), teachers, str(cache_dir),
                      shard_samples=8, num_workers=recipe.train.workers, recipe=recipe.to_toml())
    typer.echo(f"[3/5] {summary.line()}")
    cache = FeatureCache.open(str(cache_dir))
    typer.echo(format_cache(cache))
    picture = workdir / "features.png"
    render_sample(cache, cache.ids[0], picture, dataset)
    typer.echo(f"      PCA picture of the teachers' features: {picture}")

    trainer = Trainer(str(cache_dir), "10pct", recipe.override({"train.max_steps": steps}), run_dir, progress=True,
                      overwrite=True)
    result = trainer.fit()
    typer.echo(f"[4/5] trained {result['steps']} steps from the cache ({result['steps_per_s']:.2f} steps/s), "
               f"checkpoints in {run_dir}")
    metrics = evaluate(trainer.ema, dataset, read_list(splits_dir, "test"), len(trainer.class_names), trainer.device,
                       "whole", recipe.views.crop_size, pictures=workdir / "predictions", num_pictures=2)
    typer.echo("[5/5] EMA model on the test split:\n" + format_table(metrics, trainer.class_names))
    typer.echo(f"      training curves: {run_dir / 'curves.png'}; image | truth | prediction: {workdir / 'predictions'}")
    typer.echo(f"demo done in {workdir}: a few steps on generated data, so expect low scores; "
               f"`rsmtdf train --cache {cache_dir} --split 10pct -r {DEMO_RECIPE}` trains for real")
