"""`rsmtdf bench`: the measured goals of DESIGN §6 as ratios of two timings taken in one run.

Six parts, each runnable alone:

- `step`    one training step in four set-ups at the same batch and crop: FixMatch without
            distillation, RS-MTDF with targets handed in from memory, RS-MTDF reading targets from
            the cache through the real loader path, RS-MTDF with online teachers; FLOP-count
            predictions (`FlopCounterMode` over the whole step: forward, backward, EMA, teachers)
            printed beside the measured ratios.
- `extract` the real `extract()` into a temporary folder vs the teachers' bare forward over the
            same crops at the same batch size.
- `read`    targets/s the `CacheReader` delivers through a default DataLoader (2 workers) vs the
            targets/s one training step consumes (2 × batch per step).
- `size`    bytes per (sample, view) on disk for float32, float16, float16 + the default compressor
            and int8 + per-token scale, each with its cosine similarity to float32, from real
            EfficientNet-Lite0 features (real weights) on the real LoveDA sample when present.
- `predict` streamed mapping: peak memory at two scene sizes, throughput against the bare forward
            (`rsmtdf/bench_predict.py`).
- `tiles`   one large scene read as tiles by window vs the same tiles as files: loading and
            extraction rates, a loader worker's peak memory at two scene sizes (`rsmtdf/bench_tiles.py`).

Speed does not depend on weights, so step/extract/read use the configured architectures with random
weights (`pretrained=False`); every figure is a ratio, with the absolute times beside it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .bench_predict import bench_predict
from .bench_tiles import bench_tiles

PARTS = ("step", "extract", "read", "size", "predict", "tiles")
LOVEDA_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "loveda-sample"


@dataclass
class Sizes:
    """One benchmark size: the paper's (`full`), a CPU-sized default, or a tiny CI one (`quick`)."""

    name: str
    crop: int
    batch: int
    student: str
    student_kwargs: dict
    translator_hidden: int
    teachers: dict[str, int]  # name -> input size
    scene_size: int
    step_scenes: int  # per domain (Urban, Rural) for the training cache
    extract_scenes: int  # per domain for the extraction benchmark
    extract_views: int
    extract_batch: int
    repeats: int
    warmup: int
    size_views: int = 4
    size_crop: int = 224


SIZES = {
    "quick": Sizes("quick", crop=56, batch=2, student="vit_small_patch14_dinov2",
                   student_kwargs={"embed_dim": 48, "depth": 4, "num_heads": 3}, translator_hidden=64,
                   teachers={"effnet_lite0": 56, "effnet_lite1": 28}, scene_size=512, step_scenes=3,
                   extract_scenes=2, extract_views=2, extract_batch=4, repeats=5, warmup=1, size_views=2,
                   size_crop=112),
    # the paper's architectures (DINOv2-S student, DINOv2-B and CLIP-L teachers) at a CPU-sized crop,
    # keeping the paper's ratio of CLIP's input to the crop (224 / 518 ≈ 56 / 126)
    "default": Sizes("default", crop=126, batch=2, student="vit_small_patch14_dinov2", student_kwargs={},
                     translator_hidden=1024, teachers={"dinov2_vitb14": 126, "clip_vitl14": 56}, scene_size=1024,
                     step_scenes=6, extract_scenes=2, extract_views=2, extract_batch=2, repeats=5, warmup=1),
    "full": Sizes("full", crop=518, batch=8, student="vit_small_patch14_dinov2", student_kwargs={},
                  translator_hidden=1024, teachers={"dinov2_vitb14": 518, "clip_vitl14": 224}, scene_size=1024,
                  step_scenes=16, extract_scenes=8, extract_views=2, extract_batch=8, repeats=5, warmup=2,
                  size_views=8, size_crop=518),
}


# ---- helpers ---------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones (seconds)."""
    return interleaved_times({"fn": fn}, repeats, warmup)["fn"]


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict:
    """Median wall times of several set-ups taken round-robin, so a drift in the machine's load
    (other processes, clock) hits every set-up alike instead of whichever ran last."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "times_s": v} for k, v in times.items()}


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def wait_idle(loaders, timeout: float = 60.0) -> None:
    """Wait until the loaders' worker processes stop using CPU (their prefetch is done), so they do
    not steal the cores from the set-ups timed next."""
    pids = [w.pid for loader in loaders for w in getattr(getattr(loader, "_iterator", None), "_workers", [])]
    if not pids or not Path("/proc").is_dir():
        return
    end, last = time.monotonic() + timeout, -1
    while time.monotonic() < end:
        now = _cpu_ticks(pids)
        if now == last:
            return
        last = now
        time.sleep(0.3)


def machine() -> dict:
    """The device the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": None,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def step_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _teachers(sizes: Sizes, device: str, pretrained: bool = False):
    from .teachers import Teacher, teacher_config

    return [Teacher(teacher_config(n, s), pretrained=pretrained).to(device) for n, s in sizes.teachers.items()]


