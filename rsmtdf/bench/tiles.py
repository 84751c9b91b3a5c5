"""`rsmtdf bench tiles`: one large scene read as tiles by window against the same tiles as files.

- loading: samples/s of training-data loading (`load` of a tile with its mask, scaled to [0, 1]
  and one view rendered, in a shuffled order as training reads) from one large 4-band uint16
  GeoTIFF cut by `[data] tile_size` against the same tiles stored as separate files; goal >= 0.9.
- extraction: samples/s of the real `extract()` (a tiny random-weights teacher) over the same
  tiles from both layouts; goal >= 0.9.
- memory: peak resident memory of a process doing a loader worker's work (listing the dataset,
  then loading every tile of the scene) on a small and a large scene; goal: the larger at most
  1.15× the smaller.

Both layouts hold the same pixels (the same deflated, internally tiled GeoTIFF profile) and the
same sample ids (the separate files are named `<scene>@<row>_<col>`), so the views drawn, and so the
work, are the same. Scenes are written block by block, never held whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from ..data.datasets import open_dataset
from ..models.teachers import Teacher, teacher_config
from ..pipeline.extract import extract
from ..pipeline.resolve import resolve
from ..transforms.pixels import to_unit_rgb
from ..transforms.views import ViewSpec, apply_view
from .common import interleaved_times, recipe_at

SETTINGS = {  # size name -> (large scene, small scene, tile, tiles measured for the rates, repeats)
    "quick": (512, 256, 128, 4, 1),
    "default": (16384, 4096, 512, 48, 3),
}
CLASSES = ["land", "water"]
PIXEL = 0.5  # m


def pixels(window: Window, bands: int) -> np.ndarray:
    """(bands, h, w) uint16 reflectance-like values at `window`, a pure function of the pixel position."""
    r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    y, x = np.mgrid[r0 : r0 + h, c0 : c0 + w].astype(np.float32)
    out = [np.sin(y / (37.0 + 11 * b)) * np.cos(x / (53.0 - 7 * b)) + 0.3 * np.sin((x + y) / 9.0) for b in range(bands)]
    return ((np.stack(out) + 1.3) * 3000).astype(np.uint16)


def labels(window: Window) -> np.ndarray:
    """(1, h, w) uint8 class codes 0/1 matching `pixels`' first band."""
    return (pixels(window, 1) > 3900).astype(np.uint8)


def write_raster(path: Path, height: int, width: int, origin: tuple[int, int], bands: int | None,
                 block: int = 512) -> Path:
    """A georeferenced GeoTIFF of the scene's region at `origin` (row, col): image (`bands` uint16
    bands) or mask (`bands=None`), tiled and deflated, written one block at a time."""
    count, dtype = (1, "uint8") if bands is None else (bands, "uint16")
    transform = from_origin(500000 + origin[1] * PIXEL, 4200000 - origin[0] * PIXEL, PIXEL, PIXEL)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": dtype, "tiled": True,
               "blockxsize": block, "blockysize": block, "compress": "deflate", "crs": "EPSG:32650",
               "transform": transform, "BIGTIFF": "IF_SAFER"}
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, height, block):
            for c in range(0, width, block):
                win = Window(c, r, min(block, width - c), min(block, height - r))
                at = Window(c + origin[1], r + origin[0], win.width, win.height)
                dst.write(labels(at) if bands is None else pixels(at, bands), window=win)
    return path


def write_scene(root: Path, name: str, size: int) -> Path:
    """A folder dataset of one size² 4-band scene and its mask."""
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    write_raster(root / "images" / f"{name}.tif", size, size, (0, 0), 4)
    write_raster(root / "masks" / f"{name}.tif", size, size, (0, 0), None)
    return root


def write_tiles(root: Path, name: str, tiles: list[tuple[int, int]], tile: int) -> Path:
    """The same tiles as separate files `<name>@<row>_<col>.tif`: the ids the tiled scene gives them."""
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for row, col in tiles:
        stem = f"{name}@{row}_{col}"
        write_raster(root / "images" / f"{stem}.tif", tile, tile, (row, col), 4, block=tile)
        write_raster(root / "masks" / f"{stem}.tif", tile, tile, (row, col), None, block=tile)
    return root


WORKER = """
import sys, time
import numpy as np
from rsmtdf.data.datasets import open_dataset
from rsmtdf.transforms.pixels import to_unit_rgb
from rsmtdf.transforms.views import ViewSpec, apply_view
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
root, tile = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
ds = open_dataset("folder", root, ["land", "water"], tile_size=tile)
listed = time.perf_counter() - t0
spec = ViewSpec(1, 224)
order = np.random.default_rng(0).permutation(len(ds))
before, peak = rss(), 0.0
t0 = time.perf_counter()
for i in order:
    s = ds.load(int(i))
    view = spec.sample(s.id, *s.image.shape[:2])[0]
    apply_view(to_unit_rgb(s.image, (0, 1, 2), None, s.valid), view, spec.crop_size)
    apply_view(s.mask, view, spec.crop_size)
    peak = max(peak, rss())
print(before, peak, len(ds), listed, time.perf_counter() - t0)
"""


