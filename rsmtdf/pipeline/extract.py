"""Stage one: run the frozen teachers once over every training sample and its A views, into the cache.

Data flows one way: dataset → views → teachers → cache. Loader workers decode tiles and render
views; the main thread runs the teachers in fixed batches inside each shard; a writer thread
compresses and writes whole shards while the teachers work on the next one.

Exactness: torch's results change with its intra-op thread count (resampling and convolutions split
their work differently), and with the batch a crop is in. So every op runs on one intra-op thread
(loader workers already do), CPU parallelism comes from running the fixed batches of a shard in a
thread pool instead, and the batch size and device type are recorded in the cache: a shard's values
do not depend on `--workers`, the thread count or the machine's core count, and a resume with
another batch size or device is refused.
"""

from __future__ import annotations

import errno
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..cache.choice import choose, fit_pca, fixed_kind
from ..cache.format import TeacherLayout, raw_bytes_per_sample
from ..cache.identity import Identity
from ..cache.storage import Kind, Pca
from ..cache.store import FeatureCache
from ..cache.verify import verify_cache
from ..data.datasets import SegmentationDataset
from ..errors import RsmtdfError
from ..io.remote import is_url
from ..models.teachers import Teacher
from ..transforms.scaling import BandScaling
from ..transforms.views import ViewSpec, render_views, valid_fraction
from ..utils.files import format_bytes
from ..utils.runtime import intra_op_threads
from ..config.recipe import Recipe
from ..utils.launch import choose_device, launch_rank
from .resolve import Resolved, check_for_student, default_cache, resolve

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
    repaired: list[int] | None = None
    repaired_ids: bool = False
    repaired_basis: list[str] = field(default_factory=list)  # teachers whose pca basis was written again
    notes: list[str] = field(default_factory=list)  # what each teacher stores, why, and what that keeps
    empty: int = 0  # samples of this run with no valid pixel in any view (training leaves them out)
    skipped_tiles: int = 0  # tiles of the dataset's scenes without any valid pixel, never listed as samples

    def line(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        state = "complete" if not self.missing else f"incomplete: {len(self.missing)} shards left to other workers"
        ids = "the ids array and " if self.repaired_ids else ""
        ids += "".join(f"the pca basis of '{t}' and " for t in self.repaired_basis)
        repaired = "" if self.repaired is None else f"repaired {ids}{len(self.repaired)} damaged shards {self.repaired[:20]}; "
        notes = "".join(f"{note}\n" for note in self.notes)  # lines before the summary: storage chosen, kept
        return (f"{notes}{repaired}extracted {self.samples} samples × {self.views} views in {self.seconds:.1f} s "
                f"({rate:.2f} samples/s), wrote {self.bytes_written / 1e6:.1f} MB; shards done {self.shards_done}, "
                f"skipped {self.shards_skipped}; cache {state}"
                + (f"; {self.empty} tiles have no valid pixels (NaN/nodata) and are left out of training"
                   if self.empty else "")
                + (f"; {self.skipped_tiles} tiles of the scenes hold only nodata and are not samples"
                   if self.skipped_tiles else ""))


class ViewSource(Dataset):
    """Sample i → (i, view params (A, 5), rendered views (A, 3, crop, crop), valid shares (A,)),
    errors as one line."""

    def __init__(self, dataset: SegmentationDataset, indices: list[int], spec: ViewSpec,
                 scaling: BandScaling = BandScaling()) -> None:
        self.dataset, self.indices, self.spec, self.scaling = dataset, indices, spec, scaling

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        try:
            sample = self.dataset.load(self.indices[j])  # loads and checks the mask too
        except RsmtdfError as exc:  # pass it to the main process as a line, not a worker traceback
            return str(exc)
        h, w = sample.image.shape[:2]
        views = self.spec.sample(sample.id, h, w)
        rgb = self.scaling.unit(sample.image, sample.valid)
        params = np.stack([v.to_array() for v in views])
        valid = valid_fraction(sample.valid, (h, w), views, self.spec.crop_size)
        with intra_op_threads(1):  # a worker already runs one; the main process (--workers 0) must too
            crops = render_views(rgb, views, self.spec.crop_size)
        return j, params, torch.from_numpy(crops), valid


@dataclass
class ViewTable:
    """What a cache tells training, without the features: the samples, their A views and the
    identity a cache would have. Views are a pure function of (seed, sample id), so these are the
    views `extract` would store; `train --teachers online` runs from it when there is no cache."""

    url: str
    identity: Identity
    ids: list[str]
    views: np.ndarray
    valid: np.ndarray

    def views_array(self) -> np.ndarray:
        return self.views

    def valid_array(self) -> np.ndarray:
        return self.valid


def view_table(resolved: Resolved, teachers: list[Teacher]) -> ViewTable:
    """The views and their valid shares (read from every sample's pixels, as extraction would)."""
    dataset, spec = resolved.dataset, resolved.recipe.view_spec()
    ids = training_ids(dataset)
    drawn = [spec.sample(sid, *dataset.size_of(dataset.index(sid))) for sid in ids]
    views = np.stack([np.stack([v.to_array() for v in vs]) for vs in drawn])
    valid = np.stack([_valid_of(dataset, sid, vs, spec.crop_size) for sid, vs in zip(ids, drawn)])
    identity = replace(resolved.built(teachers), storage=None, storage_options=None)  # computed online: none stored
    return ViewTable(f"(no cache: views of {dataset.root})", identity, ids, views, valid)


def training_ids(dataset: SegmentationDataset) -> list[str]:
    ids = dataset.ids_in("train")
    if not ids:
        raise RsmtdfError(f"{dataset.root}: no training samples to extract")
    return ids


def _valid_of(dataset: SegmentationDataset, sample_id: str, views: list, crop: int) -> np.ndarray:
    sample = dataset.load(dataset.index(sample_id), with_mask=False)
    return valid_fraction(sample.valid, sample.image.shape[:2], views, crop)


def auto_shard_samples(spec: ViewSpec, teachers: list[Teacher], storage: str | dict[str, Kind]) -> int:
    layouts = [TeacherLayout(t.name, t.num_tokens, t.dim) for t in teachers]
    per_sample = raw_bytes_per_sample(layouts, spec.count, storage)
    return max(1, int(SHARD_BYTES // per_sample))


def extract_recipe(recipe: Recipe, output: str | None = None, teacher_weights: dict[str, str] | None = None, *,
                   shard_index: int | None = None, num_shards: int | None = None, **options) -> tuple[ExtractSummary, str]:
    """`extract` of a recipe as the command line and the API run it: resolved, its teachers built,
    into `output` (default: `resolve.default_cache`), this process's share of the shards by default
    its rank among a torchrun or SLURM launch's. Returns the summary and where the cache is."""
    options["device"] = choose_device(options.get("device", "auto"))  # an option checked before the data
    check_for_student(recipe, training=False)
    output = str(output or default_cache(recipe))
    rank, world = launch_rank()
    resolved = resolve(recipe)
    summary = extract(resolved, resolved.teachers(teacher_weights), output,
                      shard_index=rank if shard_index is None else shard_index,
                      num_shards=world if num_shards is None else num_shards, **options)
    return summary, output


def extract(resolved: Resolved, teachers: list[Teacher], output: str, *, shard_samples: int | None = None,
            shard_index: int = 0, num_shards: int = 1, batch_size: int = 8, num_workers: int = 2,
            device: str = "auto", progress: bool = True, repair: bool = False) -> ExtractSummary:
    """Extract this worker's shards (every `num_shards`-th from `shard_index`) of the resolved
    recipe's cache into `output`, resumably; the recipe (as TOML, for `train` without -r) and the
    identity are kept in its attributes. With `repair`, first verify those shards and drop the
    damaged ones, so exactly they are extracted again. The device and the shard options are
    checked before anything is written; a full disk ends in one line saying what the shards still
    to write need."""
    device = choose_device(device)
    if not 0 <= shard_index < num_shards:
        raise RsmtdfError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    dataset, spec, storage = resolved.dataset, resolved.recipe.view_spec(), resolved.recipe.teachers.storage
    ids = training_ids(dataset)
    layouts = [TeacherLayout(t.name, t.num_tokens, t.dim) for t in teachers]
    if repair and not FeatureCache.exists(output):
        raise RsmtdfError(f"{output}: no cache here to repair (extract it without --repair)")
    teachers = [t.to(device) for t in teachers]
    kinds, notes = (None, []) if FeatureCache.exists(output) else decide_storage(resolved, teachers, ids, batch_size,
                                                                                  device)
    shard_samples = shard_samples or min(len(ids), auto_shard_samples(spec, teachers, kinds or storage))
    owned = [k for k in range(-(-len(ids) // shard_samples)) if k % num_shards == shard_index]
    compute = _compute(device, batch_size)
    try:
        cache = FeatureCache.create(output, ids, resolved.built(teachers),
                                    {"compute": compute, "recipe": resolved.recipe.to_toml()}, layouts, shard_samples,
                                    wanted_in=resolved.label, kinds=kinds)
        owned = [k for k in range(cache.num_shards) if k % num_shards == shard_index]  # a resume: the cache's shards
        _check_compute(cache, compute)
        def refit(names: list[str]) -> dict[str, Pca]:  # the probe again, for a damaged basis
            probe = probe_targets(resolved, teachers, ids, batch_size, device)
            return {n: fit_pca(probe[n], n, spec.seed) for n in names}

        repaired = _drop_damaged(cache, owned, ids, progress, refit) if repair else (None, False, [])
        summary = _extract_shards(cache, dataset, ids, spec, teachers, owned, batch_size, num_workers, device,
                                  resolved.scaling.teachers(), progress, _floor_from(resolved))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise RsmtdfError(_disk_full(output, layouts, spec.count, kinds or storage, owned, shard_samples,
                                     len(ids))) from None
    summary.repaired, summary.repaired_ids, summary.repaired_basis = repaired
    summary.skipped_tiles, summary.notes = dataset.skipped_empty, notes + summary.notes
    return summary


def decide_storage(resolved: Resolved, teachers: list[Teacher], ids: list[str], batch_size: int,
                   device: str) -> tuple[dict[str, Kind], list[str]]:
    """What each teacher of a new cache stores, and why (lines to print): the kind the request
    names, or for pca and auto a decision on the targets of `probe_samples` samples spread over the ids, all
    their views, computed as a shard's are (`cache.choice.choose`)."""
    ident, recipe = resolved.identity, resolved.recipe
    kind = fixed_kind(ident.storage, ident.storage_options)
    key = "teachers.group_size" if kind is not None else "teachers.storage"
    try:
        if kind is not None:
            for t in teachers:
                kind.check(t.name, t.dim)
            return {t.name: kind for t in teachers}, []
        probe = probe_targets(resolved, teachers, ids, batch_size, device)
        choices = {t.name: choose(ident.storage, ident.storage_options, t.name, probe[t.name], recipe.views.seed)
                   for t in teachers}
    except RsmtdfError as exc:
        raise RsmtdfError(f"{recipe.where(key)}: {exc}") from None
    return {n: c.kind for n, c in choices.items()}, [f"storage   {c.why}" for c in choices.values()]


def probe_targets(resolved: Resolved, teachers: list[Teacher], ids: list[str], batch_size: int,
                  device: str) -> dict[str, np.ndarray]:
    """Float32 targets (n, A, L, C) of `[teachers] probe_samples` of `ids` evenly spread over them
    (a dataset's ids run scene by scene: the first few would fit one scene's features), with all
    their views, rendered and run as in a shard: the same on every worker that computes them."""
    dataset, spec = resolved.dataset, resolved.recipe.view_spec()
    chosen = spread(ids, resolved.identity.storage_options.probe_samples)
    source = ViewSource(dataset, [dataset.index(i) for i in chosen], spec, resolved.scaling.teachers())
    items = [source[j] for j in range(len(source))]
    if failed := next((item for item in items if isinstance(item, str)), None):
        raise RsmtdfError(failed)
    return run_teachers(teachers, torch.cat([item[2] for item in items]), batch_size, device, len(chosen), spec.count)


def spread(ids: list[str], n: int) -> list[str]:
    """n of `ids` evenly spaced from the first to the last (all of them when there are no more)."""
    if n >= len(ids):
        return list(ids)
    return [ids[round(j * (len(ids) - 1) / max(n - 1, 1))] for j in range(n)]


def _floor_from(resolved: Resolved) -> str:
    """Where the floor on the mean token cosine was set: min_cosine's source, else storage's (auto's default)."""
    recipe = resolved.recipe
    key = "teachers.min_cosine" if recipe.teachers.min_cosine else "teachers.storage"
    return recipe.origins.get(key, recipe.source)


def _compute(device: str, batch_size: int) -> dict:
    """What, besides the inputs, decides a shard's values (see the module docstring)."""
    return {"device": torch.device(device).type, "batch_size": batch_size}


def _check_compute(cache: FeatureCache, compute: dict) -> None:
    """Shards already written pin the settings their values depend on; a cache with none written
    takes this run's (an earlier run that wrote nothing, say on a device it could not use, pins nothing)."""
    found = cache.attrs.get("compute")
    if found == compute:
        return
    if not cache.done_flags().any():
        cache.group.attrs["compute"] = cache.attrs["compute"] = compute
        return
    raise RsmtdfError(f"{cache.url}: its shards were extracted with --batch-size {found['batch_size']} on "
                      f"{found['device']}; this run uses --batch-size {compute['batch_size']} on "
                      f"{compute['device']}, which gives other float16 values: resume with the same settings, "
                      f"or choose another --output")


def _drop_damaged(cache: FeatureCache, owned: list[int], ids: list[str], progress: bool,
                  refit: Callable[[list[str]], dict[str, Pca]]) -> tuple[list[int], bool, list[str]]:
    """Verify this worker's shards; rewrite damaged ids, and a damaged pca basis if fitting it
    again (`refit`) gives the one recorded; drop damaged shards (to extract again). Returns
    (dropped shards, whether the ids were rewritten, teachers whose basis was)."""
    report = verify_cache(cache, owned, progress=progress)
    if report.ids_damaged:
        cache.rewrite_ids(ids)
    for teacher, kind in (refit(list(report.basis_damaged)) if report.basis_damaged else {}).items():
        cache.rewrite_basis(teacher, kind)
    for k in report.damaged_shards:
        cache.drop_shard(k)
    return report.damaged_shards, bool(report.ids_damaged), list(report.basis_damaged)


def _extract_shards(cache: FeatureCache, dataset: SegmentationDataset, ids: list[str], spec: ViewSpec,
                    teachers: list[Teacher], owned: list[int], batch_size: int, num_workers: int, device: str,
                    scaling: BandScaling, progress: bool, floor_from: str) -> ExtractSummary:
    done = cache.done_flags()
    todo = [k for k in owned if not done[k]]
    order = [i for k in todo for i in cache.shard_range(k)]

    source = ViewSource(dataset, [dataset.index(ids[i]) for i in order], spec, scaling)
    loader = DataLoader(source, batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
                        persistent_workers=False)
    start, written, pending, empty = time.perf_counter(), 0, None, 0
    bar = tqdm(total=len(order), unit="sample", desc=f"extract {cache.url}", disable=not progress, dynamic_ncols=True)
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
                targets = run_teachers(teachers, torch.cat(crops), batch_size, device, len(r), spec.count)
                empty += sum(int(v.max() == 0) for v in valid)
                if pending is not None:
                    written += pending.result()
                pending = writer.submit(cache.write_shard, k, np.stack(params), targets, np.stack(valid), floor_from)
                bar.set_postfix(shards=f"{todo.index(k) + 1}/{len(todo)}")
            if pending is not None:
                written += pending.result()
    finally:
        bar.close()
    missing = cache.missing_shards()
    if not missing and not cache.attrs.get("complete"):
        cache.finalize()
    stored = [] if missing else [f"stored    '{name}' as {kind.describe()}: {cache.fidelity(name).line()}"
                                 for name, kind in cache.kinds.items() if cache.measured]
    return ExtractSummary(len(order), spec.count, time.perf_counter() - start, written, len(todo),
                          len(owned) - len(todo), missing, empty=empty, notes=stored)


def _disk_full(output: str, layouts: list[TeacherLayout], views: int, storage: str | dict[str, Kind], owned: list[int],
               shard_samples: int, n: int) -> str:
    """The disk-full line: this worker's shards still to write and their size, at the compression
    measured on the shards already on disk (or uncompressed when there are none yet)."""
    def size(k: int) -> int:
        return min((k + 1) * shard_samples, n) - k * shard_samples

    per_sample, basis, left = raw_bytes_per_sample(layouts, views, storage), "uncompressed, an upper bound", owned
    if FeatureCache.exists(output):
        cache = FeatureCache.open(output)
        per_sample = raw_bytes_per_sample(layouts, views, cache.kinds)
        done = cache.done_flags()
        left = [k for k in owned if not done[k]]
        written = sum(size(int(k)) for k in np.flatnonzero(done))
        if written:
            per_sample = sum(cache.bytes_stored(lay.name) for lay in layouts) / written
            basis = f"at the compression of the {int(done.sum())} shards written"
    free = "" if is_url(output) else \
        f", {format_bytes(shutil.disk_usage(Path(output).resolve().parent).free)} free"
    samples = sum(size(k) for k in left)
    return (f"{output}: disk full (no space left on device) with {len(left)} shards ({samples} samples) still to "
            f"write; they need about {format_bytes(per_sample * samples)} ({basis}){free}; free space and re-run the same "
            f"command: the shards written are kept")


def run_teachers(teachers: list[Teacher], crops: torch.Tensor, batch_size: int, device: str,
                  n: int, a: int) -> dict[str, np.ndarray]:
    """Targets of one shard's (sample, view) crops, in fixed batches: (n, a, L, C) float32 each.

    Each batch runs on one intra-op thread; on a CPU the batches run side by side in a thread pool
    as wide as torch's thread count, so the values do not depend on that count."""
    out = {}
    width = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    with intra_op_threads(1), ThreadPoolExecutor(width) as pool:
        for t in teachers:
            batches = [crops[b : b + batch_size].to(device) for b in range(0, len(crops), batch_size)]
            parts = pool.map(lambda x, t=t: t.targets(x).float().cpu(), batches)
            out[t.name] = torch.cat(list(parts)).reshape(n, a, t.num_tokens, t.dim).numpy()
    return out
