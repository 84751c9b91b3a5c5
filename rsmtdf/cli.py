"""The `rsmtdf` command line. Every user-input problem ends in one line and a non-zero exit."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import RsmtdfError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RS-MTDF semi-supervised segmentation with a precomputed teacher feature cache.")

Recipe = Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Recipe TOML (pipeline/*.toml).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Override any recipe key: SECTION.KEY=VALUE "
                                                   "(TOML value; repeat), e.g. --set train.lr=1e-5.")]
Root = Annotated[Optional[Path], typer.Option(help="Dataset folder (overrides the recipe).")]
Output = Annotated[Optional[str], typer.Option("--output", "-o", help="Cache path or fsspec URL [default: cache/<dataset>, a folder recipe's cache/<recipe name>].")]
Teachers = Annotated[Optional[list[str]], typer.Option("--teacher", help="Teacher name (repeat); overrides the recipe.")]
TeacherWeights = Annotated[Optional[list[str]], typer.Option("--teacher-weights", help="NAME=PATH of a weights file.")]
Views = Annotated[Optional[int], typer.Option("--views", help="Views per sample (A).")]
Crop = Annotated[Optional[int], typer.Option("--crop-size", help="View crop size in pixels.")]
Storage = Annotated[Optional[str], typer.Option(help="float16 or int8 (per-token scale).")]
ShardSamples = Annotated[Optional[int], typer.Option(help="Samples per shard [default: ~256 MB shards].")]


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return None


class Plan:
    """What an extraction (or its estimate) is: recipe plus command-line overrides, resolved and
    checked once, before any work."""

    def __init__(self, recipe: Path | None, root: Path | None, output: str | None, teacher: list[str] | None,
                 teacher_weights: list[str] | None, views: int | None, crop_size: int | None,
                 storage: str | None, sets: list[str] | None = None) -> None:
        from .recipe import load_recipe

        self.recipe = load_recipe(recipe, sets).override(
            {"data.root": None if root is None else str(root), "views.count": views, "views.crop_size": crop_size,
             "teachers.names": teacher or None, "teachers.storage": storage},
            origin={"data.root": "--root", "views.count": "--views", "views.crop_size": "--crop-size",
                    "teachers.names": "--teacher", "teachers.storage": "--storage"})
        self.output = output or f"cache/{self.recipe.name}"
        self.weights = {}
        for item in teacher_weights or []:
            name, sep, path = item.partition("=")
            if not sep:
                raise RsmtdfError(f"--teacher-weights {item}: expected NAME=PATH")
            self.weights[name] = path

    def dataset(self):
        from .data import check_bands, open_recipe_dataset

        data = self.recipe.data
        dataset = open_recipe_dataset(data)
        check_bands(dataset, data.bands, self.recipe.where("data.bands"))
        return dataset

    def spec(self):
        return self.recipe.view_spec()

    def teachers(self):
        from .teachers import build_teachers

        t = self.recipe.teachers
        return build_teachers(list(t.names), self.weights, sizes=t.sizes)


@app.command("extract-features")
def extract_features(
    recipe: Recipe = None, sets: Sets = None, root: Root = None, output: Output = None, teacher: Teachers = None,
    teacher_weights: TeacherWeights = None, views: Views = None, crop_size: Crop = None, storage: Storage = None,
    shard_samples: ShardSamples = None,
    shard_index: Annotated[Optional[int], typer.Option(help="This worker's index [default: RANK or SLURM_PROCID or 0].")] = None,
    num_shards: Annotated[Optional[int], typer.Option(help="Workers in all [default: WORLD_SIZE or SLURM_NTASKS or 1].")] = None,
    batch_size: Annotated[int, typer.Option(help="Views per teacher forward pass.")] = 8,
    workers: Annotated[int, typer.Option(help="Loader processes decoding tiles and rendering views.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... [default: cuda if available].")] = "auto",
    repair: Annotated[bool, typer.Option("--repair", help="Verify this worker's shards and extract the damaged ones again.")] = False,
) -> None:
    """Run the frozen teachers once over every training tile and its views; write a Zarr cache.

    Resumable: shards already written are skipped. Several workers own disjoint shards. With
    --repair, shards that fail their checksums are extracted again and the rest left untouched.

    Examples:

      rsmtdf extract-features -r pipeline/loveda.toml --root /data/LoveDA

      torchrun --nproc-per-node 4 -m rsmtdf.cli extract-features -r pipeline/loveda.toml

      rsmtdf extract-features -r pipeline/loveda.toml --teacher-weights clip_vitl14=ViT-L-14.pt -o s3://bucket/loveda

      rsmtdf extract-features -r pipeline/loveda.toml --repair   # after `rsmtdf inspect --verify` found damage
    """
    import torch

    from .extract import extract
    from .recipe import at_least, check_option

    plan = Plan(recipe, root, output, teacher, teacher_weights, views, crop_size, storage, sets)
    plan.recipe.check_for_student(training=False)
    check_option("--shard-samples", shard_samples, int, at_least(1))
    check_option("--shard-index", shard_index, int, at_least(0))
    check_option("--num-shards", num_shards, int, at_least(1))
    check_option("--batch-size", batch_size, int, at_least(1))
    check_option("--workers", workers, int, at_least(0))
    index = shard_index if shard_index is not None else (_env_int("RANK", "SLURM_PROCID") or 0)
    count = num_shards if num_shards is not None else (_env_int("WORLD_SIZE", "SLURM_NTASKS") or 1)
    if device == "auto":
        local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    from .scaling import dataset_scaling

    dataset = plan.dataset()
    summary = extract(dataset, plan.recipe.data.splits, plan.spec(), plan.teachers(), plan.output,
                      shard_samples=shard_samples, shard_index=index, num_shards=count, batch_size=batch_size,
                      num_workers=workers, storage=plan.recipe.teachers.storage, device=device,
                      scaling=dataset_scaling(plan.recipe, dataset)[0].teachers(),
                      repair=repair, recipe=plan.recipe.to_toml())
    typer.echo(summary.line())


@app.command("inspect")
def inspect_cache(
    path: Annotated[Optional[str], typer.Argument(help="Cache path or URL.")] = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Predict the size of a cache before extracting it.")] = False,
    probe: Annotated[int, typer.Option(help="With --estimate: samples to run the teachers on to measure compression.")] = 4,
    verify: Annotated[bool, typer.Option("--verify", help="Read every chunk, check its checksum, list damaged shards.")] = False,
    recipe: Recipe = None, sets: Sets = None, root: Root = None, teacher: Teachers = None,
    teacher_weights: TeacherWeights = None, views: Views = None, crop_size: Crop = None, storage: Storage = None,
    stats: Annotated[bool, typer.Option("--stats", help="Feature statistics, cross-view consistency and teacher "
                                        "agreement, printed and written as JSON beside the cache.")] = False,
    samples: Annotated[Optional[int], typer.Option(help="With --stats: a random subset of this many samples.")] = None,
    seed: Annotated[int, typer.Option(help="With --stats: seed of the subset and of the random baselines.")] = 0,
    stats_out: Annotated[Optional[Path], typer.Option(help="With --stats: the JSON to write [default: "
                                                      "<cache>.stats.json beside it; for a URL, in this folder].")] = None,
) -> None:
    """Print what a cache holds: dataset, teachers (shape, bytes on disk, compression), completeness.

    Examples:

      rsmtdf inspect cache/loveda

      rsmtdf inspect cache/loveda --stats --samples 200

      rsmtdf inspect --estimate -r pipeline/loveda.toml --root /data/LoveDA --views 8

      rsmtdf inspect --verify cache/loveda   # non-zero exit when a shard is damaged
    """
    from .report import estimate_size, format_cache

    if estimate:
        from .recipe import at_least, check_option

        check_option("--probe", probe, int, at_least(1))
        plan = Plan(recipe, root, path, teacher, teacher_weights, views, crop_size, storage, sets)
        plan.recipe.check_for_student(training=False)
        typer.echo(estimate_size(plan, probe=probe))
        return
    if path is None:
        raise RsmtdfError("inspect: give a cache PATH, or --estimate with extraction options")
    if (samples is not None or stats_out is not None) and not stats:
        raise RsmtdfError("--samples/--stats-out: only with --stats")
    if samples is not None and samples < 1:
        raise RsmtdfError(f"--samples {samples}: give at least 1")
    from .cache import FeatureCache

    cache = FeatureCache.open(path)
    if verify:
        from .verify import verify_cache

        report = verify_cache(cache)
        for line in report.lines():
            typer.echo(line)
        if problem := report.problem():
            raise RsmtdfError(problem)
        typer.echo(report.summary())
        return
    typer.echo(format_cache(cache))
    if stats:
        from .inspect.stats import cache_dataset, compute_stats, default_output, format_stats, write_json

        result = compute_stats(cache, cache_dataset(cache), samples, seed)
        out = write_json(result, stats_out or default_output(cache.url))
        typer.echo("\n" + format_stats(result, red=lambda s: typer.style(s, fg="red", bold=True)))
        typer.echo(f"inspected {result['samples']} samples × {result['views']} views in {result['seconds']:.1f} s; "
                   f"wrote {out}")


@app.command("show")
def show(
    path: Annotated[str, typer.Argument(help="Cache path or URL.")],
    sample: Annotated[Optional[str], typer.Option("--sample", help="Sample id (see the cache's ids).")] = None,
    index: Annotated[Optional[int], typer.Option("--index", help="Sample by its position in the cache (0-based).")] = None,
    random: Annotated[Optional[int], typer.Option("--random", help="This many samples drawn at random (--seed).")] = None,
    seed: Annotated[int, typer.Option(help="With --random: seed of the draw.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="PNG to write [default: <sample>.png]; with --random, "
                                                "a folder [default: this one].")] = None,
) -> None:
    """Write a PNG of a sample's stored views beside a PCA-to-RGB picture of each teacher's features.

    Examples:

      rsmtdf show cache/loveda --sample Train/Rural/0_1 --out rural0.png

      rsmtdf show cache/loveda --index 0

      rsmtdf show cache/loveda --random 5 --out pictures/
    """
    from .cache import FeatureCache
    from .inspect.stats import cache_dataset
    from .show import choose_samples, render_sample

    if sum(x is not None for x in (sample, index, random)) != 1:
        raise RsmtdfError("show: give exactly one of --sample ID, --index I, --random N")
    cache = FeatureCache.open(path)
    ids = choose_samples(cache, sample, index, random, seed)
    dataset = cache_dataset(cache)  # None if the dataset moved: the features alone
    for sid in ids:
        name = Path(sid.replace("/", "_") + ".png")
        target = (out or Path(".")) / name if random is not None else out or name
        render_sample(cache, sid, target, dataset)
        typer.echo(f"wrote {target}")
@app.command("report")
def report(
    path: Annotated[str, typer.Argument(help="Cache path or URL.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Folder for index.html and its PNGs (replaced whole "
                                      "if it holds an earlier report).")] = Path("report"),
    gallery: Annotated[int, typer.Option(help="Samples in the gallery.")] = 6,
    samples: Annotated[Optional[int], typer.Option(help="Statistics over a random subset of this many samples.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the gallery, the subset and the random baselines.")] = 0,
) -> None:
    """Write a static HTML report of a cache: summary, statistics as figures, a gallery of views with
    their teachers' PCA pictures and masks. Opens from disk, offline.

    Example:

      rsmtdf report cache/loveda -o report/ --gallery 8 --samples 500
    """
    from .cache import FeatureCache
    from .inspect.html import check_target, write_report
    from .inspect.stats import cache_dataset

    if gallery < 0 or (samples is not None and samples < 1):
        raise RsmtdfError(f"--gallery {gallery} --samples {samples}: give a gallery of 0 or more and at least 1 sample")
    check_target(out)
    cache = FeatureCache.open(path)
    done = write_report(cache, cache_dataset(cache), out, gallery, samples, seed)
    typer.echo(f"report of {done['samples']} samples, gallery of {gallery} ({done['gallery']} views), "
               f"{done['images']} images: open {out / 'index.html'}")


@app.command("make-splits")
def make_splits_cmd(
    recipe: Recipe = None, sets: Sets = None, root: Root = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the lists [default: the recipe's splits].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle (the reference used none).")] = 0,
    val_fraction: Annotated[Optional[float], typer.Option(
        help="Hold out this share of the training scenes as val/test (for datasets without a Val/ folder).")] = None,
    allow_missing_classes: Annotated[bool, typer.Option(
        help="Write labeled lists in which a class never occurs.")] = False,
) -> None:
    """Write DWL-protocol split lists: 1 %, 5 %, 10 % labeled per domain; official Val 50/50 val/test.

    Prints and writes (class_counts.json) the labeled pixels per class of each list, and refuses a
    labeled list missing a class unless --allow-missing-classes.

    Example:

      rsmtdf make-splits -r pipeline/loveda.toml --root /data/LoveDA
      rsmtdf make-splits -r pipeline/mine.toml --val-fraction 0.2
    """
    from .splits import write_checked_splits

    plan = Plan(recipe, root, None, None, None, None, None, None, sets)
    target = out or Path(plan.recipe.data.splits)
    typer.echo(write_checked_splits(plan.dataset(), target, seed, val_fraction, allow_missing_classes))


@app.command("check-splits")
def check_splits_cmd(
    recipe: Recipe = None, sets: Sets = None, root: Root = None,
    splits: Annotated[Optional[Path], typer.Option(help="Folder of lists [default: the recipe's splits].")] = None,
) -> None:
    """Check that every name in the split lists is a sample of the dataset folder (e.g. the committed
    DWL lists against your DWL-prepared Potsdam or DeepGlobe).

    Example:

      rsmtdf check-splits -r pipeline/potsdam.toml --root /data/Potsdam
    """
    from .splits import check_lists

    plan = Plan(recipe, root, None, None, None, None, None, None, sets)
    target = splits or Path(plan.recipe.data.splits)
    dataset = plan.dataset()
    counts = check_lists(target, dataset)
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))
    typer.echo(f"all {sum(counts.values())} names in {len(counts)} lists of {target} resolve in {dataset.root}")


@app.command("stats")
def stats_cmd(recipe: Recipe = None, sets: Sets = None, root: Root = None,
              progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True) -> None:
    """Per-band statistics (valid pixels, mean, std, 2nd/98th percentile, min, max) of every band of
    the training tiles, written as band_stats.json beside the split lists; `[data] scaling` uses them.

    Example:

      rsmtdf stats -r pipeline/mydata.toml
    """
    from .bandstats import compute_band_stats, summary_table, training_ids, write_band_stats

    plan = Plan(recipe, root, None, None, None, None, None, None, sets)
    splits = plan.recipe.data.splits
    ids = training_ids(splits)
    stats = compute_band_stats(plan.dataset().subset(ids), ids, progress)
    path = write_band_stats(stats, splits)
    typer.echo(summary_table(stats))
    typer.echo(f"wrote statistics of {len(stats['bands'])} bands ({stats['dtype']}) over {len(ids)} tiles to {path}")


recipe_app = typer.Typer(no_args_is_help=True, help="Recipes: print one resolved.")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("show")
def recipe_show(recipe: Recipe = None, sets: Sets = None) -> None:
    """Print the recipe resolved (defaults filled in, --set applied, every value checked) as TOML.

    Example:

      rsmtdf recipe show -r pipeline/loveda.toml --set train.lr=1.25e-6 --set views.count=4
    """
    from .recipe import load_recipe

    typer.echo(load_recipe(recipe, sets).to_toml(), nl=False)


@app.command("train")
def train(
    cache: Annotated[Optional[str], typer.Option("--cache", help="Finalized feature cache (path or URL); "
                                                 "without one, --teachers online runs from the recipe.")] = None,
    split: Annotated[str, typer.Option("--split", help="Labeled split: 1pct, 5pct, 10pct, ...")] = "5pct",
    recipe: Recipe = None, sets: Sets = None,
    run: Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder [default: runs/<dataset>-<split>].")] = None,
    teachers: Annotated[str, typer.Option("--teachers", help="cached, online or online-strong.")] = "cached",
    teacher_weights: TeacherWeights = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from RUN/latest.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Move an existing run in RUN aside (never deleted) and start afresh.")] = False,
    new_schedule: Annotated[bool, typer.Option("--new-schedule", help="With --resume: accept a changed total schedule (steps, epochs, batch).")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop the schedule after this many steps.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (overrides the recipe).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch per process (overrides the recipe).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Encoder learning rate (overrides the recipe).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Also write latest.pt every N steps (0: at evaluations).")] = 0,
    workers: Annotated[Optional[int], typer.Option(help="Loader processes per rank.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (overrides the recipe).")] = None,
) -> None:
    """Train the RS-MTDF student and fusion decoder semi-supervised from cached teacher targets.

    The dataset, split lists and views come from the cache's attributes. A run folder that holds a
    run is never overwritten: continue it with --resume, or move it aside with --overwrite.

    Examples:

      rsmtdf train --cache cache/loveda --split 5pct

      torchrun --nproc-per-node 4 -m rsmtdf.cli train --cache cache/loveda --split 1pct -r pipeline/loveda.toml

      rsmtdf train --cache cache/loveda --split 5pct --teachers online-strong   # the paper's code's semantics
    """
    from .recipe import at_least, check_option, load_recipe
    from .train import Trainer, setup_distributed

    options = {"train.max_steps": "--max-steps", "train.epochs": "--epochs", "train.batch_size": "--batch-size",
               "train.lr": "--lr", "train.workers": "--workers", "train.seed": "--seed"}
    values = dict(zip(options, (max_steps, epochs, batch_size, lr, workers, seed)))
    if cache is None and recipe is None:
        raise RsmtdfError("train: give --cache, or a recipe (-r) with --teachers online to train without a cache")
    r = load_recipe(recipe, sets) if recipe is not None else _recipe_of_cache(cache, sets)
    r = r.override(values, origin=options)
    check_option("--checkpoint-every", checkpoint_every, int, at_least(0))
    if resume and overwrite:
        raise RsmtdfError("--resume --overwrite: choose one (continue the run, or move it aside and start afresh)")
    if new_schedule and not resume:
        raise RsmtdfError("--new-schedule: only with --resume (it accepts a resumed run's changed schedule)")
    r.check_for_student(training=True)
    device = setup_distributed()
    weights = Plan(None, None, None, None, teacher_weights, None, None, None).weights
    run = run or Path(f"runs/{r.data.dataset}-{split}")
    trainer = Trainer(cache, split, r, run, teachers, device, weights, resume, checkpoint_every,
                      overwrite=overwrite, new_schedule=new_schedule)
    if trainer.rank == 0:
        if trainer.moved_aside is not None:
            typer.echo(f"moved the run that was in {run} to {trainer.moved_aside}", err=True)
        for note in trainer.notes:
            typer.echo(note, err=True)
    result = trainer.fit()
    if trainer.rank == 0:
        typer.echo(f"trained {result['steps']} steps ({result['steps_per_s']:.2f} steps/s), last loss "
                   f"{result.get('loss', float('nan')):.4f}; best val mIoU {trainer.best['mIoU']:.2f} "
                   f"(EMA {trainer.best['mIoU_ema']:.2f}) at step {trainer.best['step']}; checkpoints in {run}")


def _recipe_of_cache(cache: str, sets: list[str] | None):
    """The recipe a cache was made with (kept in its attributes), with `--set` overrides; a cache from
    before recipes were kept gives the defaults with its dataset, crop, teachers and splits."""
    import tomllib

    from .cache import FeatureCache
    from .recipe import Recipe, load_recipe, parse_sets

    a = FeatureCache.open(cache).attrs
    if "recipe" in a:
        return Recipe.from_dict(tomllib.loads(a["recipe"]), f"{cache} (its recipe)").override(parse_sets(sets or []))
    taken = {"data.dataset": a["dataset"]["name"], "views.crop_size": a["views"]["crop_size"],
             "teachers.names": [t["name"] for t in a["teachers"]], "data.splits": a["splits"]["dir"]}
    return load_recipe(None, sets).override(taken, origin={k: f"{cache}: its {k} =" for k in taken})


def _trained(checkpoint: Path, model: str, mode: str):
    """Check --mode and --model, then load the checkpoint's model onto the best device there is."""
    import torch

    from .evaluate import MODES
    from .export import load_model

    if mode not in MODES or model not in ("ema", "student"):
        raise RsmtdfError(f"--mode {mode} --model {model}: choose mode from {MODES} and model from ema, student")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, ident, recipe = load_model(checkpoint, model)
    return net.to(device), ident, recipe, device


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A run's best.pt or latest.pt.")],
    split: Annotated[str, typer.Option("--split", help="val or test (or any list in the split folder).")] = "test",
    mode: Annotated[str, typer.Option("--mode", help="whole (tile at once) or sliding (crop windows).")] = "whole",
    protocol: Annotated[Optional[str], typer.Option("--protocol", help="rsmtdf or reference (the paper's code's "
                                                    "evaluation) [default: the recipe's [eval] protocol].")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Headline model, ema or student [default: the "
                                                 "protocol's]; both are reported.")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", "-r", help="Take [eval] from this recipe instead "
                                                   "of the checkpoint's.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON of the metrics [default: beside the checkpoint].")] = None,
    cache: Annotated[Optional[str], typer.Option("--cache", help="Evaluate on this cache's dataset and splits instead.")] = None,
    pictures: Annotated[int, typer.Option(help="Write image | truth | prediction PNGs of this many tiles.")] = 0,
) -> None:
    """Evaluate a checkpoint's student and EMA models: mIoU, per-class IoU and F1, OA and kappa, as a
    table and as strict JSON.

    Examples:

      rsmtdf evaluate --checkpoint runs/loveda-5pct/best.pt --split test --mode sliding

      rsmtdf evaluate --checkpoint runs/potsdam-5pct/best.pt --protocol reference   # the paper's numbers
    """
    import json

    from .evaluate import evaluate_checkpoint, format_report
    from .recipe import load_recipe

    section = load_recipe(recipe).eval if recipe is not None else None
    folder = out.with_suffix("") if out else checkpoint.with_name(f"{checkpoint.stem}-{split}-{mode}-pictures")
    report = evaluate_checkpoint(checkpoint, split, mode, protocol, model, cache, section, folder, pictures)
    out = out or checkpoint.with_name(f"{checkpoint.stem}-{split}-{mode}-{report['protocol']['name']}.json")
    typer.echo(format_report(report))
    out.write_text(json.dumps(report, indent=2, allow_nan=False))
    typer.echo(f"wrote {out}" + (f" and pictures in {folder}" if pictures else ""))


