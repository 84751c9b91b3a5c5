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
Root = Annotated[Optional[Path], typer.Option(help="Dataset folder (overrides the recipe).")]
Output = Annotated[Optional[str], typer.Option("--output", "-o", help="Cache path or fsspec URL [default: cache/<dataset>].")]
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
    """What an extraction (or its estimate) is: recipe plus command-line overrides, resolved once."""

    def __init__(self, recipe: Path | None, root: Path | None, output: str | None, teacher: list[str] | None,
                 teacher_weights: list[str] | None, views: int | None, crop_size: int | None,
                 storage: str | None) -> None:
        from .recipe import load_recipe

        self.recipe = load_recipe(recipe)
        data, tconf = self.recipe["data"], self.recipe["teachers"]
        if root is not None:
            data["root"] = str(root)
        if views is not None:
            self.recipe["views"]["count"] = views
        if crop_size is not None:
            self.recipe["views"]["crop_size"] = crop_size
        if teacher:
            tconf["names"] = teacher
        if storage is not None:
            tconf["storage"] = storage
        if tconf["storage"] not in ("float16", "int8"):
            raise RsmtdfError(f"--storage {tconf['storage']}: choose float16 or int8")
        self.output = output or f"cache/{data['dataset']}"
        self.weights = {}
        for item in teacher_weights or []:
            name, sep, path = item.partition("=")
            if not sep:
                raise RsmtdfError(f"--teacher-weights {item}: expected NAME=PATH")
            self.weights[name] = path

    def dataset(self):
        from .data import open_dataset

        data = self.recipe["data"]
        return open_dataset(data["dataset"], data["root"], data["classes"])

    def spec(self):
        from .recipe import view_spec

        return view_spec(self.recipe)

    def teachers(self):
        from .teachers import build_teachers

        t = self.recipe["teachers"]
        return build_teachers(t["names"], self.weights, sizes=t["sizes"])


@app.command("extract-features")
def extract_features(
    recipe: Recipe = None, root: Root = None, output: Output = None, teacher: Teachers = None,
    teacher_weights: TeacherWeights = None, views: Views = None, crop_size: Crop = None, storage: Storage = None,
    shard_samples: ShardSamples = None,
    shard_index: Annotated[Optional[int], typer.Option(help="This worker's index [default: RANK or SLURM_PROCID or 0].")] = None,
    num_shards: Annotated[Optional[int], typer.Option(help="Workers in all [default: WORLD_SIZE or SLURM_NTASKS or 1].")] = None,
    batch_size: Annotated[int, typer.Option(help="Views per teacher forward pass.")] = 8,
    workers: Annotated[int, typer.Option(help="Loader processes decoding tiles and rendering views.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... [default: cuda if available].")] = "auto",
) -> None:
    """Run the frozen teachers once over every training tile and its views; write a Zarr cache.

    Resumable: shards already written are skipped. Several workers own disjoint shards.

    Examples:

      rsmtdf extract-features -r pipeline/loveda.toml --root /data/LoveDA

      torchrun --nproc-per-node 4 -m rsmtdf.cli extract-features -r pipeline/loveda.toml

      rsmtdf extract-features -r pipeline/loveda.toml --teacher-weights clip_vitl14=ViT-L-14.pt -o s3://bucket/loveda
    """
    import torch

    from .extract import extract

    plan = Plan(recipe, root, output, teacher, teacher_weights, views, crop_size, storage)
    index = shard_index if shard_index is not None else (_env_int("RANK", "SLURM_PROCID") or 0)
    count = num_shards if num_shards is not None else (_env_int("WORLD_SIZE", "SLURM_NTASKS") or 1)
    if device == "auto":
        local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    summary = extract(plan.dataset(), plan.recipe["data"]["splits"], plan.spec(), plan.teachers(), plan.output,
                      shard_samples=shard_samples, shard_index=index, num_shards=count, batch_size=batch_size,
                      num_workers=workers, storage=plan.recipe["teachers"]["storage"], device=device,
                      bands=tuple(plan.recipe["data"]["bands"]), max_value=plan.recipe["data"]["max_value"])
    typer.echo(summary.line())


