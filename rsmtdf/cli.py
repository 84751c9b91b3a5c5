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
app.add_typer(recipe_app := typer.Typer(no_args_is_help=True, help="Recipes: print one resolved."), name="recipe")
Arg = typer.Argument


def opt(kind, help: str, *names: str):  # an option's annotation: typer reads its type and help from it
    return Annotated[kind, typer.Option(*names, help=help)]


RecipeFile = opt(Optional[Path], "Recipe TOML (pipeline/*.toml).", "--recipe", "-r")
Sets = opt(Optional[list[str]], "Override any recipe key: SECTION.KEY=VALUE (TOML value; repeat), e.g. --set "
           "train.lr=1e-5 or --set data.root=/data/LoveDA.", "--set")
Root = opt(Optional[Path], "Dataset folder (overrides the recipe).")
Teachers = opt(Optional[list[str]], "Teacher name (repeat); overrides the recipe.", "--teacher")
Weights = opt(Optional[list[str]], "NAME=PATH of a weights file.", "--teacher-weights")
Views = opt(Optional[int], "Views per sample (A).", "--views")
Crop = opt(Optional[int], "View crop size in pixels.", "--crop-size")
Storage = opt(Optional[str], "float16, int8, int4 (groups), pca (¼ of float16) or auto (fewest bytes at min_cosine).")
Device = opt(str, "auto, cpu, cuda or cuda:N (auto: this process's GPU if there is one, else cpu).")
Checkpoint = opt(Path, "A run's best.pt or latest.pt.", "--checkpoint")
Cache = Annotated[str, Arg(help="Cache path or URL.")]
EXTRACTION = {"data.root": "--root", "views.count": "--views", "views.crop_size": "--crop-size",
              "teachers.names": "--teacher", "teachers.storage": "--storage"}
TRAINING = {"train.max_steps": "--max-steps", "train.epochs": "--epochs", "train.batch_size": "--batch-size",
            "train.lr": "--lr", "train.workers": "--workers", "train.seed": "--seed"}


def _recipe(recipe: Path | None, sets: list[str] | None, root: Path | None = None, teacher: list[str] | None = None,
            views: int | None = None, crop_size: int | None = None, storage: str | None = None):
    """The recipe file (or the defaults) with `--set` and the extraction options applied, checked."""
    from .config.recipe import load_recipe
    values = dict(zip(EXTRACTION, (None if root is None else str(root), views, crop_size, teacher or None, storage)))
    return load_recipe(recipe, sets).override(values, origin=EXTRACTION)


def _weights(items: list[str] | None) -> dict[str, str]:
    from .pipeline.resolve import teacher_weights
    return teacher_weights(items)


def _at_least(minimum: int, **options: int | None) -> None:
    from .config.schema import at_least, check_option
    for name, value in options.items():
        check_option(f"--{name.replace('_', '-')}", value, int, at_least(minimum))


@app.command("extract-features")
def extract_features(
    recipe: RecipeFile = None, sets: Sets = None, root: Root = None, teacher: Teachers = None, views: Views = None,
    crop_size: Crop = None, storage: Storage = None, teacher_weights: Weights = None,
    output: opt(Optional[str], "Cache path or URL (default: cache/<recipe name>).", "--output", "-o") = None,
    shard_samples: opt(Optional[int], "Samples per shard (default: ~256 MB shards).") = None,
    shard_index: opt(Optional[int], "This worker's index (default: RANK or SLURM_PROCID or 0).") = None,
    num_shards: opt(Optional[int], "Workers in all (default: WORLD_SIZE or SLURM_NTASKS or 1).") = None,
    batch_size: opt(int, "Views per teacher forward pass.") = 8, device: Device = "auto",
    workers: opt(int, "Loader processes decoding tiles and rendering views.") = 2,
    repair: opt(bool, "Verify this worker's shards and extract the damaged ones again.", "--repair") = False,
) -> None:
    """Run the frozen teachers once over every training tile and its views; write a Zarr cache (resumable; workers
    own disjoint shards). Example: rsmtdf extract-features -r pipeline/loveda.toml --root /data/LoveDA"""
    from .pipeline.extract import extract_recipe
    _at_least(1, shard_samples=shard_samples, num_shards=num_shards, batch_size=batch_size)
    _at_least(0, shard_index=shard_index, workers=workers)
    summary, _ = extract_recipe(_recipe(recipe, sets, root, teacher, views, crop_size, storage), output,
                                _weights(teacher_weights), shard_index=shard_index, num_shards=num_shards,
                                shard_samples=shard_samples, batch_size=batch_size, num_workers=workers,
                                device=device, repair=repair)
    typer.echo(summary.line())


