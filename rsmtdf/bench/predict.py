"""`rsmtdf bench predict`: streamed mapping's memory and throughput, measured in one run.

- memory: peak resident memory of `rsmtdf predict` (a subprocess each, read with `wait4`) on a
  generated georeferenced 2048² and 16384² scene with the same model and settings; goal: the
  larger at most 1.15× the smaller.
- throughput: pixels/s of `predict_scene` over an 8192² scene against the bare model forward over
  the same windows at the same batch size (windows already in memory); goal ≥ 0.85.

The model is a randomly initialised tiny ViT (speed and memory do not depend on weights) with
64 px patches, so that 512² windows cost a CPU little and the scenes finish in minutes; the scenes
are written block by block (`write_scene`), never held whole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from ..checkpoint import save_checkpoint
from ..data import LOVEDA
from ..model import Student
from ..recipe import load_recipe

SETTINGS = {  # size name -> (encoder kwargs, window, stride, batch, memory scenes, throughput scene)
    "quick": ({"embed_dim": 48, "depth": 4, "num_heads": 3, "patch_size": 32}, 128, 112, 4, (256, 1024), 512),
    "default": ({"embed_dim": 48, "depth": 4, "num_heads": 3, "patch_size": 64}, 512, 448, 8, (2048, 16384), 8192),
}


def random_checkpoint(path: Path, crop: int, encoder_kwargs: dict, class_names: tuple[str, ...] = LOVEDA.names,
                      encoder: str = "vit_small_patch14_dinov2", dataset: str = "loveda", seed: int = 0) -> Student:
    """Save a randomly initialised Student as a checkpoint `rsmtdf predict` loads like a trained one."""
    torch.manual_seed(seed)
    net = Student(encoder, len(class_names), crop, [], **encoder_kwargs).eval()
    recipe = load_recipe(None).override({"data.dataset": dataset})
    identity = {"model": net.config, "class_names": list(class_names), "dataset": {"name": dataset},
                "splits": {"dir": "-", "sha256": "-"}, "split": "-"}
    state = net.state_dict()
    save_checkpoint({"identity": identity, "student": state, "ema": state, "recipe": json.dumps(recipe.to_dict())}, path)
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


def bench_predict(ctx) -> dict:
    """Peak memory at two scene sizes and throughput against the bare forward (see the module doc)."""
    from ..predict import BandScaling, Outputs, Tiling, predict_scene
    from ..raster import RasterReader, window_grid

    kwargs, window, stride, batch, (small, large), through = SETTINGS["quick" if ctx.sizes.name == "quick" else "default"]
    work = ctx.workdir / "predict"
    work.mkdir(exist_ok=True)
    ckpt = work / "model.pt"
    net = random_checkpoint(ckpt, window, kwargs).to(ctx.device)
    tiling = Tiling(window, stride, batch)
    memory = {}
    for size in (small, large):
        scene = write_scene(work / f"scene{size}.tif", size)
        cmd = [sys.executable, "-m", "rsmtdf.cli", "predict", str(scene), "--checkpoint", str(ckpt), "--out",
               str(work / "maps"), "--window", str(window), "--stride", str(stride), "--batch-size", str(batch)]
        rss, wall = _peak_rss_of(cmd)
        memory[size] = {"peak_rss_mb": rss, "wall_s": wall}
        scene.unlink()

    scene = write_scene(work / f"scene{through}.tif", through)
    scaling = BandScaling()
    rows = window_grid(through, through, window, stride)
    with RasterReader(scene, scaling) as src:  # the same windows, read once into memory for the bare forward
        windows = [src.read(w) for row in rows for w in row]
    x = torch.from_numpy(np.stack([w[0] for w in windows])).permute(0, 3, 1, 2)
    del windows
    names = list(LOVEDA.names)

    def run_predict() -> None:
        predict_scene(net, scene, Outputs.beside(work / "maps" / "through.tif", False, False), scaling, tiling,
                      names, "loveda", ctx.device)

    @torch.no_grad()
    def run_bare() -> None:
        for k in range(0, len(x), batch):
            net(x[k : k + batch].to(ctx.device)).logits.cpu()

    from .common import interleaved_times

    times = interleaved_times({"predict": run_predict, "bare_forward": run_bare}, repeats=ctx.sizes.repeats // 2 or 1,
                              warmup=0)
    pixels = through * through
    rate = {k: pixels / v["median_s"] for k, v in times.items()}
    return {"sizes": {"model": f"vit_small_patch14_dinov2 {kwargs} (random weights)", "window": window,
                      "stride": stride, "batch": batch, "windows_throughput": int(len(x)),
                      "memory_scenes": [small, large], "throughput_scene": through},
            "memory": {str(k): v for k, v in memory.items()}, "times": times, "pixels_per_s": rate,
            "ratios": {f"rss {large}²/{small}²": {
                "value": memory[large]["peak_rss_mb"] / memory[small]["peak_rss_mb"], "goal": "<= 1.15",
                "absolute": f"{memory[large]['peak_rss_mb']:.0f} MB vs {memory[small]['peak_rss_mb']:.0f} MB peak RSS "
                            f"({memory[large]['wall_s']:.0f} s vs {memory[small]['wall_s']:.0f} s)"},
                "predict/bare px/s": {
                "value": rate["predict"] / rate["bare_forward"], "goal": ">= 0.85",
                "absolute": f"{rate['predict'] / 1e6:.3f} vs {rate['bare_forward'] / 1e6:.3f} Mpx/s over {len(x)} windows"}}}