def _dataset(root: Path, scenes: int, size: int):
    from .data import open_dataset
    from .splits import make_splits
    from .synthetic import make_landcover_dataset

    make_landcover_dataset(root / "data", train_scenes=scenes, val_scenes=0, size=size, seed=0)
    ds = open_dataset("loveda", root / "data")
    make_splits(ds, root / "splits")
    return ds, root / "splits"


def _recipe(root: Path, sizes: Sizes, views: int):
    from .recipe import load_recipe

    return load_recipe(None).override({
        "data.dataset": "loveda", "data.root": str(root / "data"), "data.splits": str(root / "splits"),
        "views.count": views, "views.crop_size": sizes.crop,
        "teachers.names": list(sizes.teachers), "teachers.sizes": dict(sizes.teachers),
        "student.encoder": sizes.student, "student.pretrained": False,
        "student.translator_hidden": sizes.translator_hidden, "student.kwargs": dict(sizes.student_kwargs),
        "train.batch_size": sizes.batch, "train.max_steps": 10**9, "train.eval_every": 10**6})


class Context:
    """What the parts share, built once on first use: a training cache and a Trainer over it."""

    def __init__(self, sizes: Sizes, device: str, workdir: Path) -> None:
        self.sizes, self.device, self.workdir = sizes, device, workdir
        self._trainer = None
        self._teachers = None
        self.step_result: dict | None = None

    def teachers(self):
        if self._teachers is None:
            self._teachers = _teachers(self.sizes, self.device)
        return self._teachers

    def trainer(self):
        if self._trainer is None:
            from .extract import extract
            from .train import Trainer

            root = self.workdir / "step"
            ds, splits = _dataset(root, self.sizes.step_scenes, self.sizes.scene_size)
            recipe = _recipe(root, self.sizes, views=2)
            extract(ds, str(splits), recipe.view_spec(), self.teachers(), str(root / "cache"),
                    batch_size=self.sizes.extract_batch, device=self.device, progress=False)
            self._trainer = Trainer(str(root / "cache"), "10pct", recipe, root / "run", "cached", self.device,
                                    progress=False)
        return self._trainer


def _stream(trainer):
    """Batches through the real loader path, epoch after epoch."""
    for epoch in itertools.count():
        yield from trainer._batches(epoch, 0)


class MemoryReader:
    """Every target of a cache held in RAM behind CacheReader's `read(i, a)`: the floor any cache
    reader is measured against, through the same loader path."""

    def __init__(self, reader) -> None:
        import zarr

        group = zarr.open_group(reader.url, mode="r")
        self.targets = {n: group[f"teachers/{n}"][:].astype(np.float32) for n in reader.teachers}

    def read(self, i: int, a: int) -> dict[str, np.ndarray]:
        return {n: t[i, a] for n, t in self.targets.items()}


def _memory_twin(trainer):
    """The same Trainer whose loaders hand in targets from memory instead of reading the cache."""
    t = copy.copy(trainer)
    t.sets = {k: copy.copy(s) for k, s in trainer.sets.items()}
    memory = MemoryReader(trainer.sets["l"].reader)
    for s in t.sets.values():
        s.reader = memory
    t.loaders = t.make_loaders()
    return t


def _no_distill(trainer):
    """The same Trainer with a Student that has no teachers: FixMatch, no translators or second pass."""
    from .model import Student

    t = copy.copy(trainer)
    cfg = {**trainer.student.config, "teachers": []}
    t.student = Student.from_config(cfg).to(trainer.device)
    t.ema = Student.from_config(cfg).to(trainer.device).eval().requires_grad_(False)
    t.model = t.student
    t.optimizer = t.make_optimizer()
    return t


# ---- the parts -------------------------------------------------------------------------------------


