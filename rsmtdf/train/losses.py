"""Stage two's targets and losses: the distillation targets of a step in each teacher mode (the
only place the modes differ), token maps mixed with the pixels' CutMix box, and the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.teachers import Teacher


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


def mix_step(inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The strong unlabeled crops and their ignore masks with CutMix applied: the box's pixels come
    from the flipped batch (the pseudo-labels are mixed alike, once computed)."""
    mix = inp.box.bool()
    return torch.where(mix.unsqueeze(1), inp.xs.flip(0), inp.xs), torch.where(mix, inp.ignore.flip(0), inp.ignore)


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


@dataclass(frozen=True)
class Normalisers:
    """What the losses of one optimiser step are divided by, over all its micro-batches, so that k
    micro-batches of b give the gradient of one batch of k·b: the labeled pixels that are scored, the
    unlabeled pixels that are valid (after CutMix), and the samples (every sample has as many tokens)."""

    labeled: torch.Tensor
    unlabeled: torch.Tensor
    samples: int

    @classmethod
    def of(cls, ys: list[torch.Tensor], ignores: list[torch.Tensor]) -> Normalisers:
        return cls(sum((y != 255).sum() for y in ys), sum((i != 255).sum() for i in ignores),
                   sum(len(y) + len(i) for y, i in zip(ys, ignores)))


def step_losses(out, y: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor, ignore: torch.Tensor,
                targets: dict[str, torch.Tensor], conf_thresh: float, kind: str,
                norm: Normalisers | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch's share of the step's losses from the student's output on cat(labeled,
    unlabeled-mixed): supervised CE, FixMatch CE on confident pseudo-labels (over every valid pixel,
    as the reference normalises), distillation averaged over teachers, and their mean; with the
    pseudo-labels' mask ratio. Divided by the step's `norm` (default: this batch's own), so the
    shares of a step's micro-batches add up to the losses of their union."""
    norm = norm or Normalisers.of([y], [ignore])
    logits_l, logits_u = out.logits.float().split([len(y), len(pseudo)])
    loss_sup = F.cross_entropy(logits_l, y, ignore_index=255, reduction="sum") / norm.labeled  # no pixel: NaN, refused
    valid = ignore != 255
    confident = (conf >= conf_thresh) & valid
    unlabeled = norm.unlabeled.clamp(min=1)
    loss_unsup = (F.cross_entropy(logits_u, pseudo, reduction="none") * confident).sum() / unlabeled
    share = (len(y) + len(pseudo)) / norm.samples
    losses = [distill_loss(out.translated[n], targets[n], kind) * share for n in targets]
    loss_distill = torch.stack(losses).mean() if losses else torch.zeros((), device=y.device)
    return {"loss": (loss_sup + loss_unsup + loss_distill) / 3, "loss_sup": loss_sup, "loss_unsup": loss_unsup,
            "loss_distill": loss_distill, "mask_ratio": confident.float().sum() / unlabeled}


@torch.no_grad()
def update_ema(ema: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """ema ← momentum · ema + (1 - momentum) · student, buffers too (counters copied)."""
    for p_ema, p in zip(ema.parameters(), student.parameters()):
        p_ema.mul_(momentum).add_(p.detach(), alpha=1 - momentum)
    for b_ema, b in zip(ema.buffers(), student.buffers()):
        if b.dtype.is_floating_point:
            b_ema.mul_(momentum).add_(b.detach(), alpha=1 - momentum)
        else:  # counters such as BatchNorm's num_batches_tracked
            b_ema.copy_(b)