@app.command("predict")
def predict_cmd(
    images: Annotated[list[str], typer.Argument(help="Rasters to map: files, folders, globs (GeoTIFF, VRT, JPEG2000, PNG; any size).")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A run's best.pt or latest.pt.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the class maps (<name>.tif).")] = Path("predictions"),
    model: Annotated[str, typer.Option("--model", help="ema or student.")] = "ema",
    window: Annotated[Optional[int], typer.Option(help="Window size in pixels [default: the model's crop size].")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Window stride in pixels [default: 2/3 of the window].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 8,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write <name>.probabilities.tif (per class, uint8).")] = False,
    confidence: Annotated[bool, typer.Option("--confidence", help="Also write <name>.confidence.tif (top class, uint8).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Map scenes whose output is already complete again.")] = False,
) -> None:
    """Map whole scenes, streamed window by window: one Cloud-Optimized GeoTIFF of class indices per
    input (255 = nodata), with its CRS, transform, colour table and class names.

    Example:

      rsmtdf predict scenes/ --checkpoint runs/loveda-5pct/best.pt --out maps/ --confidence
    """
    from .export import load_model
    from .predict import Tiling, find_scenes, pick_device, plan_outputs, predict_many

    if model not in ("ema", "student"):
        raise RsmtdfError(f"--model {model}: choose ema or student")
    net, ident, recipe = load_model(checkpoint, model)
    size = window or net.config["crop_size"]
    tiling = Tiling(size, max(1, size * 2 // 3) if stride is None else stride, batch_size)
    tiling.check(net.patch)
    scenes, problems = find_scenes(images)
    plans = plan_outputs(scenes, out, probabilities, confidence)
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    device = pick_device()
    failed = predict_many(net.to(device), scenes, plans, recipe, ident, tiling, device, overwrite, typer.echo,
                          lambda line: typer.echo(f"error: {line}", err=True))
    typer.echo(f"{len(scenes) - failed} of {len(scenes) + len(problems)} inputs mapped with {checkpoint} ({model}, "
               f"window {tiling.window}, stride {tiling.stride}) into {out}")
    if failed or problems:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A run's best.pt or latest.pt.")],
    fmt: Annotated[str, typer.Option("--format", help="safetensors or onnx.")] = "safetensors",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write [default: beside the "
                                                   "checkpoint, best.safetensors or best.onnx].")] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Export the EMA model instead of the student.")] = False,
) -> None:
    """Write one trained model for serving (no optimiser or training state) and a JSON sidecar of its
    config, classes, bands, scaling and normalisation. ONNX takes any batch and any height and width
    that are multiples of the patch; `predict` and `evaluate` take a safetensors export.

    Examples:

      rsmtdf export --checkpoint runs/loveda-5pct/best.pt --format onnx

      rsmtdf export --checkpoint runs/loveda-5pct/best.pt --ema -o serve/loveda.safetensors
    """
    from .export import export_model

    model_file, sidecar = export_model(checkpoint, fmt, output, ema)
    typer.echo(f"wrote {model_file} ({'EMA' if ema else 'student'} model) and {sidecar}")


@app.command("bench")
def bench(
    part: Annotated[str, typer.Argument(help="step, extract, read, size, predict or all.")] = "all",
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes for CI (about a minute on CPU).")] = False,
    full: Annotated[bool, typer.Option("--full", help="The paper's sizes: crop 518, DINOv2-S student, DINOv2-B + CLIP-L (GPU).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the results as JSON here.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [default: cuda when present].")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads [default: torch's].")] = None,
) -> None:
    """Measure the goals of DESIGN §6 as ratios of two timings taken in this run, and print a table.

    Examples:

      rsmtdf bench all --out bench.json

      rsmtdf bench step --quick

      rsmtdf bench all --full --out bench-gpu.json   # on a GPU
    """
    from .bench import PARTS, format_table, run

    if part not in (*PARTS, "all"):
        raise RsmtdfError(f"bench {part}: choose one of {', '.join(PARTS)}, all")
    if quick and full:
        raise RsmtdfError("bench: give --quick or --full, not both")
    results = run(list(PARTS) if part == "all" else [part], "quick" if quick else "full" if full else "default",
                  device, out, echo=lambda line: typer.echo(line, err=True), threads=threads)
    typer.echo(format_table(results))
    if out is not None:
        typer.echo(f"wrote {out}")


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the generated data, cache and run go.")] = Path("runs/demo"),
) -> None:
    """The whole pipeline offline on generated land-cover scenes, with EfficientNet-Lite teachers.

    Example:

      rsmtdf demo --workdir runs/demo
    """
    from .demo import run_demo

    run_demo(workdir)


def main() -> None:
    """Entry point: click reports usage errors itself; user-input errors print one line and exit 2."""
    try:
        app()
    except RsmtdfError as exc:
        from tqdm import tqdm

        for bar in list(tqdm._instances):  # end any progress bar's line, so the error has its own
            bar.close()
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
