"""Map whole scenes with a trained model, streamed: memory does not grow with the scene.

The scene's windows are blended into finished blocks (`blend`), each block becomes uint8 classes
(and optionally probabilities or confidence) on the model's device, and a writer thread writes
those bytes to a tiled temporary GeoTIFF, which is copied to a Cloud-Optimized GeoTIFF and renamed
into place, so a killed run never leaves a half-written map. Pixels the input marks as missing
come out as 255.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window
from tqdm import tqdm

from ..cache.identity import Identity
from ..data.classes import ClassTable
from ..errors import RsmtdfError
from ..io.raster import RasterReader, raster_header, window_grid
from ..models.student import Student
from ..pipeline.trained import load_model, model_scaling
from ..transforms.scaling import BandScaling, check_data
from ..utils.files import first_line
from ..utils.launch import choose_device
from ..utils.runtime import intra_op_threads, return_freed_memory
from .blend import BLOCK, GDAL_ENV, NODATA, PROB_SCALE, Tiling, blended_blocks, quantised

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".png", ".jpg", ".jpeg", ".img")


@dataclass(frozen=True)
class Outputs:
    """The files one scene's map is written to; the class map last, so its presence means done."""

    classes: Path
    probabilities: Path | None = None
    confidence: Path | None = None

    @classmethod
    def beside(cls, classes: Path, probabilities: bool, confidence: bool) -> Outputs:
        stem = classes.with_suffix("")
        return cls(classes, Path(f"{stem}.probabilities.tif") if probabilities else None,
                   Path(f"{stem}.confidence.tif") if confidence else None)

    def all(self) -> list[Path]:
        return [p for p in (self.probabilities, self.confidence, self.classes) if p is not None]

    def complete(self) -> bool:
        return all(p.is_file() for p in self.all())


@dataclass(frozen=True)
class SceneResult:
    path: Path
    outputs: Outputs
    pixels: int
    windows: int
    skipped: int
    nodata_fraction: float
    seconds: float

    def summary(self) -> str:
        rate = self.pixels / max(self.seconds, 1e-9)
        return (f"{self.path}: {self.pixels / 1e6:.1f} Mpx in {self.seconds:.1f} s ({rate / 1e6:.2f} Mpx/s), "
                f"{self.windows} windows ({self.skipped} outside the footprint), nodata {100 * self.nodata_fraction:.1f} % "
                f"-> {self.outputs.classes}")


def _partial(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}")


class _Writer:
    """Thread: finished blocks, already uint8 (`quantised`), → class map (and probabilities /
    confidence) in tiled GTiffs."""

    def __init__(self, outputs: Outputs, profile: dict, classes: ClassTable) -> None:
        self.outputs, self.nodata_pixels = outputs, 0
        class_names, colours = list(classes.names), classes.colours()
        k = len(class_names)
        tags = {"classes": json.dumps(class_names)}
        self.files: dict[str, rasterio.io.DatasetWriter] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            for kind, count in (("classes", 1), ("probabilities", k), ("confidence", 1)):
                final = getattr(outputs, kind)
                if final is None:
                    continue
                dst = rasterio.open(_partial(final, "partial"), "w", **profile, count=count)
                dst.update_tags(**tags, **({"scale": f"1/{PROB_SCALE}"} if kind != "classes" else {}))
                if kind == "classes":
                    dst.write_colormap(1, {c: (*map(int, colours[c]), 255) for c in range(k)})
                else:
                    dst.scales = (1 / PROB_SCALE,) * count
                    dst.descriptions = tuple(class_names) if kind == "probabilities" else ("confidence",)
                self.files[kind] = dst
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, window: Window, arrays: dict[str, np.ndarray]) -> None:
        """Queue one block's uint8 arrays (`quantised`) for writing."""
        if self.error is not None:
            raise self.error
        self.queue.put((window, arrays))

    def _run(self) -> None:
        try:
            with rasterio.Env(**GDAL_ENV):
                while (item := self.queue.get()) is not None:
                    self._write(*item)
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread by put/close
            self.error = exc
            while self.queue.get() is not None:  # drain so the main thread never blocks
                pass

    def _write(self, window: Window, arrays: dict[str, np.ndarray]) -> None:
        self.nodata_pixels += int(np.count_nonzero(arrays["classes"] == NODATA))
        self.files["classes"].write(arrays["classes"], 1, window=window)
        if "probabilities" in self.files:
            self.files["probabilities"].write(arrays["probabilities"], window=window)
        if "confidence" in self.files:
            self.files["confidence"].write(arrays["confidence"], 1, window=window)

    def close(self) -> None:
        """Wait for every block to be written, close the files, raise what went wrong there."""
        self.queue.put(None)
        self.thread.join()
        for dst in self.files.values():
            dst.close()
        if self.error is not None:
            raise self.error


def _to_cog(partial: Path, final: Path, resampling: str) -> None:
    """Copy a finished tiled GTiff to a COG (deflate, 512 tiles, overviews) under a temporary name,
    then rename it into place: the final name only ever holds a complete file."""
    tmp = _partial(final, "cog-partial")
    rasterio.shutil.copy(partial, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=BLOCK,
                         OVERVIEW_RESAMPLING=resampling, NUM_THREADS="ALL_CPUS")
    os.replace(tmp, final)