@app.command("inspect")
def inspect_cache(
    path: Annotated[Optional[str], Arg(help="Cache path or URL.")] = None,
    estimate: opt(bool, "Predict the size of a cache before extracting it.", "--estimate") = False,
    probe: opt(int, "With --estimate: samples to run the teachers on to measure compression.") = 4,
    verify: opt(bool, "Read every chunk, check its checksum, list damaged shards.", "--verify") = False,
    recipe: RecipeFile = None, sets: Sets = None, root: Root = None, teacher: Teachers = None, views: Views = None,
    crop_size: Crop = None, storage: Storage = None, teacher_weights: Weights = None,
    stats: opt(bool, "Feature statistics, view consistency, teacher agreement (+ JSON).", "--stats") = False,
    samples: opt(Optional[int], "With --stats: a random subset of this many samples.") = None,
    seed: opt(int, "With --stats: seed of the subset and of the random baselines.") = 0,
    stats_out: opt(Optional[Path], "With --stats: the JSON (default: <cache>.stats.json).") = None,
) -> None:
    """Print what a cache holds: dataset, teachers (shape, bytes on disk, compression), completeness. Examples:
    rsmtdf inspect cache/loveda [--stats | --verify]; rsmtdf inspect --estimate -r pipeline/loveda.toml --views 8"""
    from .inspect.summary import estimate_recipe, inspect_cache as inspect
    if estimate:
        _at_least(1, probe=probe)
        return typer.echo(estimate_recipe(_recipe(recipe, sets, root, teacher, views, crop_size, storage),
                                          _weights(teacher_weights), probe))
    if path is None:
        raise RsmtdfError("inspect: give a cache PATH, or --estimate with extraction options")
    if (samples is not None or stats_out is not None) and not stats:
        raise RsmtdfError("--samples/--stats-out: only with --stats")
    _at_least(1, samples=samples)
    inspect(path, verify, stats, samples, seed, stats_out, typer.echo, lambda t: typer.style(t, fg="red", bold=True))


@app.command("show")
def show(path: Cache, sample: opt(Optional[str], "Sample id.", "--sample") = None,
         index: opt(Optional[int], "Sample by its position in the cache.", "--index") = None,
         random: opt(Optional[int], "This many samples drawn at random.", "--random") = None,
         seed: opt(int, "Seed of --random.") = 0, out: opt(Optional[Path], "PNG (--random: folder).", "--out") = None):
    """Write a PNG of a sample's stored views beside a PCA-to-RGB picture of each teacher's features. Example:
    rsmtdf show cache/loveda --sample Train/Rural/0_1 --out rural0.png"""
    from .inspect.show import show_samples
    for target in show_samples(path, sample, index, random, seed, out):
        typer.echo(f"wrote {target}")


@app.command("report")
def report(path: Cache, out: opt(Path, "Folder of the report.", "--output", "-o") = Path("report"),
           gallery: opt(int, "Samples in the gallery.") = 6,
           samples: opt(Optional[int], "Statistics over a random subset of this many samples.") = None,
           seed: opt(int, "Seed of the gallery, the subset and the random baselines.") = 0) -> None:
    """Write a static HTML report of a cache (statistics as figures, a gallery of views, PCA pictures and masks)
    that opens from disk, offline. Example: rsmtdf report cache/loveda -o report/ --gallery 8 --samples 500"""
    from .inspect.html import report_cache
    typer.echo(report_cache(path, out, gallery, samples, seed))


@app.command("make-splits")
def make_splits_cmd(
    recipe: RecipeFile = None, sets: Sets = None, root: Root = None,
    out: opt(Optional[Path], "Folder for the lists (default: the recipe's splits).") = None,
    seed: opt(int, "Seed of the shuffle (the reference used none).") = 0,
    val_fraction: opt(Optional[float], "Hold out this share of the training scenes as val/test.") = None,
    allow_missing_classes: opt(bool, "Write labeled lists in which a class never occurs.") = False,
) -> None:
    """Write DWL-protocol split lists (1 %, 5 %, 10 % labeled per domain; Val 50/50 val/test) with each list's
    labeled pixels per class. Example: rsmtdf make-splits -r pipeline/loveda.toml --root /data/LoveDA"""
    from .data.splits import write_checked_splits
    from .pipeline.resolve import resolve_dataset
    r = _recipe(recipe, sets, root)
    typer.echo(write_checked_splits(resolve_dataset(r), out or Path(r.data.splits), seed, val_fraction,
                                    allow_missing_classes))


