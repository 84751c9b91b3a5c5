"""Stage one: run the frozen teachers once over every training sample and its A views, into the cache.

Data flows one way: dataset → views → teachers → cache. Loader workers decode tiles and render
views; the main thread runs the teachers in fixed batches inside each shard (so a shard's values do
not depend on which worker or run wrote it); a writer thread compresses and writes whole shards
while the teachers work on the next one.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import splits as splits_mod
from .cache import FeatureCache, TeacherLayout, expected_attrs, ids_sha256
from .data import SegmentationDataset, to_unit_rgb
from .errors import RsmtdfError
from .teachers import Teacher
from .views import ViewSpec, render_views, valid_fraction

SHARD_BYTES = 256e6


@dataclass
class ExtractSummary:
    samples: int
    views: int
    seconds: float
    bytes_written: int
    shards_done: int
    shards_skipped: int
    missing: list[int]
    empty: int = 0  # samples of this run with no valid pixel in any view (training leaves them out)

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        state = "complete" if not self.missing else f"incomplete: {len(self.missing)} shards left to other workers"
        return (f"extracted {self.samples} samples × {self.views} views in {self.seconds:.1f} s "
                f"({rate:.2f} samples/s), wrote {self.bytes_written / 1e6:.1f} MB; shards done {self.shards_done}, "
                f"skipped {self.shards_skipped}; cache {state}"
                + (f"; {self.empty} tiles have no valid pixels (NaN/nodata) and are left out of training"
                   if self.empty else ""))


class ViewSource(Dataset):
    """Sample i → (i, view params (A, 5), rendered views (A, 3, crop, crop), valid shares (A,)),
    errors as one line."""

    def __init__(self, dataset: SegmentationDataset, indices: list[int], spec: ViewSpec,
                 bands: tuple[int, int, int] = (0, 1, 2), max_value: float | None = None) -> None:
        self.dataset, self.indices, self.spec = dataset, indices, spec
        self.bands, self.max_value = bands, max_value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        try:
            sample = self.dataset.load(self.indices[j])  # loads and checks the mask too
        except RsmtdfError as exc:  # pass it to the main process as a line, not a worker traceback
            return str(exc)
        h, w = sample.image.shape[:2]
        views = self.spec.sample(sample.id, h, w)
        rgb = to_unit_rgb(sample.image, self.bands, self.max_value, sample.valid)
        params = np.stack([v.to_array() for v in views])
        valid = valid_fraction(sample.valid, (h, w), views, self.spec.crop_size)
        return j, params, torch.from_numpy(render_views(rgb, views, self.spec.crop_size)), valid


def dataset_attrs(dataset: SegmentationDataset, ids: list[str]) -> dict:
    return {**dataset.describe(), "num_samples": len(ids), "ids_sha256": ids_sha256(ids)}


@dataclass
class ViewTable:
    """What a cache tells training, without the features: the samples, their A views and the
    attributes a cache would carry. Views are a pure function of (seed, sample id), so these are the
    views `extract` would store; `train --teachers online` runs from it when there is no cache."""

    url: str
    attrs: dict
    ids: list[str]
    views: np.ndarray
    valid: np.ndarray

    def views_array(self) -> np.ndarray:
        return self.views

    def valid_array(self) -> np.ndarray:
        return self.valid


def view_table(dataset: SegmentationDataset, splits_dir: str, spec: ViewSpec, teachers: list[Teacher]) -> ViewTable:
    """The views and their valid shares (read from every sample's pixels, as extraction would)."""
    ids = dataset.ids_in("train")
    if not ids:
        raise RsmtdfError(f"{dataset.root}: no training samples")
    drawn = [spec.sample(sid, *dataset.size_of(dataset.index(sid))) for sid in ids]
    views = np.stack([np.stack([v.to_array() for v in vs]) for vs in drawn])
    valid = np.stack([_valid_of(dataset, sid, vs, spec.crop_size) for sid, vs in zip(ids, drawn)])
    attrs = expected_attrs(dataset_attrs(dataset, ids), splits_mod.describe(splits_dir), spec.to_attrs(),
                           [t.spec() for t in teachers], "none")
    return ViewTable(f"(no cache: views of {dataset.root})", {**attrs, "complete": True}, ids, views, valid)


def _valid_of(dataset: SegmentationDataset, sample_id: str, views: list, crop: int) -> np.ndarray:
    sample = dataset.load(dataset.index(sample_id), with_mask=False)
    return valid_fraction(sample.valid, sample.image.shape[:2], views, crop)


def auto_shard_samples(spec: ViewSpec, teachers: list[Teacher], storage: str) -> int:
    per_sample = spec.count * sum(t.num_tokens * t.dim for t in teachers) * (1 if storage == "int8" else 2)
    return max(1, int(SHARD_BYTES // per_sample))


def extract(dataset: SegmentationDataset, splits_dir: str, spec: ViewSpec, teachers: list[Teacher], output: str,
            *, shard_samples: int | None = None, shard_index: int = 0, num_shards: int = 1, batch_size: int = 8,
            num_workers: int = 2, storage: str = "float16", device: str = "cpu",
            bands: tuple[int, int, int] = (0, 1, 2), max_value: float | None = None,
            progress: bool = True) -> ExtractSummary:
    """Extract this worker's shards (every `num_shards`-th from `shard_index`), resumably."""
    if not 0 <= shard_index < num_shards:
        raise RsmtdfError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    ids = dataset.ids_in("train")
    if not ids:
        raise RsmtdfError(f"{dataset.root}: no training samples to extract")
    attrs = expected_attrs(dataset_attrs(dataset, ids), splits_mod.describe(splits_dir), spec.to_attrs(),
                           [t.spec() for t in teachers], storage)
    layouts = [TeacherLayout(t.name, t.num_tokens, t.dim) for t in teachers]
    shard_samples = shard_samples or auto_shard_samples(spec, teachers, storage)
    cache = FeatureCache.create(output, ids, attrs, layouts, shard_samples)
    owned = [k for k in range(cache.num_shards) if k % num_shards == shard_index]
    done = cache.done_flags()
    todo = [k for k in owned if not done[k]]
    order = [i for k in todo for i in cache.shard_range(k)]
    teachers = [t.to(device) for t in teachers]

    source = ViewSource(dataset, [dataset.index(ids[i]) for i in order], spec, bands, max_value)
    loader = DataLoader(source, batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
                        persistent_workers=False)
    start, written, pending, empty = time.perf_counter(), 0, None, 0
    bar = tqdm(total=len(order), unit="sample", desc=f"extract {output}", disable=not progress, dynamic_ncols=True)
    items = iter(loader)
    try:  # close the bar even on an error, so the error line comes after it
        with ThreadPoolExecutor(max_workers=1) as writer:
            for k in todo:
                r = cache.shard_range(k)
                params, crops, valid = [], [], []
                for _ in r:
                    item = next(items)
                    if isinstance(item, str):
                        raise RsmtdfError(item)
                    params.append(item[1])
                    crops.append(item[2])
                    valid.append(item[3])
                    bar.update(1)
                targets = _run_teachers(teachers, torch.cat(crops), batch_size, device, len(r), spec.count)
                _check_finite(targets, output, [ids[i] for i in r], k)
                empty += sum(int(v.max() == 0) for v in valid)
                if pending is not None:
                    written += pending.result()
                pending = writer.submit(cache.write_shard, k, np.stack(params), targets, np.stack(valid))
                bar.set_postfix(shards=f"{todo.index(k) + 1}/{len(todo)}")
            if pending is not None:
                written += pending.result()
    finally:
        bar.close()
    missing = cache.missing_shards()
    if not missing and not cache.attrs.get("complete"):
        cache.finalize()
    return ExtractSummary(len(order), spec.count, time.perf_counter() - start, written, len(todo),
                          len(owned) - len(todo), missing, empty)


def _check_finite(targets: dict[str, np.ndarray], output: str, ids: list[str], shard: int) -> None:
    """A NaN or inf feature is never stored: name the first (sample, view) that has one."""
    for name, x in targets.items():
        bad = ~np.isfinite(x).all(axis=(2, 3))
        if bad.any():
            i, a = (int(v[0]) for v in np.nonzero(bad))
            raise RsmtdfError(f"{output}: teacher '{name}' gave non-finite features for sample '{ids[i]}' view {a}; "
                              f"shard {shard} was not written")


def _run_teachers(teachers: list[Teacher], crops: torch.Tensor, batch_size: int, device: str,
                  n: int, a: int) -> dict[str, np.ndarray]:
    """Targets of one shard's (sample, view) crops, in fixed batches: (n, a, L, C) float32 each."""
    out = {}
    for t in teachers:
        parts = [t.targets(crops[b : b + batch_size].to(device)).float().cpu() for b in range(0, len(crops), batch_size)]
        out[t.name] = torch.cat(parts).reshape(n, a, t.num_tokens, t.dim).numpy()
    return out
