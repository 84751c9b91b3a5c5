"""Map whole scenes with a trained model, streamed: memory does not grow with the scene.

A reader thread reads the scene window by window (`raster.RasterReader`, never the whole file) on
`raster.window_grid` and hands over channel-first batches; the main thread runs them through the
model and blends their softmax probabilities with a Gaussian weight (MONAI's sliding-window
default, sigma = window/8) into a `BlendBand` on the model's device, where every finished block
also becomes uint8 classes (and optionally probabilities or confidence, `quantised`); a writer
thread writes those bytes to a tiled temporary GeoTIFF, which is copied to a Cloud-Optimized
GeoTIFF and renamed into place, so a killed run never leaves a half-written map.
Pixels the input marks as missing get no weight and come out as 255; windows with no valid pixel
are never run.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
import torch
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .data import ClassTable, described_classes
from .errors import RsmtdfError
from .model import Student
from .recipe import Recipe, recipe_from_json
from .raster import BandScaling, RasterReader, first_line, window_grid
from .scaling import check_data, model_scaling, raster_pixels

NODATA = 255
PROB_SCALE = 254  # probabilities and confidence are stored as round(p * 254): 255 stays nodata
BLOCK = 512  # COG tile size, and the column chunk of the blend band
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".png", ".jpg", ".jpeg", ".img")
# GDAL's block cache, shared by the reader and the writer. It fills up to its limit on any scene
# large enough, so it is part of the peak; 16 MB holds the input blocks a few windows share, and
# blocks the window rows share are decoded again instead of kept across the scene's width. In
# bytes: rasterio.Env hands the number to GDALSetCacheMax64 as it is (16 would be 16 bytes).
GDAL_ENV = {"GDAL_CACHEMAX": 16 << 20}


def load_trained(checkpoint: str | Path, which: str = "ema") -> tuple[Student, dict, Recipe]:
    """(model, identity, recipe) of a checkpoint; `which` is "ema" or "student". Weights that do not
    fit the model its config describes (an edited or mixed-up file) are refused in one line."""
    ckpt = load_checkpoint(checkpoint)
    try:
        net = Student.from_config(ckpt["identity"]["model"], source=checkpoint)
        net.load_state_dict(ckpt[which])
    except (KeyError, TypeError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise RsmtdfError(f"{checkpoint}: its {which} weights do not fit the model its config describes "
                          f"({type(exc).__name__}: {detail})") from None
    return net.eval(), ckpt["identity"], recipe_from_json(ckpt["recipe"], str(checkpoint))


@dataclass(frozen=True)
class Tiling:
    """Window size and stride of the sliding window, and windows per forward pass."""

    window: int
    stride: int
    batch_size: int = 8

    def check(self, patch: int) -> None:
        if self.window < 1 or self.window % patch:
            raise RsmtdfError(f"--window {self.window}: must be a positive multiple of the encoder's patch ({patch})")
        if not 1 <= self.stride <= self.window:
            raise RsmtdfError(f"--stride {self.stride}: must be between 1 and the window ({self.window})")
        if self.batch_size < 1:
            raise RsmtdfError(f"--batch-size {self.batch_size}: must be at least 1")


def blend_weight(size: int) -> np.ndarray:
    """size×size Gaussian weight (sigma = size/8, peak 1): window centres count most, borders, where
    the model sees least context, least; every value is positive so a lone window still counts."""
    r = (np.arange(size, dtype=np.float64) - (size - 1) / 2) / (size / 8)
    g = np.exp(-0.5 * r**2)
    return np.outer(g, g).astype(np.float32)


class BlendBand:
    """Weighted probability sums (K classes + the weight) of the rows one window row covers, kept on
    the model's device and added in place.

    Kept per column chunk of BLOCK pixels: a chunk is finished, and handed out, as soon as the
    windows passing over it are added; only the rows it shares with the next window row (the
    vertical overlap) are carried over the full width, in one tensor allocated per scene. Chunk
    buffers are reused: the few a window row needs at once are allocated on first use and never
    again. Memory: about (window / BLOCK + 2) chunks of window × BLOCK plus overlap × width, whatever
    the scene's height.
    """

    def __init__(self, channels: int, height: int, width: int, ys: list[int], xs: list[int], size: int,
                 device: str | torch.device = "cpu") -> None:
        self.c, self.h, self.w, self.ys, self.xs, self.size, self.device = channels, height, width, ys, xs, size, device
        self.chunks = [(c0, min(c0 + BLOCK, width)) for c0 in range(0, width, BLOCK)]
        overlap = max((self._rows(i)[1] - ys[i + 1] for i in range(len(ys) - 1)), default=0)
        self.carry = torch.zeros((channels, overlap, width), device=device)
        self.active: dict[int, torch.Tensor] = {}
        self.spare: list[torch.Tensor] = []
        self.row, self.chunk = 0, 0  # the next (window row, chunk) to finish

    def _rows(self, i: int) -> tuple[int, int]:
        return self.ys[i], min(self.ys[i] + self.size, self.h)

    def _buffer(self, i: int, k: int) -> torch.Tensor:
        """Chunk k's sums for window row i: the rows row i - 1 left in `carry`, zeros below."""
        buf = self.active.get(k)
        if buf is None:
            top, bottom = self._rows(i)
            buf = self.spare.pop() if self.spare else torch.empty((self.c, bottom - top, BLOCK), device=self.device)
            c0, c1 = self.chunks[k]
            carried = self._rows(i - 1)[1] - top if i > 0 else 0
            buf[:, :carried, : c1 - c0] = self.carry[:, :carried, c0:c1]
            buf[:, carried:].zero_()
            self.active[k] = buf
        return buf

    def add(self, i: int, j: int, probs: torch.Tensor, weight: torch.Tensor) -> None:
        """Add window (row i, column j): softmax `probs` (K, size, size) times `weight` (size, size),
        which is 0 on invalid pixels, and the weight itself."""
        top, bottom = self._rows(i)
        n = bottom - top
        x0 = self.xs[j]
        x1 = min(x0 + self.size, self.w)
        for k in range(x0 // BLOCK, (x1 - 1) // BLOCK + 1):
            c0, c1 = self.chunks[k]
            a, b = max(x0, c0), min(x1, c1)
            buf = self._buffer(i, k)
            w = weight[:n, a - x0 : b - x0]
            buf[:-1, :n, a - c0 : b - c0].addcmul_(probs[:, :n, a - x0 : b - x0], w)
            buf[-1, :n, a - c0 : b - c0] += w

    def finish(self, i: int, j: int) -> Iterator[tuple[Window, torch.Tensor]]:
        """Hand out every block that no window after (i, j) touches, in raster order. Call it after
        every window, added or skipped, in raster order. A block is a view of a reused buffer: use it
        before asking for the next."""
        while self.row < len(self.ys) and (self.row < i or (self.row == i and self.chunks[self.chunk][1] <= self._done_col(j))):
            yield self._finish_one(self.row, self.chunk)
            self.chunk += 1
            if self.chunk == len(self.chunks):
                self.row, self.chunk = self.row + 1, 0

    def _done_col(self, j: int) -> int:
        return self.xs[j + 1] if j + 1 < len(self.xs) else self.w

    def _finish_one(self, i: int, k: int) -> tuple[Window, torch.Tensor]:
        buf = self._buffer(i, k)
        del self.active[k]
        self.spare.append(buf)
        top, bottom = self._rows(i)
        end = self.ys[i + 1] if i + 1 < len(self.ys) else self.h
        c0, c1 = self.chunks[k]
        if i + 1 < len(self.ys):
            self.carry[:, : bottom - end, c0:c1] = buf[:, end - top : bottom - top, : c1 - c0]
        return Window(c0, top, c1 - c0, end - top), buf[:, : end - top, : c1 - c0]


@dataclass(frozen=True)
class _Batch:
    """Windows in raster order as the reader hands them over: `cells` (row, column, index into
    `images`, or -1 for a window with no valid pixel, which is not run) and the run windows' pixels."""

    cells: list[tuple[int, int, int]]
    images: torch.Tensor | None  # (B, 3, S, S) float32 in [0, 1]
    valid: torch.Tensor | None  # (B, S, S) bool


_END = object()


def _reader(path: Path, scaling: BandScaling, rows: list[list[Window]], batch_size: int, out: queue.Queue,
            stop: threading.Event) -> None:
    """Thread: every window of the grid, in raster order, as batches ready for the model (stacked
    channel-first here, so the model's thread only runs the model)."""
    try:
        with rasterio.Env(**GDAL_ENV), RasterReader(path, scaling) as src:
            size = int(rows[0][0].height)
            cells: list[tuple[int, int, int]] = []
            images = np.empty((batch_size, 3, size, size), np.float32)
            valid = np.empty((batch_size, size, size), bool)
            n = 0
            for i, row in enumerate(rows):
                for j, win in enumerate(row):
                    if stop.is_set():
                        return
                    image, ok = src.read(win)
                    if ok.any():
                        images[n], valid[n] = image.transpose(2, 0, 1), ok
                        cells.append((i, j, n))
                        n += 1
                    else:
                        cells.append((i, j, -1))
                    if n == batch_size:
                        out.put(_Batch(cells, torch.from_numpy(images), torch.from_numpy(valid)))
                        cells, n = [], 0
                        images = np.empty_like(images)
                        valid = np.empty_like(valid)
            if cells:
                out.put(_Batch(cells, torch.from_numpy(images[:n]) if n else None, torch.from_numpy(valid[:n]) if n else None))
        out.put(_END)
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it there
        out.put(exc)


def blended_blocks(net: Student, path: Path, scaling: BandScaling, tiling: Tiling, device: str | torch.device,
                   progress: Callable[[int, int], None] = lambda run, outside: None) -> Iterator[tuple[Window, torch.Tensor]]:
    """Finished blocks of a scene, in raster order: (window, (K + 1, h, w) float32 on `device`)
    holding the weighted probability sums and, last, the summed weight (0 where the input has no
    data); each is a view valid until the next is asked for. `progress(run, outside)` is told of
    windows run and of windows skipped for having no valid pixel."""
    with RasterReader(path, scaling) as src:
        height, width = src.height, src.width
    rows = window_grid(height, width, tiling.window, tiling.stride)
    ys, xs = [int(r[0].row_off) for r in rows], [int(w.col_off) for w in rows[0]]
    band = BlendBand(net.config["num_classes"] + 1, height, width, ys, xs, tiling.window, device)
    weight = torch.from_numpy(blend_weight(tiling.window)).to(device)
    items: queue.Queue = queue.Queue(maxsize=1)  # one batch ready while the model runs one and the reader fills one
    stop = threading.Event()
    thread = threading.Thread(target=_reader, args=(path, scaling, rows, tiling.batch_size, items, stop), daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            if item.images is not None:
                probs = _probabilities(net, item.images, device)
                weights = weight * item.valid.to(device)
            for i, j, k in item.cells:
                if k >= 0:
                    band.add(i, j, probs[k], weights[k])
                yield from band.finish(i, j)
            run = 0 if item.images is None else len(item.images)
            progress(run, len(item.cells) - run)
            probs = weights = item = None  # freed before the next batch runs, not while it runs
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass


@torch.no_grad()
def _probabilities(net: Student, images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """(B, K, S, S) float32 softmax probabilities, under the same autocast as evaluation."""
    dev = torch.device(device)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        logits = net(images.to(dev, non_blocking=True)).logits.float()
    # softmax in place: a second (B, K, S, S) tensor would be part of every batch's peak
    logits.sub_(logits.amax(1, keepdim=True)).exp_()
    return logits.div_(logits.sum(1, keepdim=True))


def quantised(sums: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One finished block of sums (K + 1, h, w) → the uint8 arrays the writer stores, computed on the
    sums' device so only bytes cross to the host: "classes" (h, w), and where asked "probabilities"
    (K, h, w) and "confidence" (h, w) as round(p × PROB_SCALE); NODATA where no window saw data."""
    weight = sums[-1]
    valid = weight > 0
    top, classes = sums[:-1].max(0)
    out = {"classes": torch.where(valid, classes, NODATA)}
    safe = torch.where(valid, weight, 1)
    if "probabilities" in kinds:
        out["probabilities"] = _scaled(sums[:-1] / safe, valid)
    if "confidence" in kinds:
        out["confidence"] = _scaled(top / safe, valid)
    return {k: v.to(torch.uint8).cpu().numpy() for k, v in out.items()}


def _scaled(p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, torch.round(p * PROB_SCALE), NODATA)


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


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def mapping_threads(device: str | torch.device) -> int:
    """torch intra-op threads while `predict` runs: on a CPU one core fewer than this process may use
    (at least one), so the reader and writer threads and GDAL keep a core and never make the model's
    threads wait; never more than torch was given (OMP_NUM_THREADS). A GPU keeps torch's setting."""
    if torch.device(device).type != "cpu":
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)) - 1))


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _return_freed_memory() -> None:
    """Serve every allocation above 1 MB from its own mapping, returned to the system when freed.

    glibc raises its mmap threshold each time a large block is freed, after which the batches,
    probabilities and activations that a scene allocates window after window come from heap arenas
    that fragment and keep growing with the number of windows (measured: +130 MB peak at 8192² over
    2048², BENCHMARKS.md "Mapping"). A fixed threshold keeps the peak a function of the batch. No-op
    without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def predict_many(net: Student, scenes: list[Path], plans: list[Outputs], recipe: Recipe, identity: dict, tiling: Tiling,
                 device: str, overwrite: bool, echo: Callable[[str], None], fail: Callable[[str], None]) -> int:
    """Map every scene, one summary (or one error) line each; return how many could not be mapped."""
    scaling = model_scaling(net.config, recipe)
    failed = 0
    _return_freed_memory()
    with rasterio.Env(**GDAL_ENV), intra_op_threads(mapping_threads(device)):
        for scene, outputs in zip(scenes, plans):
            if outputs.complete() and not overwrite:
                echo(f"{scene}: {outputs.classes} is complete, skipped (--overwrite maps it again)")
                continue
            try:
                check_data(scaling, *raster_pixels(scene), str(scene))
                echo(predict_scene(net, scene, outputs, scaling, tiling, described_classes(identity["dataset"]),
                                   device).summary())
            except RsmtdfError as exc:
                fail(str(exc))
                failed += 1
    return failed