@app.command("inspect")
def inspect_cache(
    path: Annotated[Optional[str], typer.Argument(help="Cache path or URL.")] = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Predict the size of a cache before extracting it.")] = False,
    probe: Annotated[int, typer.Option(help="With --estimate: samples to run the teachers on to measure compression.")] = 4,
    recipe: Recipe = None, root: Root = None, teacher: Teachers = None, teacher_weights: TeacherWeights = None,
    views: Views = None, crop_size: Crop = None, storage: Storage = None,
) -> None:
    """Print what a cache holds: dataset, teachers (shape, bytes on disk, compression), completeness.

    Examples:

      rsmtdf inspect cache/loveda

      rsmtdf inspect --estimate -r pipeline/loveda.toml --root /data/LoveDA --views 8
    """
    from .report import estimate_size, format_cache

    if estimate:
        plan = Plan(recipe, root, path, teacher, teacher_weights, views, crop_size, storage)
        typer.echo(estimate_size(plan, probe=probe))
        return
    if path is None:
        raise RsmtdfError("inspect: give a cache PATH, or --estimate with extraction options")
    from .cache import FeatureCache

    typer.echo(format_cache(FeatureCache.open(path)))


@app.command("show")
def show(
    path: Annotated[str, typer.Argument(help="Cache path or URL.")],
    sample: Annotated[str, typer.Option("--sample", help="Sample id (see the cache's ids).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="PNG to write [default: <sample>.png].")] = None,
) -> None:
    """Write a PNG of a sample's stored views beside a PCA-to-RGB picture of each teacher's features.

    Example:

      rsmtdf show cache/loveda --sample Train/Rural/0_1 --out rural0.png
    """
    from .cache import FeatureCache
    from .data import open_dataset
    from .show import render_sample

    cache = FeatureCache.open(path)
    ds = cache.attrs["dataset"]
    try:
        dataset = open_dataset(ds["name"], ds["root"], ds["classes"])
    except RsmtdfError:
        dataset = None  # the dataset moved: show the features alone
    out = out or Path(sample.replace("/", "_") + ".png")
    render_sample(cache, sample, out, dataset)
    typer.echo(f"wrote {out}")


@app.command("make-splits")
def make_splits_cmd(
    recipe: Recipe = None, root: Root = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the lists [default: the recipe's splits].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle (the reference used none).")] = 0,
) -> None:
    """Write DWL-protocol split lists: 1 %, 5 %, 10 % labeled per domain; official Val 50/50 val/test.

    Example:

      rsmtdf make-splits -r pipeline/loveda.toml --root /data/LoveDA
    """
    from .splits import make_splits, splits_sha256

    plan = Plan(recipe, root, None, None, None, None, None, None)
    target = out or Path(plan.recipe["data"]["splits"])
    counts = make_splits(plan.dataset(), target, seed)
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))
    typer.echo(f"wrote {len(counts)} lists to {target} (sha256 {splits_sha256(target)[:12]})")


@app.command("train")
def train(
    cache: Annotated[Optional[str], typer.Option("--cache", help="Finalized feature cache (path or URL); "
                                                 "without one, --teachers online runs from the recipe.")] = None,
    split: Annotated[str, typer.Option("--split", help="Labeled split: 1pct, 5pct, 10pct, ...")] = "5pct",
    recipe: Recipe = None,
    run: Annotated[Optional[Path], typer.Option("--run-dir", help="Run folder [default: runs/<dataset>-<split>].")] = None,
    teachers: Annotated[str, typer.Option("--teachers", help="cached, online or online-strong.")] = "cached",
    teacher_weights: TeacherWeights = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from RUN/latest.pt.")] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop the schedule after this many steps.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (overrides the recipe).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch per process (overrides the recipe).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Encoder learning rate (overrides the recipe).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Also write latest.pt every N steps (0: at evaluations).")] = 0,
    workers: Annotated[Optional[int], typer.Option(help="Loader processes per rank.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (overrides the recipe).")] = None,
) -> None:
    """Train the RS-MTDF student and fusion decoder semi-supervised from cached teacher targets.

    The dataset, split lists and views come from the cache's attributes.

    Examples:

      rsmtdf train --cache cache/loveda --split 5pct

      torchrun --nproc-per-node 4 -m rsmtdf.cli train --cache cache/loveda --split 1pct -r pipeline/loveda.toml

      rsmtdf train --cache cache/loveda --split 5pct --teachers online-strong   # the paper's code's semantics
    """
    from .recipe import load_recipe
    from .train import Trainer, setup_distributed

    r = load_recipe(recipe)
    for key, value in (("max_steps", max_steps), ("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                       ("workers", workers), ("seed", seed)):
        if value is not None:
            r["train"][key] = value
    if cache is None and recipe is None:
        raise RsmtdfError("train: give --cache, or a recipe (-r) with --teachers online to train without a cache")
    if recipe is None:  # no recipe: take what the cache was made with
        from .cache import FeatureCache

        a = FeatureCache.open(cache).attrs
        r["data"]["dataset"], r["views"]["crop_size"] = a["dataset"]["name"], a["views"]["crop_size"]
        r["teachers"]["names"] = [t["name"] for t in a["teachers"]]
        r["data"]["splits"] = a["splits"]["dir"]
    device = setup_distributed()
    weights = Plan(None, None, None, None, teacher_weights, None, None, None).weights
    run = run or Path(f"runs/{r['data']['dataset']}-{split}")
    trainer = Trainer(cache, split, r, run, teachers, device, weights, resume, checkpoint_every)
    result = trainer.fit()
    if trainer.rank == 0:
        typer.echo(f"trained {result['steps']} steps ({result['steps_per_s']:.2f} steps/s), last loss "
                   f"{result.get('loss', float('nan')):.4f}; best val mIoU {trainer.best['mIoU']:.2f} "
                   f"(EMA {trainer.best['mIoU_ema']:.2f}) at step {trainer.best['step']}; checkpoints in {run}")


def _trained(checkpoint: Path, model: str, mode: str):
    """Check --mode and --model, then load the checkpoint's model onto the best device there is."""
    import torch

    from .evaluate import MODES
    from .predict import load_trained

    if mode not in MODES or model not in ("ema", "student"):
        raise RsmtdfError(f"--mode {mode} --model {model}: choose mode from {MODES} and model from ema, student")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, ident, recipe = load_trained(checkpoint, model)
    return net.to(device), ident, recipe, device


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A run's best.pt or latest.pt.")],
    split: Annotated[str, typer.Option("--split", help="val or test (or any list in the split folder).")] = "test",
    mode: Annotated[str, typer.Option("--mode", help="whole (tile at once) or sliding (crop windows).")] = "whole",
    model: Annotated[str, typer.Option("--model", help="ema or student.")] = "ema",
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON of the metrics [default: beside the checkpoint].")] = None,
    cache: Annotated[Optional[str], typer.Option("--cache", help="Evaluate on this cache's dataset and splits instead.")] = None,
    pictures: Annotated[int, typer.Option(help="Write image | truth | prediction PNGs of this many tiles.")] = 0,
) -> None:
    """Evaluate a checkpoint: mIoU, per-class IoU and F1, OA and kappa, as a table and as JSON.

    Example:

      rsmtdf evaluate --checkpoint runs/loveda-5pct/best.pt --split test --mode sliding
    """
    import json

    from .data import open_dataset
    from .evaluate import evaluate
    from .metrics import format_table
    from .splits import read_list

    net, ident, recipe, device = _trained(checkpoint, model, mode)
    ds, splits = ident["dataset"], ident["splits"]["dir"]
    if cache is not None:
        from .cache import FeatureCache

        a = FeatureCache.open(cache).attrs
        if a["dataset"]["classes"] != ident["class_names"]:
            raise RsmtdfError(f"{checkpoint}: model has {len(ident['class_names'])} classes {ident['class_names']}, "
                              f"cache {cache} has {len(a['dataset']['classes'])} {a['dataset']['classes']}")
        ds, splits = a["dataset"], a["splits"]["dir"]
    dataset = open_dataset(ds["name"], ds["root"], ds["classes"])
    out = out or checkpoint.with_name(f"{checkpoint.stem}-{split}-{mode}-{model}.json")
    metrics = evaluate(net, dataset, read_list(splits, split), len(ident["class_names"]), device, mode,
                       ident["model"]["crop_size"], tuple(recipe["data"]["bands"]), recipe["data"]["max_value"],
                       pictures=out.with_suffix(""), num_pictures=pictures)
    typer.echo(format_table(metrics, ident["class_names"]))
    out.write_text(json.dumps({"checkpoint": str(checkpoint), "split": split, "mode": mode, "model": model,
                               "classes": ident["class_names"], **metrics}, indent=2))
    typer.echo(f"wrote {out}" + (f" and pictures in {out.with_suffix('')}" if pictures else ""))


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
    from .predict import Tiling, find_scenes, load_trained, pick_device, plan_outputs, predict_many

    if model not in ("ema", "student"):
        raise RsmtdfError(f"--model {model}: choose ema or student")
    net, ident, recipe = load_trained(checkpoint, model)
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
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