@app.command("check-splits")
def check_splits_cmd(recipe: RecipeFile = None, sets: Sets = None, root: Root = None,
                     splits: opt(Optional[Path], "Folder of lists (default: the recipe's).") = None) -> None:
    """Check that every name in the split lists is a sample of the dataset folder. Example: rsmtdf check-splits -r
    pipeline/potsdam.toml --root /data/Potsdam"""
    from .pipeline.resolve import check_splits
    typer.echo(check_splits(_recipe(recipe, sets, root), splits))


@app.command("stats")
def stats_cmd(recipe: RecipeFile = None, sets: Sets = None, root: Root = None,
              progress: opt(bool, "Show a progress bar.") = True) -> None:
    """Per-band statistics of the training tiles (valid pixels, mean, std, 2nd/98th percentile, min, max) into
    band_stats.json beside the split lists, for `\\[data] scaling`. Example: rsmtdf stats -r pipeline/mine.toml"""
    from .pipeline.resolve import dataset_stats
    typer.echo(dataset_stats(_recipe(recipe, sets, root), progress))


@recipe_app.command("show")
def recipe_show(recipe: RecipeFile = None, sets: Sets = None) -> None:
    """Print the recipe resolved (defaults filled in, --set applied, every value checked) as TOML."""
    typer.echo(_recipe(recipe, sets).to_toml(), nl=False)


@app.command("train")
def train(
    cache: opt(Optional[str], "Finalized feature cache (path or URL).", "--cache") = None,
    split: opt(str, "Labeled split: 1pct, 5pct, 10pct, ...", "--split") = "5pct",
    recipe: RecipeFile = None, sets: Sets = None,
    run: opt(Optional[Path], "Run folder (default: runs/<dataset>-<split>).", "--run-dir") = None,
    teachers: opt(str, "cached, online or online-strong.", "--teachers") = "cached",
    teacher_weights: Weights = None, device: Device = "auto",
    resume: opt(bool, "Continue the run from RUN/latest.pt.", "--resume") = False,
    overwrite: opt(bool, "Move a run in RUN aside (never deleted), start afresh.", "--overwrite") = False,
    new_schedule: opt(bool, "With --resume: accept a changed total schedule.", "--new-schedule") = False,
    max_steps: opt(Optional[int], "Stop the schedule after this many steps.") = None,
    epochs: opt(Optional[int], "Epochs.") = None, batch_size: opt(Optional[int], "Batch per process.") = None,
    lr: opt(Optional[float], "Encoder learning rate.") = None, seed: opt(Optional[int], "Seed of every draw.") = None,
    checkpoint_every: opt(int, "Also write latest.pt every N steps (0: at evaluations).") = 0,
    workers: opt(Optional[int], "Loader processes per rank.") = None,
) -> None:
    """Train the RS-MTDF student from cached teacher targets, with the cache's own recipe without -r (--set
    data.root=PATH if the data moved); a recipe whose data, views or teachers differ from the cache's is refused.
    A run is never overwritten: --resume it, or move it aside with --overwrite. The paper's batch 32 + 32 on 1, 2 or 4 GPUs: --set train.global_batch=32 (accumulates 4, 2 or 1 micro-batches of 8 + 8)."""
    from .config.recipe import load_recipe
    from .train.run import train_recipe
    _at_least(0, checkpoint_every=checkpoint_every)
    overrides = dict(zip(TRAINING, (max_steps, epochs, batch_size, lr, workers, seed)))
    result = train_recipe(cache, split, None if recipe is None else load_recipe(recipe, sets), sets, overrides,
                          TRAINING, run, lambda line: typer.echo(line, err=True), mode=teachers, device=device,
                          teacher_weights=_weights(teacher_weights), resume=resume, checkpoint_every=checkpoint_every,
                          overwrite=overwrite, new_schedule=new_schedule)
    if result["rank"] == 0:
        typer.echo(result["line"])


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Checkpoint,
    split: opt(str, "val or test (or any list in the split folder).", "--split") = "test",
    mode: opt(str, "whole (tile at once) or sliding (crop windows).", "--mode") = "whole",
    protocol: opt(Optional[str], "rsmtdf or reference (default: the recipe's).", "--protocol") = None,
    model: opt(Optional[str], "Headline model, ema or student; both are reported.", "--model") = None,
    recipe: opt(Optional[Path], "Take the \\[eval] section from this recipe.", "--recipe", "-r") = None,
    sets: opt(Optional[list[str]], "data.root=PATH, data.splits=PATH: moved data.", "--set") = None,
    out: opt(Optional[Path], "JSON of the metrics (default: beside the checkpoint).", "--out") = None,
    cache: opt(Optional[str], "Evaluate on this cache's dataset and splits instead.", "--cache") = None,
    pictures: opt(int, "Write image | truth | prediction PNGs of this many tiles.") = 0,
    device: Device = "auto",
) -> None:
    """Evaluate a checkpoint's student and EMA (mIoU, per-class IoU and F1, OA, kappa) as a table and strict JSON,
    on the data and lists it records. Example: rsmtdf evaluate --checkpoint runs/loveda-5pct/best.pt --mode sliding"""
    from .config.recipe import load_recipe
    from .evaluate.evaluator import evaluate_to_file, format_report
    section = load_recipe(recipe).eval if recipe is not None else None
    report, out, folder = evaluate_to_file(checkpoint, split, mode, out, pictures, protocol=protocol, model=model,
                                           cache=cache, eval_section=section, sets=sets, device=device)
    typer.echo(format_report(report))
    typer.echo(f"wrote {out}" + (f" and pictures in {folder}" if pictures else ""))


