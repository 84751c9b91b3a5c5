"""What the benchmark parts share: sizes, timing helpers, the machine's description, and a
context that builds the training cache and Trainer once for every part that needs them."""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config.recipe import Recipe, load_recipe
from ..data.datasets import SegmentationDataset, open_dataset
from ..data.splits import make_splits
from ..data.synthetic import make_landcover_dataset
from ..models.teachers import Teacher, teacher_config
from ..pipeline.extract import extract
from ..pipeline.resolve import resolve
from ..train.trainer import Trainer
from ..utils.runtime import intra_op_threads

LOVEDA_SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "loveda-sample"

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


def cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU milliseconds of `fn()` on one intra-op thread, as a loader worker runs it."""
    with intra_op_threads(1):
        fn()  # warm-up: page cache, lazy opens, allocator
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
    return 1e3 * float(np.median(times))


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


def bench_teachers(sizes: Sizes, device: str, pretrained: bool = False) -> list[Teacher]:
    """The size's teachers at their sizes, with random weights unless `pretrained`."""
    return [Teacher(teacher_config(n, s), pretrained=pretrained).to(device) for n, s in sizes.teachers.items()]


def generated_dataset(root: Path, scenes: int, size: int) -> tuple[SegmentationDataset, Path]:
    """Generated LoveDA-layout scenes under root/data with their split lists in root/splits."""
    make_landcover_dataset(root / "data", train_scenes=scenes, val_scenes=1, size=size, seed=0)  # lists need a val part
    ds = open_dataset("loveda", root / "data")
    make_splits(ds, root / "splits")
    return ds, root / "splits"


def recipe_at(root: Path, splits: Path, teachers: dict[str, int | None], views: int, crop: int,
              dataset: str = "loveda", **keys: object) -> Recipe:
    """A recipe over the defaults for the data at `root` with its lists at `splits`: what a part
    extracts with goes through the same resolve layer as `rsmtdf extract-features`."""
    return load_recipe(None).override({
        "data.dataset": dataset, "data.root": str(root), "data.splits": str(splits), "views.count": views,
        "views.crop_size": crop, "teachers.names": list(teachers),
        "teachers.sizes": {n: s for n, s in teachers.items() if s}, **keys})


def step_recipe(root: Path, sizes: Sizes, views: int) -> Recipe:
    """The training recipe of a size: its student, batch and teachers, random weights."""
    return recipe_at(root / "data", root / "splits", dict(sizes.teachers), views, sizes.crop, **{
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

    def teachers(self) -> list[Teacher]:
        if self._teachers is None:
            self._teachers = bench_teachers(self.sizes, self.device)
        return self._teachers

    def trainer(self) -> Trainer:
        if self._trainer is None:
            root = self.workdir / "step"
            generated_dataset(root, self.sizes.step_scenes, self.sizes.scene_size)
            recipe = step_recipe(root, self.sizes, views=2)
            extract(resolve(recipe), self.teachers(), str(root / "cache"), batch_size=self.sizes.extract_batch,
                    device=self.device, progress=False)
            self._trainer = Trainer(str(root / "cache"), "10pct", recipe, root / "run", "cached", self.device,
                                    progress=False)
        return self._trainer


def batch_stream(trainer: Trainer):
    """Batches through the real loader path, epoch after epoch."""
    for epoch in itertools.count():
        yield from trainer.batches(epoch, 0)