def bench_step(ctx: Context) -> dict:
    """Four set-ups of one training step at the same batch and crop, with FLOP predictions."""
    from .train import StepInputs

    s = ctx.sizes
    trainer = ctx.trainer()
    trainer.student.train()
    stream = _stream(trainer)
    batches = [next(stream) for _ in range(s.warmup + s.repeats)]  # the in-memory set-ups replay these
    cycle = itertools.cycle(batches)
    bare = [StepInputs(**{**b.__dict__, "targets_l": {}, "targets_u": {}}) for b in batches]
    bare_cycle = itertools.cycle(bare)

    fix = _no_distill(trainer)
    fix.student.train()
    online = copy.copy(trainer)
    online.mode, online.teachers = "online", ctx.teachers()

    setups = {
        "fixmatch": lambda: fix.train_step(next(bare_cycle)),
        "cached_memory": lambda: trainer.train_step(next(cycle)),
        "online": lambda: online.train_step(next(cycle)),
    }
    # the real loader path in its steady state, reading the cache vs the same path with every target
    # already in memory: the ratio is what reading the cache costs. Warm-up steps drain the start-up
    # prefetch burst; each timed step pays for the loader work beside it (same cores) and any wait.
    memory = _memory_twin(trainer)
    memory_stream = _stream(memory)
    loader_times = interleaved_times({"cached_read": lambda: trainer.train_step(next(stream)),
                                      "loader_memory": lambda: memory.train_step(next(memory_stream))},
                                     s.repeats, max(s.warmup, 2))
    wait_idle([*trainer.loaders.values(), *memory.loaders.values()])
    times = {**interleaved_times(setups, s.repeats, s.warmup), **loader_times}
    flops = {k: step_flops(setups[k]) for k in ("fixmatch", "cached_memory", "online")}
    t = {k: v["median_s"] for k, v in times.items()}
    result = {
        "sizes": {"crop": s.crop, "batch": s.batch, "student": s.student, "teachers": s.teachers,
                  "workers": trainer.recipe.train.workers},
        "times": times, "flops": flops,
        "ratios": {
            "cached_read/cached_memory": {"value": t["cached_read"] / t["loader_memory"], "goal": "<= 1.05"},
            "cached/fixmatch": {"value": t["cached_memory"] / t["fixmatch"],
                                "predicted": flops["cached_memory"] / flops["fixmatch"], "goal": "within 10 % of predicted"},
            "online/cached": {"value": t["online"] / t["cached_memory"],
                              "predicted": flops["online"] / flops["cached_memory"], "goal": "within 10 % of predicted"},
        },
    }
    ctx.step_result = result
    return result


