"""The `rsmtdf` command line: each command parses its options, checks how they combine, calls one
library function and prints. Every user-input problem ends in one line and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import RsmtdfError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RS-MTDF semi-supervised segmentation with a precomputed teacher feature cache.")
recipe_app = typer.Typer(no_args_is_help=True, help="Recipes: print one resolved.")
app.add_typer(recipe_app, name="recipe")

Opt = typer.Option
RecipeFile = Annotated[Optional[Path], Opt("--recipe", "-r", help="Recipe TOML (pipeline/*.toml).")]
Sets = Annotated[Optional[list[str]], Opt("--set", help="Override any recipe key: SECTION.KEY=VALUE (TOML value; "
                                          "repeat), e.g. --set train.lr=1e-5 or --set data.root=/data/LoveDA.")]
Root = Annotated[Optional[Path], Opt(help="Dataset folder (overrides the recipe).")]
Output = Annotated[Optional[str], Opt("--output", "-o", help="Cache path or fsspec URL [default: cache/<dataset>, a "
                                      "folder recipe's cache/<recipe name>].")]
Teachers = Annotated[Optional[list[str]], Opt("--teacher", help="Teacher name (repeat); overrides the recipe.")]
TeacherWeights = Annotated[Optional[list[str]], Opt("--teacher-weights", help="NAME=PATH of a weights file.")]
Views = Annotated[Optional[int], Opt("--views", help="Views per sample (A).")]
Crop = Annotated[Optional[int], Opt("--crop-size", help="View crop size in pixels.")]
Storage = Annotated[Optional[str], Opt(help="float16 or int8 (per-token scale).")]
Device = Annotated[str, Opt(help="auto, cpu, cuda or cuda:N [auto: this process's GPU if there is one, else cpu].")]
Checkpoint = Annotated[Path, Opt("--checkpoint", help="A run's best.pt or latest.pt.")]
ABOUT_EXTRACT = {"data.root": "--root", "views.count": "--views", "views.crop_size": "--crop-size",
                 "teachers.names": "--teacher", "teachers.storage": "--storage"}


def _recipe(recipe: Path | None, sets: list[str] | None, root: Path | None = None, teacher: list[str] | None = None,
            views: int | None = None, crop_size: int | None = None, storage: str | None = None):
    """The recipe file (or the defaults) with `--set` and the extraction options applied, checked."""
    from .config.recipe import load_recipe

    values = dict(zip(ABOUT_EXTRACT, (None if root is None else str(root), views, crop_size, teacher or None, storage)))
    return load_recipe(recipe, sets).override(values, origin=ABOUT_EXTRACT)


def _weights(items: list[str] | None) -> dict[str, str]:
    from .pipeline.resolve import teacher_weights

    return teacher_weights(items)


@app.command("extract-features")
def extract_features(
    recipe: RecipeFile = None, sets: Sets = None, root: Root = None, output: Output = None, teacher: Teachers = None,
    teacher_weights: TeacherWeights = None, views: Views = None, crop_size: Crop = None, storage: Storage = None,
    shard_samples: Annotated[Optional[int], Opt(help="Samples per shard [default: ~256 MB shards].")] = None,
    shard_index: Annotated[Optional[int], Opt(help="This worker's index [default: RANK or SLURM_PROCID or 0].")] = None,
    num_shards: Annotated[Optional[int], Opt(help="Workers in all [default: WORLD_SIZE or SLURM_NTASKS or 1].")] = None,
    batch_size: Annotated[int, Opt(help="Views per teacher forward pass.")] = 8,
    workers: Annotated[int, Opt(help="Loader processes decoding tiles and rendering views.")] = 2,
    device: Device = "auto",
    repair: Annotated[bool, Opt("--repair", help="Verify this worker's shards and extract the damaged ones again.")] = False,
) -> None:
    """Run the frozen teachers once over every training tile and its views; write a Zarr cache.

    Resumable: shards already written are skipped. Several workers own disjoint shards. With
    --repair, shards that fail their checksums are extracted again and the rest left untouched.

    Examples:

      rsmtdf extract-features -r pipeline/loveda.toml --root /data/LoveDA

      torchrun --nproc-per-node 4 -m rsmtdf.cli extract-features -r pipeline/loveda.toml

      rsmtdf extract-features -r pipeline/loveda.toml --teacher-weights clip_vitl14=ViT-L-14.pt -o s3://bucket/loveda
    """
    from .config.schema import at_least, check_option
    from .pipeline.extract import extract_recipe

    for option, value in (("--shard-samples", shard_samples), ("--num-shards", num_shards), ("--batch-size", batch_size)):
        check_option(option, value, int, at_least(1))
    check_option("--shard-index", shard_index, int, at_least(0))
    check_option("--workers", workers, int, at_least(0))
    summary, _ = extract_recipe(_recipe(recipe, sets, root, teacher, views, crop_size, storage), output,
                                _weights(teacher_weights), shard_index=shard_index, num_shards=num_shards,
                                shard_samples=shard_samples, batch_size=batch_size, num_workers=workers,
                                device=device, repair=repair)
    typer.echo(summary.line())


@app.command("inspect")
def inspect_cache(
    path: Annotated[Optional[str], typer.Argument(help="Cache path or URL.")] = None,
    estimate: Annotated[bool, Opt("--estimate", help="Predict the size of a cache before extracting it.")] = False,
    probe: Annotated[int, Opt(help="With --estimate: samples to run the teachers on to measure compression.")] = 4,
    verify: Annotated[bool, Opt("--verify", help="Read every chunk, check its checksum, list damaged shards.")] = False,
    recipe: RecipeFile = None, sets: Sets = None, root: Root = None, teacher: Teachers = None,
    teacher_weights: TeacherWeights = None, views: Views = None, crop_size: Crop = None, storage: Storage = None,
    stats: Annotated[bool, Opt("--stats", help="Feature statistics, cross-view consistency and teacher agreement, "
                               "printed and written as JSON beside the cache.")] = False,
    samples: Annotated[Optional[int], Opt(help="With --stats: a random subset of this many samples.")] = None,
    seed: Annotated[int, Opt(help="With --stats: seed of the subset and of the random baselines.")] = 0,
    stats_out: Annotated[Optional[Path], Opt(help="With --stats: the JSON to write [default: <cache>.stats.json "
                                             "beside it; for a URL, in this folder].")] = None,
) -> None:
    """Print what a cache holds: dataset, teachers (shape, bytes on disk, compression), completeness.

    Examples:

      rsmtdf inspect cache/loveda

      rsmtdf inspect cache/loveda --stats --samples 200

      rsmtdf inspect --estimate -r pipeline/loveda.toml --root /data/LoveDA --views 8

      rsmtdf inspect --verify cache/loveda   # non-zero exit when a shard is damaged
    """
    from .cache.store import FeatureCache
    from .config.schema import at_least, check_option

    if estimate:
        from .inspect.summary import estimate_recipe

        check_option("--probe", probe, int, at_least(1))
        return typer.echo(estimate_recipe(_recipe(recipe, sets, root, teacher, views, crop_size, storage),
                                          _weights(teacher_weights), probe))
    if path is None:
        raise RsmtdfError("inspect: give a cache PATH, or --estimate with extraction options")
    if (samples is not None or stats_out is not None) and not stats:
        raise RsmtdfError("--samples/--stats-out: only with --stats")
    check_option("--samples", samples, int, at_least(1))
    cache = FeatureCache.open(path)
    if verify:
        from .cache.verify import verify_cache

        report = verify_cache(cache)
        for line in report.lines():
            typer.echo(line)
        if problem := report.problem():
            raise RsmtdfError(problem)
        return typer.echo(report.summary())
    from .inspect.summary import format_cache

    typer.echo(format_cache(cache))
    if stats:
        from .inspect.stats import format_stats, inspect_stats

        result, out = inspect_stats(cache, samples, seed, stats_out)
        typer.echo("\n" + format_stats(result, red=lambda s: typer.style(s, fg="red", bold=True)))
        typer.echo(f"inspected {result['samples']} samples × {result['views']} views in {result['seconds']:.1f} s; "
                   f"wrote {out}")


@app.command("show")
def show(
    path: Annotated[str, typer.Argument(help="Cache path or URL.")],
    sample: Annotated[Optional[str], Opt("--sample", help="Sample id (see the cache's ids).")] = None,
    index: Annotated[Optional[int], Opt("--index", help="Sample by its position in the cache (0-based).")] = None,
    random: Annotated[Optional[int], Opt("--random", help="This many samples drawn at random (--seed).")] = None,
    seed: Annotated[int, Opt(help="With --random: seed of the draw.")] = 0,
    out: Annotated[Optional[Path], Opt("--out", help="PNG to write [default: <sample>.png]; with --random, a folder "
                                       "[default: this one].")] = None,
) -> None:
    """Write a PNG of a sample's stored views beside a PCA-to-RGB picture of each teacher's features.

    Example: rsmtdf show cache/loveda --sample Train/Rural/0_1 --out rural0.png
    """
    from .cache.store import FeatureCache
    from .inspect.show import show_samples

    for target in show_samples(FeatureCache.open(path), sample, index, random, seed, out):
        typer.echo(f"wrote {target}")


@app.command("report")
def report(
    path: Annotated[str, typer.Argument(help="Cache path or URL.")],
    out: Annotated[Path, Opt("--output", "-o", help="Folder for index.html and its PNGs (replaced whole if it holds "
                             "an earlier report).")] = Path("report"),
    gallery: Annotated[int, Opt(help="Samples in the gallery.")] = 6,
    samples: Annotated[Optional[int], Opt(help="Statistics over a random subset of this many samples.")] = None,
    seed: Annotated[int, Opt(help="Seed of the gallery, the subset and the random baselines.")] = 0,
) -> None:
    """Write a static HTML report of a cache: summary, statistics as figures, a gallery of views with
    their teachers' PCA pictures and masks. Opens from disk, offline.

    Example: rsmtdf report cache/loveda -o report/ --gallery 8 --samples 500
    """
    from .inspect.html import report_cache

    done = report_cache(path, out, gallery, samples, seed)
    typer.echo(f"report of {done['samples']} samples, gallery of {gallery} ({done['gallery']} views), "
               f"{done['images']} images: open {out / 'index.html'}")


@app.command("make-splits")
def make_splits_cmd(
    recipe: RecipeFile = None, sets: Sets = None, root: Root = None,
    out: Annotated[Optional[Path], Opt(help="Folder for the lists [default: the recipe's splits].")] = None,
    seed: Annotated[int, Opt(help="Seed of the shuffle (the reference used none).")] = 0,
    val_fraction: Annotated[Optional[float], Opt(help="Hold out this share of the training scenes as val/test (for "
                                                 "datasets without a Val/ folder).")] = None,
    allow_missing_classes: Annotated[bool, Opt(help="Write labeled lists in which a class never occurs.")] = False,
) -> None:
    """Write DWL-protocol split lists: 1 %, 5 %, 10 % labeled per domain; official Val 50/50 val/test,
    with the labeled pixels per class of each list (class_counts.json); a labeled list missing a
    class is refused unless --allow-missing-classes.

    Example: rsmtdf make-splits -r pipeline/loveda.toml --root /data/LoveDA
    """
    from .data.splits import write_checked_splits
    from .pipeline.resolve import resolve_dataset

    r = _recipe(recipe, sets, root)
    typer.echo(write_checked_splits(resolve_dataset(r), out or Path(r.data.splits), seed, val_fraction,
                                    allow_missing_classes))


@app.command("check-splits")
def check_splits_cmd(
    recipe: RecipeFile = None, sets: Sets = None, root: Root = None,
    splits: Annotated[Optional[Path], Opt(help="Folder of lists [default: the recipe's splits].")] = None,
) -> None:
    """Check that every name in the split lists is a sample of the dataset folder (e.g. the committed
    DWL lists against your DWL-prepared Potsdam or DeepGlobe).

    Example: rsmtdf check-splits -r pipeline/potsdam.toml --root /data/Potsdam
    """
    from .data.splits import check_lists
    from .pipeline.resolve import resolve_dataset

    r = _recipe(recipe, sets, root)
    target, dataset = splits or Path(r.data.splits), resolve_dataset(r)
    counts = check_lists(target, dataset)
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))
    typer.echo(f"all {sum(counts.values())} names in {len(counts)} lists of {target} resolve in {dataset.root}")


@app.command("stats")
def stats_cmd(recipe: RecipeFile = None, sets: Sets = None, root: Root = None,
              progress: Annotated[bool, Opt(help="Show a progress bar.")] = True) -> None:
    """Per-band statistics (valid pixels, mean, std, 2nd/98th percentile, min, max) of every band of
    the training tiles, written as band_stats.json beside the split lists; `[data] scaling` uses them.

    Example: rsmtdf stats -r pipeline/mydata.toml
    """
    from .data.bandstats import summary_table
    from .pipeline.resolve import dataset_stats

    stats, path, tiles = dataset_stats(_recipe(recipe, sets, root), progress)
    typer.echo(summary_table(stats))
    typer.echo(f"wrote statistics of {len(stats['bands'])} bands ({stats['dtype']}) over {tiles} tiles to {path}")


@recipe_app.command("show")
def recipe_show(recipe: RecipeFile = None, sets: Sets = None) -> None:
    """Print the recipe resolved (defaults filled in, --set applied, every value checked) as TOML.

    Example: rsmtdf recipe show -r pipeline/loveda.toml --set train.lr=1.25e-6 --set views.count=4
    """
    typer.echo(_recipe(recipe, sets).to_toml(), nl=False)


TRAIN_OPTIONS = {"train.max_steps": "--max-steps", "train.epochs": "--epochs", "train.batch_size": "--batch-size",
                 "train.lr": "--lr", "train.workers": "--workers", "train.seed": "--seed"}


@app.command("train")
def train(
    cache: Annotated[Optional[str], Opt("--cache", help="Finalized feature cache (path or URL); without one, "
                                        "--teachers online runs from the recipe.")] = None,
    split: Annotated[str, Opt("--split", help="Labeled split: 1pct, 5pct, 10pct, ...")] = "5pct",
    recipe: RecipeFile = None, sets: Sets = None,
    run: Annotated[Optional[Path], Opt("--run-dir", help="Run folder [default: runs/<dataset>-<split>].")] = None,
    teachers: Annotated[str, Opt("--teachers", help="cached, online or online-strong.")] = "cached",
    teacher_weights: TeacherWeights = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run from RUN/latest.pt.")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Move an existing run in RUN aside (never deleted) and start "
                                   "afresh.")] = False,
    new_schedule: Annotated[bool, Opt("--new-schedule", help="With --resume: accept a changed total schedule (steps, "
                                      "epochs, batch).")] = False,
    max_steps: Annotated[Optional[int], Opt(help="Stop the schedule after this many steps.")] = None,
    epochs: Annotated[Optional[int], Opt(help="Epochs (overrides the recipe).")] = None,
    batch_size: Annotated[Optional[int], Opt(help="Batch per process (overrides the recipe).")] = None,
    lr: Annotated[Optional[float], Opt(help="Encoder learning rate (overrides the recipe).")] = None,
    checkpoint_every: Annotated[int, Opt(help="Also write latest.pt every N steps (0: at evaluations).")] = 0,
    workers: Annotated[Optional[int], Opt(help="Loader processes per rank.")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed (overrides the recipe).")] = None,
    device: Device = "auto",
) -> None:
    """Train the RS-MTDF student and fusion decoder semi-supervised from cached teacher targets.

    Without -r the cache's own recipe is used (--set moves its data: --set data.root=PATH); a recipe
    whose data, views or teachers differ from the cache's is refused, naming the field. A run
    folder that holds a run is never overwritten: continue it with --resume, or move it aside with
    --overwrite.

    Examples:

      rsmtdf train --cache cache/loveda --split 5pct

      torchrun --nproc-per-node 4 -m rsmtdf.cli train --cache cache/loveda --split 1pct -r pipeline/loveda.toml

      rsmtdf train --cache cache/loveda --split 5pct --teachers online-strong   # the paper's code's semantics
    """
    from .config.recipe import load_recipe
    from .config.schema import at_least, check_option
    from .train.run import train_recipe

    check_option("--checkpoint-every", checkpoint_every, int, at_least(0))
    overrides = dict(zip(TRAIN_OPTIONS, (max_steps, epochs, batch_size, lr, workers, seed)))
    result = train_recipe(cache, split, None if recipe is None else load_recipe(recipe, sets), sets, overrides,
                          TRAIN_OPTIONS, run, lambda line: typer.echo(line, err=True), mode=teachers, device=device,
                          teacher_weights=_weights(teacher_weights), resume=resume, checkpoint_every=checkpoint_every,
                          overwrite=overwrite, new_schedule=new_schedule)
    if result["rank"] == 0:
        typer.echo(result["line"])


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Checkpoint,
    split: Annotated[str, Opt("--split", help="val or test (or any list in the split folder).")] = "test",
    mode: Annotated[str, Opt("--mode", help="whole (tile at once) or sliding (crop windows).")] = "whole",
    protocol: Annotated[Optional[str], Opt("--protocol", help="rsmtdf or reference (the paper's code's evaluation) "
                                           "[default: the recipe's [eval] protocol].")] = None,
    model: Annotated[Optional[str], Opt("--model", help="Headline model, ema or student [default: the protocol's]; "
                                        "both are reported.")] = None,
    recipe: Annotated[Optional[Path], Opt("--recipe", "-r", help="Take [eval] from this recipe instead of the "
                                          "checkpoint's.")] = None,
    sets: Annotated[Optional[list[str]], Opt("--set", help="Where the data and lists are now, if they moved: "
                                             "--set data.root=PATH, --set data.splits=PATH.")] = None,
    out: Annotated[Optional[Path], Opt("--out", help="JSON of the metrics [default: beside the checkpoint].")] = None,
    cache: Annotated[Optional[str], Opt("--cache", help="Evaluate on this cache's dataset and splits instead.")] = None,
    pictures: Annotated[int, Opt(help="Write image | truth | prediction PNGs of this many tiles.")] = 0,
    device: Device = "auto",
) -> None:
    """Evaluate a checkpoint's student and EMA models: mIoU, per-class IoU and F1, OA and kappa, as a
    table and as strict JSON. The data and split lists must be those the checkpoint records.

    Examples:

      rsmtdf evaluate --checkpoint runs/loveda-5pct/best.pt --split test --mode sliding

      rsmtdf evaluate --checkpoint runs/potsdam-5pct/best.pt --protocol reference   # the paper's numbers
    """
    from .config.recipe import load_recipe
    from .evaluate.evaluator import evaluate_to_file, format_report

    section = load_recipe(recipe).eval if recipe is not None else None
    report, out, folder = evaluate_to_file(checkpoint, split, mode, out, pictures, protocol=protocol, model=model,
                                           cache=cache, eval_section=section, sets=sets, device=device)
    typer.echo(format_report(report))
    typer.echo(f"wrote {out}" + (f" and pictures in {folder}" if pictures else ""))


@app.command("predict")
def predict_cmd(
    images: Annotated[list[str], typer.Argument(help="Rasters to map: files, folders, globs (GeoTIFF, VRT, JPEG2000, "
                                                "PNG; any size).")],
    checkpoint: Checkpoint,
    out: Annotated[Path, Opt("--out", help="Folder for the class maps (<name>.tif).")] = Path("predictions"),
    model: Annotated[str, Opt("--model", help="ema or student.")] = "ema",
    window: Annotated[Optional[int], Opt(help="Window size in pixels [default: the model's crop size].")] = None,
    stride: Annotated[Optional[int], Opt(help="Window stride in pixels [default: 2/3 of the window].")] = None,
    batch_size: Annotated[int, Opt("--batch-size", help="Windows per forward pass.")] = 8,
    probabilities: Annotated[bool, Opt("--probabilities", help="Also write <name>.probabilities.tif (per class, "
                                       "uint8).")] = False,
    confidence: Annotated[bool, Opt("--confidence", help="Also write <name>.confidence.tif (top class, uint8).")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Map scenes whose output is already complete again.")] = False,
    device: Device = "auto",
) -> None:
    """Map whole scenes, streamed window by window: one Cloud-Optimized GeoTIFF of class indices per
    input (255 = nodata), with its CRS, transform, colour table and class names.

    Example: rsmtdf predict scenes/ --checkpoint runs/loveda-5pct/best.pt --out maps/ --confidence
    """
    from .predict.mapping import map_scenes

    mapped, total, tiling = map_scenes(images, checkpoint, out, model, window, stride, batch_size, probabilities,
                                       confidence, overwrite, device, typer.echo,
                                       lambda line: typer.echo(f"error: {line}", err=True))
    typer.echo(f"{mapped} of {total} inputs mapped with {checkpoint} ({model}, window {tiling.window}, stride "
               f"{tiling.stride}) into {out}")
    if mapped < total:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    checkpoint: Checkpoint,
    fmt: Annotated[str, Opt("--format", help="safetensors or onnx.")] = "safetensors",
    output: Annotated[Optional[Path], Opt("--output", "-o", help="File to write [default: beside the checkpoint, "
                                          "best.safetensors or best.onnx].")] = None,
    ema: Annotated[bool, Opt("--ema", help="Export the EMA model instead of the student.")] = False,
) -> None:
    """Write one trained model for serving (no optimiser or training state) and a JSON sidecar of its
    identity, config, classes, bands, scaling and normalisation. ONNX takes any batch and any height
    and width that are multiples of the patch; `predict` and `evaluate` take a safetensors export.

    Example: rsmtdf export --checkpoint runs/loveda-5pct/best.pt --format onnx
    """
    from .predict.export import export_model

    model_file, sidecar = export_model(checkpoint, fmt, output, ema)
    typer.echo(f"wrote {model_file} ({'EMA' if ema else 'student'} model) and {sidecar}")


@app.command("bench")
def bench(
    part: Annotated[str, typer.Argument(help="step, extract, read, size, codec, feed, predict, tiles or all.")] = "all",
    quick: Annotated[bool, Opt("--quick", help="Tiny sizes for CI (about a minute on CPU).")] = False,
    full: Annotated[bool, Opt("--full", help="The paper's sizes: crop 518, DINOv2-S student, DINOv2-B + CLIP-L.")] = False,
    out: Annotated[Optional[Path], Opt("--out", help="Write the results as JSON here.")] = None,
    device: Device = "auto",
    threads: Annotated[Optional[int], Opt(help="torch intra-op threads [default: torch's].")] = None,
) -> None:
    """Measure the goals of DESIGN §6 as ratios of two timings taken in this run, and print a table.

    Example: rsmtdf bench all --out bench.json
    """
    from .bench import run_parts

    if quick and full:
        raise RsmtdfError("bench: give --quick or --full, not both")
    typer.echo(run_parts(part, "quick" if quick else "full" if full else "default", device, out,
                         echo=lambda line: typer.echo(line, err=True), threads=threads))


@app.command("demo")
def demo(workdir: Annotated[Path, Opt(help="Where the generated data, cache and run go.")] = Path("runs/demo")) -> None:
    """The whole pipeline offline on generated land-cover scenes, with EfficientNet-Lite teachers.

    Example: rsmtdf demo --workdir runs/demo
    """
    from .demo import run_demo

    run_demo(workdir, echo=typer.echo)


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
