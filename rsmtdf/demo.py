"""`rsmtdf demo`: the pipeline end to end on generated scenes, offline, in a few minutes on a CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from .recipe import load_recipe, view_spec

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "pipeline" / "demo.toml"


def run_demo(workdir: Path) -> None:
    from .cache import FeatureCache
    from .data import open_dataset
    from .extract import extract
    from .report import format_cache
    from .splits import make_splits
    from .synthetic import make_landcover_dataset
    from .teachers import build_teachers

    recipe = load_recipe(DEMO_RECIPE)
    data_dir, splits_dir, cache_dir = workdir / "data", workdir / "splits", workdir / "cache"
    if not (data_dir / "Train").is_dir():
        typer.echo(f"1/3 generating land-cover scenes in {data_dir}")
        make_landcover_dataset(data_dir, train_scenes=4, val_scenes=2, size=512, seed=0)
    dataset = open_dataset("loveda", data_dir)
    counts = make_splits(dataset, splits_dir, seed=0)
    typer.echo(f"2/3 split lists in {splits_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    teachers = build_teachers(recipe["teachers"]["names"], sizes=recipe["teachers"]["sizes"])
    summary = extract(dataset, str(splits_dir), view_spec(recipe), teachers, str(cache_dir),
                      shard_samples=8, num_workers=recipe["train"]["workers"])
    typer.echo(f"3/3 {summary.line()}")
    typer.echo(format_cache(FeatureCache.open(str(cache_dir))))
