"""`rsmtdf bench predict`: streamed mapping's memory and throughput, measured in one run.

- memory: peak resident memory of `rsmtdf predict` (a subprocess each, read with `wait4`) on a
  generated georeferenced 2048² and 16384² scene with the same model and settings; goal: the
  larger at most 1.15× the smaller. The model is a tiny ViT (64 px patches): the smaller the
  model's own share of the peak, the more any growth with the scene shows.
- throughput: pixels/s of `predict_scene` over an 8192² scene against the bare model forward over
  the same windows at the same batch size (windows already in memory, the same channel-first
  float32 batches), at the thread layout `predict` uses; goal ≥ 0.85. The model is a realistic
  student: tf_efficientnet_lite0 with the small DPT decoder at 512² windows, the cheapest real
  student per pixel that rsmtdf ships (the default DINOv2-S/14 costs about 4× more per pixel on a
  CPU), so the work outside the model weighs as much as it will in real use, and no less.
- thread layouts: the same pair on a 4096² scene with torch's intra-op threads at `predict`'s
  layout (cores - 1) and at every core, and `predict` against the faster bare forward.

Speed and memory do not depend on weights, so the models are randomly initialised; the scenes are
written block by block (`write_scene`), never held whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from ..cache.identity import DatasetIdentity, Identity, SplitsIdentity
from ..config.recipe import load_recipe
from ..data.classes import LOVEDA, ClassTable
from ..io.raster import RasterReader, window_grid
from ..models.checkpoint import save_checkpoint
from ..models.student import Student
from ..predict.blend import Tiling
from ..predict.mapping import Outputs, mapping_threads, predict_scene
from ..transforms.scaling import BandScaling
from ..utils.runtime import intra_op_threads, return_freed_memory
from .common import interleaved_times

TINY_VIT = ("vit_small_patch14_dinov2", {"embed_dim": 48, "depth": 4, "num_heads": 3, "patch_size": 64})
STUDENT = ("tf_efficientnet_lite0", {})


@dataclass(frozen=True)
class PredictSizes:
    """Scenes, models and sliding-window settings of one benchmark size."""

    memory_window: int
    memory_stride: int
    memory_scenes: tuple[int, int]
    window: int
    stride: int
    batch: int
    scene: int  # the throughput goal's scene
    layout_scene: int  # the thread-layout comparison's scene
    repeats: int  # interleaved timings of each set-up


SETTINGS = {
    "quick": PredictSizes(128, 112, (256, 1024), 128, 112, 4, 512, 256, 2),
    "default": PredictSizes(512, 448, (2048, 16384), 512, 448, 8, 8192, 4096, 1),
}


def random_checkpoint(path: Path, crop: int, encoder_kwargs: dict, class_names: tuple[str, ...] = LOVEDA.names,
                      encoder: str = "vit_small_patch14_dinov2", dataset: str = "loveda", seed: int = 0) -> Student:
    """Save a randomly initialised Student as a checkpoint `rsmtdf predict` loads like a trained one."""
    torch.manual_seed(seed)
    net = Student(encoder, len(class_names), crop, [], **encoder_kwargs).eval()
    recipe = load_recipe(None).override({"data.dataset": dataset})
    classes = LOVEDA if tuple(class_names) == LOVEDA.names else ClassTable(tuple(class_names))
    identity = Identity(DatasetIdentity(dataset, "-", classes, None, None, "-"), SplitsIdentity("-", None, "-"))
    state = net.state_dict()
    save_checkpoint({"identity": identity, "model": net.config, "split": "-", "student": state, "ema": state,
                     "recipe": json.dumps(recipe.to_dict())}, path)
    return net


def scene_pixels(window: Window, bands: int = 3) -> np.ndarray:
    """(bands, h, w) uint8 of a smooth generated landscape at `window`: a pure function of the pixel
    position, so any block can be made alone and a scene of any size is written block by block."""
    r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    y, x = np.mgrid[r0 : r0 + h, c0 : c0 + w].astype(np.float32)
    out = [np.sin(y / (37.0 + 11 * b)) * np.cos(x / (53.0 - 7 * b)) + 0.3 * np.sin((x + y) / 9.0) for b in range(bands)]
    return ((np.stack(out) + 1.3) * 98).clip(0, 255).astype(np.uint8)


def write_scene(path: Path, size: int, bands: int = 3, block: int = 512, nodata: int | None = None) -> Path:
    """A georeferenced size² GeoTIFF (UTM, 0.5 m), tiled and deflated, written one block at a time."""
    profile = {"driver": "GTiff", "width": size, "height": size, "count": bands, "dtype": "uint8", "tiled": True,
               "blockxsize": block, "blockysize": block, "compress": "deflate", "crs": "EPSG:32650",
               "transform": from_origin(500000, 4200000, 0.5, 0.5), "nodata": nodata, "BIGTIFF": "IF_SAFER"}
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, block):
            for c in range(0, size, block):
                win = Window(c, r, min(block, size - c), min(block, size - r))
                dst.write(scene_pixels(win, bands), window=win)
    return path


def _peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall s) of a command run to completion, from its own rusage."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # this copy of rsmtdf
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, wall


def _windows(scene: Path, size: int, window: int, stride: int) -> torch.Tensor:
    """Every window of the scene's grid as one (N, 3, S, S) float32 tensor, read as predict reads them."""
    cells = [w for row in window_grid(size, size, window, stride) for w in row]
    x = torch.empty((len(cells), 3, window, window))
    with RasterReader(scene, BandScaling()) as src:
        for k, win in enumerate(cells):
            x[k] = torch.from_numpy(src.read(win)[0].transpose(2, 0, 1))
    return x


