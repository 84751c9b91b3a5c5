"""Stage two: RS-MTDF, i.e. FixMatch with an EMA teacher plus multi-teacher distillation and fusion.

Data flows one way: cache + dataset → views → student → losses. Each step replays one of the
cache's stored views per sample (ARCHITECTURE.md §1), so the teachers' targets for the student's
crop are read, not computed. Three teacher modes share one code path; only `losses.targets_for`
differs:

- `cached`        targets read from the cache (default);
- `online`        the same targets computed on the fly from the same clean views;
- `online-strong` the reference code's semantics: teachers see the strong, CutMixed student input.

The recipe is resolved once (`pipeline.resolve`) and its identity compared with the cache's, field
by field, before anything is written. Every random choice is drawn from a generator seeded by
(seed, epoch, sample) and the sampler can start mid-epoch, so `--resume` continues the same
trajectory bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cache.store import FeatureCache
from ..config.recipe import Recipe
from ..data.splits import check_labeled, read_list
from ..errors import RsmtdfError, worker_errors_as_lines
from ..evaluate.evaluator import evaluate
from ..models.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from ..models.student import Student, TeacherSlot
from ..models.teachers import Teacher
from ..pipeline.extract import view_table
from ..pipeline.resolve import check_for_student, resolve, student_input_norm, student_weights
from ..transforms.augment import box_masks, strong_batch
from ..utils.launch import choose_device
from ..utils.runtime import keep_freed_buffers
from .loader import EpochSampler, ReplaySet, collate, one_ahead, read_targets, render_crops, whole_steps
from .losses import Normalisers, StepInputs, distill_loss, mix_step, step_losses, targets_for, update_ema
from .runlog import PICTURES, RunLog
from .runs import check_run_dir, check_schedule, claim_run_dir, micro_batches, truncate_metrics

MODES = ("cached", "online", "online-strong")


class Trainer:
    """Everything one training run holds; `fit` runs it, `state`/`load_state` checkpoint it."""

    def __init__(self, cache_path: str | None, split: str, recipe: Recipe, run_dir: Path, mode: str = "cached",
                 device: str = "auto", teacher_weights: dict[str, str] | None = None, resume: bool = False,
                 checkpoint_every: int = 0, progress: bool = True, overwrite: bool = False,
                 new_schedule: bool = False) -> None:
        if mode not in MODES:
            raise RsmtdfError(f"--teachers {mode}: choose one of {', '.join(MODES)}")
        self.recipe, self.mode, self.run_dir, self.progress = recipe, mode, Path(run_dir), progress
        self.checkpoint_every, self.split = checkpoint_every, split
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(choose_device(device))
        check_run_dir(self.run_dir, resume, overwrite)  # checked now; an --overwrite moves it only at the end
        check_for_student(recipe, training=True)
        self.notes: list[str] = []  # what the caller should tell the user before training starts
        self.resolved = resolve(recipe)
        self.dataset, self.scaling = self.resolved.dataset, self.resolved.scaling
        self.teachers = [t.to(self.device) for t in self._open_cache(cache_path, teacher_weights or {})]
        self.class_names = self.identity.class_names
        labeled, unlabeled = self._split_lists(split)

        torch.manual_seed(recipe.train.seed)
        self._build_models()
        self._build_data(labeled, unlabeled)
        self.optimizer = self.make_optimizer()
        self.step, self.best = 0, {"mIoU": -1.0, "mIoU_ema": -1.0, "step": 0}
        if resume:
            self._resume(new_schedule)
        self.moved_aside = claim_run_dir(self.run_dir, resume, overwrite, move=self.rank == 0)

    # -- set-up --

    def _open_cache(self, cache_path: str | None, weights: dict[str, str]) -> list[Teacher]:
        """Open the cache (or, without one, the views a cache would hold) and refuse one whose
        identity differs from the recipe's; returns the online teachers (none when cached)."""
        wanted = self.resolved.identity
        if cache_path is None:  # online teachers on the views a cache would hold
            if self.mode == "cached":
                raise RsmtdfError("--teachers cached needs --cache (or run with --teachers online)")
            teachers = self.resolved.teachers(weights)
            self.cache = view_table(self.resolved, teachers)
        else:
            self.cache = FeatureCache.open(cache_path)
            if not self.cache.attrs.get("complete"):
                raise RsmtdfError(f"{cache_path}: cache is not finalized ({len(self.cache.missing_shards())} shards "
                                  "unwritten); finish `rsmtdf extract-features` first")
            self.cache.identity.require(wanted, cache_path, "the cache", self.resolved.label)
            teachers = []
            if self.mode != "cached":  # the cache's teachers built again: their weights must be the cache's
                teachers = self.resolved.teachers(weights)
                self.cache.identity.require(self.resolved.built(teachers), cache_path, "the cache",
                                            "the online teachers", what="online teachers differ from the cache's: ")
        self.identity = dataclasses.replace(self.cache.identity, student_input=self.scaling)
        return teachers

    def _split_lists(self, split: str) -> tuple[list[str], list[str]]:
        """The split's labeled and unlabeled ids (from the recipe's lists, whose hash the cache's
        identity records), the validation ids, and the tiles left out for showing no pixel."""
        splits, url = self.recipe.data.splits, self.cache.url
        labeled = read_list(splits, f"{split}/labeled")
        unlabeled = read_list(splits, f"{split}/unlabeled")
        check_labeled(self.dataset, labeled, Path(splits) / f"{split}/labeled.txt")
        index = {sid: i for i, sid in enumerate(self.cache.ids)}
        for sid in labeled + unlabeled:
            if sid not in index:
                raise RsmtdfError(f"{url}: split '{split}' names sample '{sid}', which the cache does not hold")
        valid = self.cache.valid_array()
        empty = {sid for sid in labeled + unlabeled if not (valid[index[sid]] > 0).any()}
        if empty:
            labeled = [sid for sid in labeled if sid not in empty]
            unlabeled = [sid for sid in unlabeled if sid not in empty]
            self.notes.append(f"left out {len(empty)} tiles of split '{split}' without valid pixels (NaN or "
                              f"nodata in every view), e.g. {sorted(empty)[0]}")
            if not labeled:
                raise RsmtdfError(f"{url}: every labeled tile of split '{split}' is without valid pixels")
        self.val_ids = read_list(splits, "val")
        check_labeled(self.dataset, self.val_ids, Path(splits) / "val.txt")
        return labeled, unlabeled

    def _build_models(self) -> None:
        """The student (its fusion slots from the cache's teachers), its EMA twin and the DDP wrapper."""
        st = self.recipe.student
        slots = [TeacherSlot(t.name, t.dim, t.grid, t.input_size) for t in self.identity.teachers]
        channels = {} if len(self.scaling.bands) == 3 else {"in_chans": len(self.scaling.bands)}
        self.student = Student(st.encoder, len(self.class_names), self.identity.views.crop_size, slots, st.decoder,
                               st.fusion_weights, st.translator_hidden, pretrained=student_weights(st),
                               extra_norm=student_input_norm(self.resolved), scaling=self.scaling.record(),
                               **st.kwargs, **channels).to(self.device)
        self.ema = Student.from_config(self.student.config).to(self.device)
        self.ema.load_state_dict(self.student.state_dict())
        self.ema.eval().requires_grad_(False)
        self.model = self.student
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _build_data(self, labeled: list[str], unlabeled: list[str]) -> None:
        """The labeled and unlabeled replay sets, their samplers and loaders, and the schedule."""
        tr, crop = self.recipe.train, self.identity.views.crop_size
        snap = math.lcm(self.student.patch, *[crop // t.grid for t in self.identity.teachers if crop % t.grid == 0])
        self.reader = self.cache.reader() if self.mode == "cached" else None
        common = dict(dataset=self.dataset, cache_index={sid: i for i, sid in enumerate(self.cache.ids)},
                      views=self.cache.views_array(), valid=self.cache.valid_array(), crop=crop, seed=tr.seed,
                      snap=snap, scaling=self.scaling, tiles_mb=tr.decoded_cache_mb)
        # as the reference: the labeled list is repeated to the length of the unlabeled one
        reps = math.ceil(max(len(unlabeled), 1) / len(labeled))
        self.sets = {"l": ReplaySet(ids=(labeled * reps)[: max(len(unlabeled), len(labeled))], unlabeled=False, **common),
                     "u": ReplaySet(ids=unlabeled or labeled, unlabeled=True, **common)}
        self.samplers = {k: EpochSampler(len(s), tr.seed + (k == "u"), self.rank, self.world) for k, s in self.sets.items()}
        self.batch, self.accumulate = tr.batch_size, micro_batches(tr, self.world)
        self.loaders = self.make_loaders()
        self.steps_per_epoch = len(self.samplers["u"]) // (self.batch * self.accumulate)
        if self.steps_per_epoch == 0:
            raise RsmtdfError(f"split '{self.split}': {len(self.sets['u'])} unlabeled samples is less than one step "
                              f"of {self.accumulate} × {self.batch}")
        self.total = tr.max_steps or tr.epochs * self.steps_per_epoch

    def _resume(self, new_schedule: bool) -> None:
        latest = self.run_dir / "latest.pt"
        ckpt = load_checkpoint(latest)
        check_resumable(ckpt, latest, self.identity, self.student.config, self.split)
        old = {"accumulate": 1, **ckpt["scheduler"].get("schedule", {"total": ckpt["scheduler"]["total"]})}
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

    def schedule(self) -> dict:
        """What the learning-rate schedule depends on; a resume must keep it (or say --new-schedule)."""
        tr = self.recipe.train
        return {"total": self.total, "epochs": tr.epochs, "max_steps": tr.max_steps, "batch_size": self.batch,
                "processes": self.world, "accumulate": self.accumulate}

    # -- state --

    def state(self) -> dict:
        return {"identity": self.identity, "model": self.student.config, "split": self.split,
                "student": self.student.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": {"step": self.step, "total": self.total, "schedule": self.schedule()},
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

    def train_step(self, inp: StepInputs | list[StepInputs],
                   against: StepInputs | list[StepInputs] | None = None) -> dict[str, float]:
        """One optimiser step on `inp`, one batch or the `accumulate` micro-batches of one step (their
        losses normalised over all of them, gradients synced across processes once); its losses.
        `against`: the same inputs with other targets (another cache's, say): the distillation loss
        of this step's student output against them is reported too (`loss_distill_against`), so that
        runs from two storages of the same targets are measured on one yardstick."""
        tr = self.recipe.train
        micro = [inp] if isinstance(inp, StepInputs) else list(inp)
        others = [against] if isinstance(against, StepInputs) else list(against or [None] * len(micro))
        mixed = [mix_step(m) for m in micro]
        norm = Normalisers.of([m.y for m in micro], [ignore for _, ignore in mixed])
        lr = self.lr_at(self.step)
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.param_groups[1]["lr"] = lr * tr.head_lr_multiplier
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for i, (m, (xs_mixed, ignore), other) in enumerate(zip(micro, mixed, others)):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last or self.world == 1 else self.model.no_sync():
                losses = self._micro_step(m, xs_mixed, ignore, norm, other)
                losses["loss"].backward()
            totals = {k: totals.get(k, 0) + v.detach() for k, v in losses.items()}
        self.optimizer.step()
        update_ema(self.ema, self.student, min(1 - 1 / (self.step + 1), tr.ema_momentum))
        self.step += 1
        return {**{k: v.item() for k, v in totals.items()}, "lr": lr}

    def _micro_step(self, inp: StepInputs, xs_mixed: torch.Tensor, ignore: torch.Tensor, norm: Normalisers,
                    against: StepInputs | None) -> dict[str, torch.Tensor]:
        """The forward pass of one micro-batch and its share of the step's losses."""
        tr = self.recipe.train
        with torch.no_grad():  # the EMA model does not change within a step
            conf, pseudo = self.ema(inp.xw).logits.softmax(1).max(1)
        mix = inp.box.bool()
        pseudo, conf = torch.where(mix, pseudo.flip(0), pseudo), torch.where(mix, conf.flip(0), conf)
        targets = targets_for(self.mode, self.teachers, inp, xs_mixed)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(torch.cat([inp.x, xs_mixed]))
        losses = step_losses(out, inp.y, pseudo, conf, ignore, targets, tr.conf_thresh, tr.distill_loss, norm)
        if not torch.isfinite(losses["loss"]):
            self._refuse_nonfinite(inp, {k.removeprefix("loss_"): v for k, v in losses.items() if k != "loss"})
        if against is not None:
            other = targets_for(self.mode, self.teachers, against, xs_mixed)
            share = (len(inp.y) + len(inp.xw)) / norm.samples
            losses["loss_distill_against"] = share * torch.stack(
                [distill_loss(out.translated[n], other[n], tr.distill_loss) for n in other]).mean().detach()
        return losses

    def _refuse_nonfinite(self, inp: StepInputs, parts: dict[str, torch.Tensor]) -> None:
        """A NaN or inf loss ends the run in one line naming the step and its samples; the step is
        not applied, so no NaN reaches a weight or a checkpoint."""
        ids = self.cache.ids
        named = [ids[int(i)] for t in (inp.index_l, inp.index_u) if t is not None for i in t]
        losses = ", ".join(f"{k} {v.item():.4g}" for k, v in parts.items() if k != "mask_ratio")
        raise RsmtdfError(f"step {self.step + 1}: the loss is not finite ({losses}) on samples "
                          f"{', '.join(named) or '(unknown)'}; nothing of this step was applied")

    def batches(self, epoch: int, start: int):
        """The micro-batches of `epoch` from optimiser step `start` on, as `StepInputs` on the device:
        loaders, crops made on the device, targets read one batch ahead."""
        for sampler in self.samplers.values():
            sampler.epoch, sampler.start = epoch, start * self.batch * self.accumulate

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
                *([{k: self.reader.decode(k, dev(v)) for k, v in t.items()} for t in read] if read else (None, None)),
                bl["index"], bu["index"])

    def fit(self) -> dict:
        """Train to the end (from the resumed step), evaluating and checkpointing; returns the last
        metrics. The run folder's files appear with the first step done: a run refused before it
        (a damaged cache, say) leaves the folder as it was."""
        tr = self.recipe.train
        log = RunLog(self.run_dir, self.recipe, self.class_names) if self.rank == 0 else None
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", disable=not self.progress or self.rank,
                   dynamic_ncols=True)
        start_time, start_step, last = time.perf_counter(), self.step, {}
        try:  # the error line goes after the bar, not onto it
            while self.step < self.total:
                epoch, offset = divmod(self.step, self.steps_per_epoch)
                for micro in whole_steps(self.batches(epoch, offset), self.accumulate):
                    self.student.train()
                    last = self.train_step(micro)
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
        finally:
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
