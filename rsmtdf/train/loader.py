"""Stage two's data: each step replays one of a sample's stored views, made in two halves.

A loader worker reads the tile (kept decoded, `DecodedTiles`), picks the step's stored view from a
generator seeded by (seed, epoch, sample), cuts the view's window of raw pixels and the crop's
labels, and draws the strong-view and CutMix parameters; the training process copies the batch to
the device once and makes the crops there (`render_crops`), the same pixels as the whole sample's
view. Targets are read by the training process, one batch ahead (`read_targets`, `one_ahead`).
`EpochSampler` is DistributedSampler's order, able to start at any batch, so a resumed run reads
exactly the batches it has not seen.
"""

from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..cache.reader import CacheReader
from ..data.batch import Batch
from ..data.datasets import Sample, SegmentationDataset
from ..data.tilecache import DecodedTiles
from ..transforms.augment import draw_box, draw_strong
from ..transforms.pixels import IGNORE
from ..transforms.scaling import BandScaling
from ..transforms.views import View, render_image, view_tensor, view_window


def sample_rng(*keys: int | str) -> np.random.Generator:
    """The generator of one sample's draws, seeded by its keys (seed, epoch, id, labeled or not)."""
    return np.random.default_rng([k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys])


RAGGED = ("pixels", "valid")  # item keys whose tensors differ in size between samples


def loader_pixels(sample: Sample, view: View, crop: int, scaling: BandScaling, labeled: bool) -> dict:
    """A loader worker's half of a view: the window of pixels its crop is made of, in the raster's
    dtype, of the student's bands (h×w×C; `render_crops` scales and resamples it on the device);
    its validity (h×w, empty when every pixel is valid); the sample's (H, W); and the crop's labels,
    the mask's or for an unlabeled sample 0 with 255 (ignored) on padding and no-data pixels."""
    shape = sample.image.shape[:2]
    win = view_window(shape, view, crop)
    labels = sample.mask if labeled else np.zeros(shape, np.uint8) if sample.valid is None else \
        np.where(sample.valid, 0, IGNORE).astype(np.uint8)
    return {"pixels": torch.from_numpy(np.ascontiguousarray(scaling.pick(sample.image[win]))),
            "valid": torch.zeros((0, 0), dtype=torch.bool) if sample.valid is None else torch.from_numpy(sample.valid[win].copy()),
            "shape": torch.tensor(shape), "mask": view_tensor(labels, view, crop)}


def render_crops(batch: Batch, views: np.ndarray, crop: int, scaling: BandScaling, device: torch.device) -> torch.Tensor:
    """The batch's clean crops (B, C, crop, crop), made on `device` from the workers' windows
    (one copy of all of them): the same pixels as `view_tensor(scaling.unit(image), ...)` of the
    whole sample."""
    parts = {k: batch.ragged(k, device) for k in RAGGED}
    crops = []
    for pixels, valid, shape, i, a in zip(parts["pixels"], parts["valid"], batch["shape"], batch["index"], batch["view"]):
        unit = scaling.unit_tensor(pixels, valid if valid.numel() else None)
        crops.append(render_image(unit.permute(2, 0, 1), View.from_array(views[int(i), int(a)]), crop,
                                  tuple(shape.tolist())))
    return torch.stack(crops)


def collate(items: list[dict]) -> Batch:
    """A loader's items as one `Batch`, the windows (`RAGGED`) flattened."""
    return Batch.collate(items, RAGGED)


class ReplaySet(Dataset):
    """Samples of one split list, each step showing one of the sample's stored views.

    Item: the view's window of the student's bands (the teachers' three first) with its validity
    and the sample's shape (`loader_pixels`: the crop is made on the device, `render_crops`), label
    or ignore mask (c, c: padding and no-data pixels are 255), [strong-view parameters, CutMix box
    (y0, x0, h, w): see `augment`,] cache index and view index (the training process reads the
    targets of that (sample, view): `read_targets`). Only views with valid pixels are drawn. Batch
    with `collate`."""

    def __init__(self, dataset: SegmentationDataset, ids: list[str], cache_index: dict[str, int],
                 views: np.ndarray, valid: np.ndarray, crop: int, seed: int,
                 unlabeled: bool, snap: int, scaling: BandScaling, tiles_mb: int = 0) -> None:
        self.dataset, self.ids, self.cache_index, self.views, self.valid = dataset, ids, cache_index, views, valid
        self.crop, self.seed, self.unlabeled, self.snap = crop, seed, unlabeled, snap
        self.scaling = scaling
        self.tiles = DecodedTiles(tiles_mb * 2**20)  # each worker fills its own copy

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, j = key  # the sampler says which epoch: workers live across epochs
        sid = self.ids[j]
        i = self.cache_index[sid]
        rng = sample_rng(self.seed, epoch, sid, "u" if self.unlabeled else "l")
        shown = np.flatnonzero(self.valid[i] > 0)  # every view, unless some show only no-data pixels
        a = int(shown[rng.integers(0, len(shown))])
        view = View.from_array(self.views[i, a])
        sample = self.tiles.get((sid, not self.unlabeled),
                                lambda: self.dataset.load(self.dataset.index(sid), with_mask=not self.unlabeled))
        item = {**loader_pixels(sample, view, self.crop, self.scaling, labeled=not self.unlabeled), "index": i, "view": a}
        if self.unlabeled:
            item["strong"] = draw_strong(rng)  # parameters only: the pixels are done batched on the device
            item["box"] = draw_box(self.crop, self.snap, rng)
        return item


def read_targets(reader: CacheReader, index: torch.Tensor, view: torch.Tensor, pin: bool) -> dict[str, torch.Tensor]:
    """A batch's targets per teacher as stored: one buffer of bytes (B, record bytes) each (float16's
    values, a compact kind's packed parts: `CacheReader.layout`), read straight into page-locked
    memory when `pin`; the training process copies it to the device and decodes it there
    (`CacheReader.decode`). Read by the training process, not the loader workers: at 518 px the
    42 MB of a step cost the workers more to hand over than to read."""
    out = {name: torch.empty((len(index), reader.record_bytes(name)), dtype=torch.uint8, pin_memory=pin)
           for name in reader.teachers}
    reader.read_into([(int(i), int(a)) for i, a in zip(index, view)],
                     {name: reader.records(name, t.numpy()) for name, t in out.items()})
    return out


def one_ahead(items: Iterator, work: Callable) -> Iterator[tuple[object, object]]:
    """(item, work(item)) for each item, work done in a thread one item ahead: the next batch's
    reads overlap the current step (a GPU step leaves the training process's core idle)."""
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for item in items:
            future = pool.submit(work, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()


class EpochSampler(Sampler[tuple[int, int]]):
    """DistributedSampler's order (seeded permutation per epoch, padded, strided by rank) that can
    start at any batch, so a resumed run reads exactly the batches it has not seen. It yields
    (epoch, index) so per-sample randomness follows the epoch in long-lived loader workers."""

    def __init__(self, n: int, seed: int, rank: int, world: int) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world - self.n]
        return iter([(self.epoch, j) for j in order[self.rank :: self.world][self.start :]])

    def __len__(self) -> int:
        return self.per_rank - self.start


def whole_steps(micro: Iterator, k: int) -> Iterator[list]:
    """The micro-batches in groups of k, one per optimiser step; a rest of fewer than k is dropped
    (as the loaders drop a last partial batch)."""
    group: list = []
    for m in micro:
        group.append(m)
        if len(group) == k:
            yield group
            group = []