def bench_extract(ctx: Context) -> dict:
    """The real extract() vs the teachers' bare forward over the same crops at the same batch size."""
    import shutil

    from .extract import ViewSource, _run_teachers, extract
    from .views import ViewSpec

    s = ctx.sizes
    root = ctx.workdir / "extract"
    ds, splits = _dataset(root, s.extract_scenes, s.scene_size)
    spec = ViewSpec(s.extract_views, s.crop, (0.5, 2.0), True, False, 0)
    teachers = ctx.teachers()
    ids = ds.ids_in("train")
    source = ViewSource(ds, [ds.index(i) for i in ids], spec)
    crops = torch.cat([source[j][2] for j in range(len(ids))])
    out = root / "cache"

    def run_extract():
        shutil.rmtree(out, ignore_errors=True)
        # several shards, as in any real cache, so shard writes overlap the teachers' compute
        extract(ds, str(splits), spec, teachers, str(out), shard_samples=max(1, len(ids) // 4),
                batch_size=s.extract_batch, device=ctx.device, progress=False)

    def run_bare():
        _run_teachers(teachers, crops, s.extract_batch, ctx.device, len(ids), s.extract_views)

    times = {"extract": median_time(run_extract, s.repeats, s.warmup), "bare_forward": median_time(run_bare, s.repeats, s.warmup)}
    shutil.rmtree(out, ignore_errors=True)
    ratio = times["extract"]["median_s"] / times["bare_forward"]["median_s"]
    return {"sizes": {"images": len(ids), "views": s.extract_views, "crops": len(crops), "crop": s.crop,
                      "batch": s.extract_batch, "teachers": s.teachers, "workers": 2},
            "times": times, "ratios": {"extract/bare_forward": {"value": ratio, "goal": "<= 1.10"}}}


class _Reads(Dataset):
    def __init__(self, reader, pairs: list[tuple[int, int]]) -> None:
        self.reader, self.pairs = reader, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        return self.reader.read(*self.pairs[k])


def bench_read(ctx: Context, workers: int = 2) -> dict:
    """Targets/s through a default DataLoader over CacheReader vs targets/s one training step consumes."""
    s = ctx.sizes
    trainer = ctx.trainer()
    if ctx.step_result is None:  # run alone: time the real step (reading included) here
        stream = _stream(trainer)
        trainer.student.train()
        step_s = median_time(lambda: trainer.train_step(next(stream)), s.repeats, s.warmup)["median_s"]
    else:
        step_s = ctx.step_result["times"]["cached_read"]["median_s"]
    cache = trainer.cache
    pairs = [(i, v) for i in range(cache.num_samples) for v in range(cache.num_views)]
    pairs = (pairs * math.ceil(256 / len(pairs)))[:256]
    loader = DataLoader(_Reads(cache.reader(), pairs), batch_size=s.batch, num_workers=workers,
                        persistent_workers=workers > 0)

    def one_pass():
        for _ in loader:
            pass

    t = median_time(one_pass, s.repeats, s.warmup)
    delivered = len(pairs) / t["median_s"]
    consumed = 2 * s.batch / step_s
    return {"sizes": {"targets_per_pass": len(pairs), "batch": s.batch, "workers": workers,
                      "teachers": s.teachers, "crop": s.crop},
            "times": {"read_pass": t, "step_s": step_s},
            "rates": {"delivered_targets_per_s": delivered, "consumed_targets_per_s": consumed},
            "ratios": {"delivered/consumed": {"value": delivered / consumed, "goal": ">= 5"}}}


def bench_size(ctx: Context) -> dict:
    """Bytes per (sample, view) and cosine to float32, from real teacher features written by extract()."""
    from .cache import FeatureCache
    from .data import open_dataset
    from .extract import ViewSource, _run_teachers, extract
    from .splits import make_splits
    from .teachers import Teacher, teacher_config
    from .views import ViewSpec

    s = ctx.sizes
    root = ctx.workdir / "size"
    if LOVEDA_SAMPLE.is_dir():
        ds, source_name = open_dataset("loveda", LOVEDA_SAMPLE), f"real LoveDA sample ({LOVEDA_SAMPLE})"
        make_splits(ds, root / "splits")
        splits = root / "splits"
    else:
        ds, splits = _dataset(root, 2, 1024)
        source_name = "generated scenes (rsmtdf.synthetic)"
    teacher = Teacher(teacher_config("effnet_lite0"), pretrained=True).to(ctx.device)
    spec = ViewSpec(s.size_views, s.size_crop, (0.5, 2.0), True, False, 0)
    ids = ds.ids_in("train")
    src = ViewSource(ds, [ds.index(i) for i in ids], spec)
    crops = torch.cat([src[j][2] for j in range(len(ids))])
    ref = _run_teachers([teacher], crops, 8, ctx.device, len(ids), s.size_views)[teacher.name]
    per = ref.shape[2] * ref.shape[3]  # values per (sample, view)
    count = ref.shape[0] * ref.shape[1]

    def cosine(x: np.ndarray) -> dict:
        a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), x.reshape(-1, ref.shape[-1]).astype(np.float64)
        c = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        return {"mean": float(c.mean()), "min": float(c.min())}

    rows = {"float32": {"bytes_per_sample": 4.0 * per, "cosine": cosine(ref)},
            "float16": {"bytes_per_sample": 2.0 * per, "cosine": cosine(ref.astype(np.float16))}}
    for storage, label in (("float16", "float16+compressor"), ("int8", "int8+scale (compressed)")):
        out = root / f"cache-{storage}"
        # one full shard: a real cache has many full shards, so no shard index sized for absent samples
        extract(ds, str(splits), spec, [teacher], str(out), batch_size=8, storage=storage, device=ctx.device,
                shard_samples=len(ids), progress=False)
        cache = FeatureCache.open(str(out))
        reader = cache.reader()
        back = np.stack([np.stack([reader.read(i, a)[teacher.name] for a in range(s.size_views)]) for i in range(len(ids))])
        rows[label] = {"bytes_per_sample": cache.bytes_stored(teacher.name) / count, "cosine": cosine(back)}
    for r in rows.values():
        r["ratio_to_float32"] = r["bytes_per_sample"] / rows["float32"]["bytes_per_sample"]
    int8 = rows["int8+scale (compressed)"]
    return {"sizes": {"teacher": "effnet_lite0 (real weights)", "data": source_name, "samples": count,
                      "tokens": ref.shape[2], "channels": ref.shape[3], "crop": s.size_crop},
            "rows": rows,
            "ratios": {"float16/float32": {"value": rows["float16"]["ratio_to_float32"], "goal": "0.5"},
                       "float16+compressor/float32": {"value": rows["float16+compressor"]["ratio_to_float32"], "goal": "-"},
                       "int8/float32": {"value": int8["ratio_to_float32"], "goal": "<= 0.27 at cosine >= 0.999",
                                        "cosine": int8["cosine"]["mean"]}}}