def _pair(net: Student, scene: Path, size: int, p: PredictSizes, device: str, work: Path, threads: int) -> dict:
    """Interleaved times of `predict_scene` and of the bare forward over the same windows, both at
    `threads` intra-op threads."""
    x = _windows(scene, size, p.window, p.stride)
    def run_predict() -> None:
        predict_scene(net, scene, Outputs.beside(work / "maps" / "through.tif", False, False), BandScaling(),
                      Tiling(p.window, p.stride, p.batch), LOVEDA, device)

    @torch.no_grad()
    def run_bare() -> None:
        for k in range(0, len(x), p.batch):
            net(x[k : k + p.batch].to(device)).logits.cpu()

    with intra_op_threads(threads):
        times = interleaved_times({"predict": run_predict, "bare_forward": run_bare}, repeats=p.repeats, warmup=0)
    rate = {k: size * size / v["median_s"] for k, v in times.items()}
    return {"threads": threads, "windows": len(x), "times": times, "pixels_per_s": rate,
            "ratio": rate["predict"] / rate["bare_forward"]}


def bench_predict(ctx) -> dict:
    """Peak memory at two scene sizes, throughput against the bare forward and the thread layouts
    (see the module doc)."""
    p = SETTINGS["quick" if ctx.sizes.name == "quick" else "default"]
    work = ctx.workdir / "predict"
    work.mkdir(exist_ok=True)
    ckpt = work / "tiny.pt"
    random_checkpoint(ckpt, p.memory_window, TINY_VIT[1], encoder=TINY_VIT[0])
    small, large = p.memory_scenes
    memory = {}
    for size in (small, large):
        scene = write_scene(work / f"scene{size}.tif", size)
        cmd = [sys.executable, "-m", "rsmtdf.cli", "predict", str(scene), "--checkpoint", str(ckpt), "--out",
               str(work / "maps"), "--window", str(p.memory_window), "--stride", str(p.memory_stride),
               "--batch-size", str(p.batch)]
        rss, wall = _peak_rss_of(cmd)
        memory[size] = {"peak_rss_mb": rss, "wall_s": wall}
        scene.unlink()

    return_freed_memory()  # as `rsmtdf predict` runs (it applies to the bare forward alike)
    net = random_checkpoint(work / "student.pt", p.window, STUDENT[1], encoder=STUDENT[0]).to(ctx.device)
    layout = mapping_threads(ctx.device)
    scene = write_scene(work / f"scene{p.scene}.tif", p.scene)
    goal = _pair(net, scene, p.scene, p, ctx.device, work, layout)
    scene.unlink()
    scene = write_scene(work / f"scene{p.layout_scene}.tif", p.layout_scene)
    cores = len(os.sched_getaffinity(0))
    layouts = {t: _pair(net, scene, p.layout_scene, p, ctx.device, work, t) for t in sorted({layout, cores})}
    best_bare = max(r["pixels_per_s"]["bare_forward"] for r in layouts.values())

    def mpx(r: dict, k: str) -> str:
        return f"{r['pixels_per_s'][k] / 1e6:.3f}"

    ratios = {
        f"rss {large}²/{small}²": {
            "value": memory[large]["peak_rss_mb"] / memory[small]["peak_rss_mb"], "goal": "<= 1.15",
            "absolute": f"{memory[large]['peak_rss_mb']:.0f} MB vs {memory[small]['peak_rss_mb']:.0f} MB peak RSS "
                        f"({memory[large]['wall_s']:.0f} s vs {memory[small]['wall_s']:.0f} s)"},
        f"predict/bare px/s {p.scene}²": {
            "value": goal["ratio"], "goal": ">= 0.85",
            "absolute": f"{mpx(goal, 'predict')} vs {mpx(goal, 'bare_forward')} Mpx/s over {goal['windows']} windows, "
                        f"{layout} torch thread(s)"}}
    for t, r in layouts.items():
        ratios[f"predict/bare {p.layout_scene}², {t} thr"] = {
            "value": r["ratio"], "goal": "-",
            "absolute": f"{mpx(r, 'predict')} vs {mpx(r, 'bare_forward')} Mpx/s over {r['windows']} windows"}
    ratios[f"predict {layout} thr/best bare"] = {
        "value": layouts[layout]["pixels_per_s"]["predict"] / best_bare, "goal": ">= 0.85",
        "absolute": f"{mpx(layouts[layout], 'predict')} vs {best_bare / 1e6:.3f} Mpx/s ({p.layout_scene}², bare at "
                    f"{' and '.join(map(str, layouts))} threads)"}
    return {"sizes": {"memory_model": f"{TINY_VIT[0]} {TINY_VIT[1]} (random weights)",
                      "model": f"{STUDENT[0]} + DPT small (random weights)", **vars(p)},
            "memory": {str(k): v for k, v in memory.items()}, "throughput": goal,
            "layouts": {str(t): r for t, r in layouts.items()}, "ratios": ratios}