def _worker_peak(root: Path, tile: int) -> dict:
    """Memory of a loader worker's work over every tile: resident MB after listing, its peak while
    loading (sampled after each tile) and the process's own peak (rusage, imports included)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # this copy of rsmtdf
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(tile)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"loader worker failed:\n{err[-2000:]}")
    before, peak, tiles, listed, loading = out.split()
    return {"loading_peak_rss_mb": float(peak), "rss_before_first_read_mb": float(before),
            "process_peak_rss_mb": usage.ru_maxrss / 1024, "tiles": int(tiles), "listing_s": float(listed),
            "loading_s": float(loading)}


def bench_tiles(ctx) -> dict:
    """Loading and extraction rates, one scene vs separate tiles, and a worker's peak memory."""
    large, small, tile, measured, repeats = SETTINGS["quick" if ctx.sizes.name == "quick" else "default"]
    work = ctx.workdir / "tiles"
    t0 = time.perf_counter()
    scene = write_scene(work / "scene", "big", large)
    ds_scene = open_dataset("folder", scene, CLASSES, tile_size=tile)
    every = max(1, len(ds_scene) // measured)
    ids = ds_scene.ids[::every][:measured]  # spread over the scene
    offsets = [tuple(int(v) for v in sid.split("@")[1].split("_")) for sid in ids]
    files = write_tiles(work / "files", "big", offsets, tile)
    written_s = time.perf_counter() - t0
    layouts = {"scene": ds_scene.subset(ids), "files": open_dataset("folder", files, CLASSES)}
    assert layouts["scene"].ids == layouts["files"].ids

    spec = ViewSpec(1, 224)
    order = np.random.default_rng(0).permutation(len(ids))

    def loading(ds):
        def run() -> None:
            for i in order:
                s = ds.load(int(i))
                view = spec.sample(s.id, *s.image.shape[:2])[0]
                apply_view(to_unit_rgb(s.image, (0, 1, 2), None, s.valid), view, spec.crop_size)
                apply_view(s.mask, view, spec.crop_size)
        return run

    load_times = interleaved_times({k: loading(ds) for k, ds in layouts.items()}, repeats=repeats, warmup=1)

    teacher = Teacher(teacher_config("effnet_lite0", 64), pretrained=False).to(ctx.device)
    runs = {k: 0 for k in layouts}

    def extraction(name, ds):
        splits = work / f"splits-{name}"  # one scene has no validation part: extraction only hashes the lists
        (splits / "all").mkdir(parents=True, exist_ok=True)
        (splits / "all" / "labeled.txt").write_text("".join(f"{i}\n" for i in ds.ids))
        recipe = recipe_at(ds.root, splits, {"effnet_lite0": 64}, 1, 56, dataset="folder",
                           **{"data.classes": list(CLASSES), "data.tile_size": tile if name == "scene" else None})
        resolved = resolve(recipe).restricted(ds.ids)

        def run() -> None:
            runs[name] += 1
            extract(resolved, [teacher], str(work / f"cache-{name}-{runs[name]}"), batch_size=8, num_workers=0,
                    device=ctx.device, progress=False)
        return run

    extract_times = interleaved_times({k: extraction(k, ds) for k, ds in layouts.items()}, repeats=repeats, warmup=1)

    memory = {}
    for size in (small, large):
        root = work / "scene" if size == large else write_scene(work / f"scene{size}", "big", size)
        memory[size] = _worker_peak(root, tile)
    rate = {"load": {k: len(ids) / v["median_s"] for k, v in load_times.items()},
            "extract": {k: len(ids) / v["median_s"] for k, v in extract_times.items()}}
    m_small, m_large = memory[small], memory[large]
    return {
        "sizes": {"scene": f"{large}² × 4 bands uint16, deflate, {tile}² blocks", "tile": tile,
                  "tiles_measured": len(ids), "memory_scenes": [small, large], "load_view": spec.crop_size,
                  "teacher": "effnet_lite0 @64 (random weights), 1 view at 56 px", "written_s": round(written_s, 1)},
        "rates": rate, "memory": memory,
        "ratios": {
            "loading scene/files": {"value": rate["load"]["scene"] / rate["load"]["files"], "goal": ">= 0.9",
                                    "absolute": f"{rate['load']['scene']:.1f} vs {rate['load']['files']:.1f} samples/s "
                                                f"over {len(ids)} tiles"},
            "extraction scene/files": {"value": rate["extract"]["scene"] / rate["extract"]["files"], "goal": ">= 0.9",
                                       "absolute": f"{rate['extract']['scene']:.1f} vs {rate['extract']['files']:.1f} "
                                                   f"samples/s over {len(ids)} tiles"},
            f"worker peak RSS {large}/{small}": {
                "value": m_large["loading_peak_rss_mb"] / m_small["loading_peak_rss_mb"], "goal": "<= 1.15",
                "absolute": f"{m_large['loading_peak_rss_mb']:.0f} vs {m_small['loading_peak_rss_mb']:.0f} MB over "
                            f"{m_large['tiles']} vs {m_small['tiles']} tiles (after listing "
                            f"{m_large['rss_before_first_read_mb']:.0f} vs {m_small['rss_before_first_read_mb']:.0f} MB)"},
        },
    }