BENCHES = {"step": bench_step, "extract": bench_extract, "read": bench_read, "size": bench_size,
           "predict": bench_predict, "tiles": bench_tiles}


def run(parts: list[str], size: str = "default", device: str | None = None, out: str | Path | None = None,
        workdir: str | Path | None = None, echo: Callable[[str], None] = print, threads: int | None = None) -> dict:
    """Run the named parts (in the order of PARTS) and return (and optionally write) the results.

    `threads` sets torch's intra-op threads in this process (loader workers use one each anyway)."""
    if threads:
        torch.set_num_threads(threads)
    sizes = SIZES[size]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="rsmtdf-bench-", dir=workdir) as tmp:
        ctx = Context(sizes, device, Path(tmp))
        results: dict = {"machine": {**machine(), "device": device}, "size": size,
                         "weights": "random (pretrained=False) for step/extract/read: speed does not depend on "
                                    "weights; real effnet_lite0 weights for size", "parts": {}}
        for part in PARTS:
            if part in parts:
                t0 = time.perf_counter()
                echo(f"bench {part} ...")
                results["parts"][part] = BENCHES[part](ctx)
                results["parts"][part]["wall_s"] = time.perf_counter() - t0
    if out is not None:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


def _within(value: float, predicted: float) -> bool:
    return abs(value / predicted - 1) <= 0.10


def verdict(name: str, r: dict) -> str:
    v, goal = r["value"], r["goal"]
    if "predicted" in r:
        return "met" if _within(v, r["predicted"]) else "missed"
    if goal.startswith("<="):
        ok = v <= float(goal.split()[1])
        if "cosine" in r:
            ok = ok and r["cosine"] >= 0.999
        return "met" if ok else "missed"
    if goal.startswith(">="):
        return "met" if v >= float(goal.split()[1]) else "missed"
    return "-"


def format_table(results: dict) -> str:
    m = results["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; device {m['device']}; sizes '{results['size']}'",
             f"weights: {results['weights']}", "",
             f"| {'part':<8}| {'ratio':<28}| {'measured':>9} | {'predicted':>9} | {'goal':<28}| {'verdict':<7}| absolute |",
             f"|{'-' * 9}|{'-' * 29}|{'-' * 11}|{'-' * 11}|{'-' * 29}|{'-' * 8}|----------|"]
    for part, res in results["parts"].items():
        for name, r in res["ratios"].items():
            pred = f"{r['predicted']:.3f}" if "predicted" in r else "-"
            lines.append(f"| {part:<8}| {name:<28}| {r['value']:>9.3f} | {pred:>9} | {r['goal']:<28}| "
                         f"{verdict(name, r):<7}| {_absolute(part, name, res)} |")
    return "\n".join(lines)


def _absolute(part: str, name: str, res: dict) -> str:
    if "absolute" in res["ratios"][name]:  # parts in their own modules say it themselves
        return res["ratios"][name]["absolute"]
    if part == "step":
        t = {k: v["median_s"] for k, v in res["times"].items()}
        if name.startswith("cached_read"):
            return f"{t['cached_read']:.3f} s vs {t['loader_memory']:.3f} s (loader path, targets in memory)"
        if name.startswith("cached/"):
            f = res["flops"]
            return (f"{t['cached_memory']:.3f} s vs {t['fixmatch']:.3f} s "
                    f"({f['cached_memory'] / 1e9:.1f} vs {f['fixmatch'] / 1e9:.1f} GFLOP)")
        f = res["flops"]
        return f"{t['online']:.3f} s vs {t['cached_memory']:.3f} s ({f['online'] / 1e9:.1f} vs {f['cached_memory'] / 1e9:.1f} GFLOP)"
    if part == "extract":
        t = res["times"]
        return f"{t['extract']['median_s']:.3f} s vs {t['bare_forward']['median_s']:.3f} s for {res['sizes']['crops']} crops"
    if part == "read":
        r = res["rates"]
        return f"{r['delivered_targets_per_s']:.1f}/s vs {r['consumed_targets_per_s']:.2f}/s"
    rows = res["rows"]
    key = {"float16/float32": "float16", "float16+compressor/float32": "float16+compressor",
           "int8/float32": "int8+scale (compressed)"}[name]
    return (f"{rows[key]['bytes_per_sample'] / 1e3:.1f} kB vs {rows['float32']['bytes_per_sample'] / 1e3:.1f} kB "
            f"per sample, cosine {rows[key]['cosine']['mean']:.5f} (min {rows[key]['cosine']['min']:.5f})")