def predict_scene(net: Student, path: Path, outputs: Outputs, scaling: BandScaling, tiling: Tiling,
                  classes: ClassTable, device: str | torch.device) -> SceneResult:
    """Map one raster of any size to `outputs` (COGs), streaming it window by window; the class
    table names the classes in the map's tags and gives its colour table."""
    t0 = time.perf_counter()
    with RasterReader(path, scaling) as src:
        height, width, crs, transform = src.height, src.width, src.crs, src.transform
    rows = window_grid(height, width, tiling.window, tiling.stride)
    total = sum(map(len, rows))
    profile = {"driver": "GTiff", "height": height, "width": width, "dtype": "uint8", "nodata": NODATA,
               "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "zstd", "zstd_level": 1,
               "BIGTIFF": "IF_SAFER"}
    if crs is not None:
        profile.update(crs=crs, transform=transform)
    outputs.classes.parent.mkdir(parents=True, exist_ok=True)
    partials = [_partial(p, kind) for p in outputs.all() for kind in ("partial", "cog-partial")]
    skipped = [0]

    def progress(run: int, outside: int) -> None:
        skipped[0] += outside
        bar.update(run + outside)

    try:
        writer = _Writer(outputs, profile, classes)
        try:
            with tqdm(total=total, desc=path.name, unit="win", leave=False) as bar:
                kinds = tuple(writer.files)
                for window, sums in blended_blocks(net, path, scaling, tiling, device, progress):
                    writer.put(window, quantised(sums, kinds))
        finally:
            writer.close()
        for final in outputs.all():
            _to_cog(_partial(final, "partial"), final, "MODE" if final == outputs.classes else "AVERAGE")
    except RasterioIOError as exc:
        raise RsmtdfError(f"{path}: could not write its map to {outputs.classes.parent} ({first_line(exc)})") from None
    finally:
        for p in partials:
            p.unlink(missing_ok=True)
    return SceneResult(path, outputs, height * width, total, skipped[0], writer.nodata_pixels / (height * width),
                       time.perf_counter() - t0)


def find_scenes(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their rasters, recursively) and globs → (scenes in order, problems, one line
    each, for inputs that match nothing). The same file named twice is mapped once."""
    scenes: dict[Path, Path] = {}
    problems = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in RASTER_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                problems.append(f"{p}: no rasters in this folder ({', '.join(RASTER_SUFFIXES)})")
        elif p.exists():
            found = [p]
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                problems.append(f"{item}: no file matches")
        else:
            found = []
            problems.append(f"{p}: no such file")
        for f in found:
            scenes.setdefault(f.resolve(), f)
    return list(scenes.values()), problems


def plan_outputs(scenes: list[Path], out: Path, probabilities: bool, confidence: bool) -> list[Outputs]:
    """`out/<stem>.tif` per scene; two scenes that would write the same map are refused."""
    plans, seen = [], {}
    for scene in scenes:
        target = out / f"{scene.stem}.tif"
        if target in seen:
            raise RsmtdfError(f"{scene}: would write {target}, as {seen[target]} does (rename one, or map them "
                              f"into different --out folders)")
        seen[target] = scene
        plans.append(Outputs.beside(target, probabilities, confidence))
    return plans


def mapping_threads(device: str | torch.device) -> int:
    """torch intra-op threads while `predict` runs: on a CPU one core fewer than this process may use
    (at least one), so the reader and writer threads and GDAL keep a core and never make the model's
    threads wait; never more than torch was given (OMP_NUM_THREADS). A GPU keeps torch's setting."""
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) - 1))


def predict_many(net: Student, scenes: list[Path], plans: list[Outputs], scaling: BandScaling, identity: Identity,
                 tiling: Tiling, device: str, overwrite: bool, echo: Callable[[str], None],
                 fail: Callable[[str], None]) -> int:
    """Map every scene, one summary (or one error) line each; return how many could not be mapped."""
    failed = 0
    return_freed_memory()
    with rasterio.Env(**GDAL_ENV), intra_op_threads(mapping_threads(device)):
        for scene, outputs in zip(scenes, plans):
            if outputs.complete() and not overwrite:
                echo(f"{scene}: {outputs.classes} is complete, skipped (--overwrite maps it again)")
                continue
            try:
                check_data(scaling, *raster_header(scene), str(scene))
                echo(predict_scene(net, scene, outputs, scaling, tiling, identity.dataset.classes, device).summary())
            except RsmtdfError as exc:
                fail(str(exc))
                failed += 1
    return failed


def map_scenes(images: list[str], checkpoint: Path, out: Path, which: str = "ema", window: int | None = None,
               stride: int | None = None, batch_size: int = 8, probabilities: bool = False, confidence: bool = False,
               overwrite: bool = False, device: str = "auto", echo: Callable[[str], None] = print,
               fail: Callable[[str], None] = print) -> tuple[str, bool]:
    """`rsmtdf predict`: every raster `images` names (files, folders, globs) mapped with a checkpoint's
    or export's model into `out`; inputs that match nothing and scenes that fail are told to `fail`,
    one line each. Returns the summary line and whether every input was mapped."""
    if which not in ("ema", "student"):
        raise RsmtdfError(f"--model {which}: choose ema or student")
    net, identity, recipe = load_model(checkpoint, which)
    size = window or net.config["crop_size"]
    tiling = Tiling(size, max(1, size * 2 // 3) if stride is None else stride, batch_size)
    tiling.check(net.patch)
    device = choose_device(device)
    scenes, problems = find_scenes(images)
    plans = plan_outputs(scenes, out, probabilities, confidence)
    for line in problems:
        fail(line)
    failed = predict_many(net.to(device), scenes, plans, model_scaling(net, recipe), identity, tiling, device,
                          overwrite, echo, fail)
    mapped, total = len(scenes) - failed, len(scenes) + len(problems)
    return (f"{mapped} of {total} inputs mapped with {checkpoint} ({which}, window {tiling.window}, stride "
            f"{tiling.stride}) into {out}"), mapped == total
