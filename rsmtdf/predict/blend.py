"""Windows of a scene through the model, their softmax probabilities blended into finished blocks.

A reader thread reads the scene window by window (`io.raster.RasterReader`, never the whole file)
on `io.raster.window_grid` and hands over channel-first batches; the calling thread runs them
through the model and blends their probabilities with a Gaussian weight (MONAI's sliding-window
default, sigma = window/8) into a `BlendBand` on the model's device, which hands out every block
as soon as no later window touches it; `quantised` turns a block into the bytes a map stores.
Pixels the input marks as missing get no weight; windows with no valid pixel are never run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from ..errors import RsmtdfError
from ..io.raster import RasterReader, window_grid
from ..models.student import Student, inference_precision
from ..transforms.scaling import BandScaling

NODATA = 255
PROB_SCALE = 254  # probabilities and confidence are stored as round(p * 254): 255 stays nodata
BLOCK = 512  # COG tile size, and the column chunk of the blend band
# GDAL's block cache, shared by the reader and the writer. It fills up to its limit on any scene
# large enough, so it is part of the peak; 16 MB holds the input blocks a few windows share, and
# blocks the window rows share are decoded again instead of kept across the scene's width. In
# bytes: rasterio.Env hands the number to GDALSetCacheMax64 as it is (16 would be 16 bytes).
GDAL_ENV = {"GDAL_CACHEMAX": 16 << 20}



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
    """(B, K, S, S) float32 softmax probabilities, at the precision evaluation runs at too."""
    dev = torch.device(device)
    with inference_precision(dev):
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