@app.command("predict")
def predict_cmd(
    images: Annotated[list[str], Arg(help="Rasters to map: files, folders, globs (GeoTIFF, VRT, JPEG2000, PNG).")],
    checkpoint: Checkpoint,
    out: opt(Path, "Folder for the class maps (<name>.tif).", "--out") = Path("predictions"),
    model: opt(str, "ema or student.", "--model") = "ema",
    window: opt(Optional[int], "Window size in pixels (default: the model's crop size).") = None,
    stride: opt(Optional[int], "Window stride in pixels (default: 2/3 of the window).") = None,
    batch_size: opt(int, "Windows per forward pass.", "--batch-size") = 8,
    probabilities: opt(bool, "Also write <name>.probabilities.tif.", "--probabilities") = False,
    confidence: opt(bool, "Also write <name>.confidence.tif.", "--confidence") = False,
    overwrite: opt(bool, "Map scenes whose output is complete again.", "--overwrite") = False, device: Device = "auto",
) -> None:
    """Map whole scenes, streamed window by window, into one Cloud-Optimized GeoTIFF of classes per input (255 =
    nodata). Example: rsmtdf predict scenes/ --checkpoint runs/loveda-5pct/best.pt --out maps/ --confidence"""
    from .predict.mapping import map_scenes
    line, every = map_scenes(images, checkpoint, out, model, window, stride, batch_size, probabilities, confidence,
                             overwrite, device, typer.echo, lambda line: typer.echo(f"error: {line}", err=True))
    typer.echo(line)
    if not every:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(checkpoint: Checkpoint, fmt: opt(str, "safetensors or onnx.", "--format") = "safetensors",
               output: opt(Optional[Path], "File to write.", "--output", "-o") = None,
               ema: opt(bool, "Export the EMA model instead of the student.", "--ema") = False) -> None:
    """Write one trained model for serving and a JSON sidecar of its identity, config, classes, bands, scaling and
    normalisation. Example: rsmtdf export --checkpoint runs/loveda-5pct/best.pt --format onnx"""
    from .predict.export import export_model
    model_file, sidecar = export_model(checkpoint, fmt, output, ema)
    typer.echo(f"wrote {model_file} ({'EMA' if ema else 'student'} model) and {sidecar}")


@app.command("bench")
def bench(part: Annotated[str, Arg(help="step, extract, read, size, codec, feed[:pca|int4|int8], predict, tiles, storage, memory, all.")] = "all",
          quick: opt(bool, "Tiny sizes for CI (about a minute on CPU).", "--quick") = False,
          full: opt(bool, "The paper's sizes (crop 518, DINOv2-S, DINOv2-B + CLIP-L).", "--full") = False,
          out: opt(Optional[Path], "Write the results as JSON here.", "--out") = None,
          device: Device = "auto", threads: opt(Optional[int], "torch intra-op threads.") = None) -> None:
    """Measure the goals of DESIGN §6 as ratios of two timings taken in this run, and print a table."""
    from .bench import run_parts
    typer.echo(run_parts(part, quick, full, device, out, echo=lambda line: typer.echo(line, err=True), threads=threads))


@app.command("demo")
def demo(workdir: opt(Path, "Where the generated data, cache and run go.") = Path("runs/demo")) -> None:
    """The whole pipeline offline on generated land-cover scenes, with EfficientNet-Lite teachers."""
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
