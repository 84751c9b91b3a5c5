"""Confusion-matrix segmentation metrics (mIoU, OA, Cohen's kappa, mF1) as remote-sensing papers report them.

Everything is derived from one int64 matrix (rows = target, cols = prediction) so that batches and
DDP ranks can be summed exactly before any ratio is taken; averaging per-batch scores would not match.
Beside it, the predictions at ignored pixels are counted, because the reference code's precision (and
so its F1 and kappa) counts every predicted pixel, ignored or not.

Two conventions score the same matrix (`compute(convention=...)`):

- `rsmtdf`: a class absent from both truth and prediction has no IoU (null) and is left out of the
  means; precision counts predictions at scored pixels only.
- `reference`: the paper's eval scripts: IoU = I / (U + 1e-10), so an absent class counts as 0 in the
  mean; precision divides by every predicted pixel of the class, ignored pixels included; kappa
  likewise. Exactly their arithmetic, epsilons included.

Either way, classes left out of scoring (`scored`) have their truth pixels ignored, as the reference
turns Potsdam's mask class 0 into 255, and the means run over the scored classes only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

CONVENTIONS = ("rsmtdf", "reference")
EPS = 1e-10  # the reference's


class ConfusionMatrix:
    """Accumulates a `num_classes x num_classes` pixel count matrix; `compute` turns it into scores."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # On the evaluation device so updates avoid host copies and NCCL can reduce it in place.
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.ignored_pred = torch.zeros(num_classes, dtype=torch.int64, device=device)  # predictions at ignored pixels

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of integer label maps (any equal shape); target == ignore_index pixels are skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.to(self.matrix.device).reshape(-1).long()
        target = target.to(self.matrix.device).reshape(-1).long()
        keep = target != self.ignore_index
        n = self.num_classes
        # An out-of-range label would silently land in another cell of the flattened matrix.
        if pred.numel() and bool(((pred < 0) | (pred >= n) | ((target < 0) | (target >= n)) & keep).any()):
            raise ValueError(f"labels must be in [0, {n}) or equal ignore_index={self.ignore_index}")
        self.ignored_pred += torch.bincount(pred[~keep], minlength=n)
        pred, target = pred[keep], target[keep]
        counts = torch.bincount(n * target + pred, minlength=n * n)
        self.matrix += counts.reshape(n, n)

    def all_reduce(self) -> None:
        """Sum the counts over DDP ranks so every rank reports the metrics of the whole evaluation set."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
            dist.all_reduce(self.ignored_pred, op=dist.ReduceOp.SUM)

    def compute(self, scored: Sequence[int] | None = None, convention: str = "rsmtdf") -> dict:
        """Scores in percent (kappa in 0..1) over the `scored` classes (default all), JSON-ready.

        `IoU`/`F1` list every class: scored ones as scored (their absent ones null), the others from the
        full matrix; `absent` lists the classes with neither a truth nor a predicted pixel."""
        if convention not in CONVENTIONS:
            raise ValueError(f"convention {convention!r}: choose one of {CONVENTIONS}")
        n = self.num_classes
        scored = list(range(n)) if scored is None else sorted(set(scored))
        full = self.matrix.detach().cpu().double()
        m = full.clone()
        unscored = [k for k in range(n) if k not in scored]
        m[unscored] = 0  # their truth pixels are ignored
        tp, rows, cols = m.diag(), m.sum(1), m.sum(0)
        union = rows + cols - tp
        if convention == "reference":
            every_pred = full.sum(0) + self.ignored_pred.detach().cpu().double()
            iou = tp / (union + EPS)
            precision, recall = tp / (every_pred + EPS), tp / (rows + EPS)
            f1 = 2 * precision * recall / (precision + recall + EPS)
            s = torch.tensor(scored)
            total = rows[s].sum()
            po = (tp[s].sum() / (total + EPS)).item()
            pe = ((every_pred[s] * rows[s]).sum() / (total**2 + EPS)).item()
            kappa = (po - pe) / (1 - pe + EPS)
            miou, mf1 = iou[s].mean().item(), f1[s].mean().item()
        else:
            iou, f1 = tp / union, 2 * tp / (rows + cols)  # 0/0 -> NaN for absent classes
            total = m.sum()
            po = (tp.sum() / total).item()
            pe = ((rows * cols).sum() / total**2).item()
            # pe == 1 means target and prediction are the same single class everywhere: perfect agreement.
            kappa = 1.0 if pe == 1.0 else (po - pe) / (1 - pe)
            s = torch.tensor(scored)
            miou, mf1 = torch.nanmean(iou[s]).item(), torch.nanmean(f1[s]).item()
        absent_scored = [k for k in scored if union[k] == 0]
        f_tp, f_union, f_sum = full.diag(), full.sum(1) + full.sum(0) - full.diag(), full.sum(1) + full.sum(0)
        absent = sorted(absent_scored + [k for k in unscored if f_union[k] == 0])
        iou_all = [(f_tp[k] / f_union[k]).item() if k in unscored else iou[k].item() for k in range(n)]
        f1_all = [(2 * f_tp[k] / f_sum[k]).item() if k in unscored else f1[k].item() for k in range(n)]
        return {
            "mIoU": _percent(miou), "OA": _percent(po), "kappa": _finite(kappa), "mF1": _percent(mf1),
            "IoU": [None if k in absent else 100 * iou_all[k] for k in range(n)],
            "F1": [None if k in absent else 100 * f1_all[k] for k in range(n)],
            "scored": scored, "absent": absent, "convention": convention, "pixels": int(m.sum().item()),
        }


def _finite(value: float) -> float | None:
    return None if value != value else value  # NaN -> None: the JSON stays strict


def _percent(value: float) -> float | None:
    value = _finite(value)
    return None if value is None else 100 * value


def foreground(class_names: Sequence[str]) -> int | None:
    """The class a two-class map is about (building or road against background): its IoU and F1 lead
    the report, since a model that never predicts it still scores mIoU ~50 and OA ~97."""
    if len(class_names) != 2:
        return None
    return 0 if class_names[1].lower() in ("background", "other", "clutter", "unknown") else 1


def _cell(value: float | None) -> str:
    return f"{'absent':>7}" if value is None else f"{value:7.2f}"


def format_table(metrics: dict, class_names: list[str]) -> str:
    """Plain-text table of per-class IoU/F1 and the summary scores, for logs and the eval report.

    Absent classes are named, classes outside the means are marked, and a two-class map leads with its
    foreground class."""
    if len(class_names) != len(metrics["IoU"]):
        raise ValueError(f"{len(class_names)} class names for {len(metrics['IoU'])} classes")
    scored = set(metrics.get("scored", range(len(class_names))))
    width = max(len("class"), *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'F1':>7}"]
    fg = foreground(class_names)
    if fg is not None:
        lines.insert(0, f"foreground '{class_names[fg]}': IoU {_cell(metrics['IoU'][fg]).strip()}, "
                        f"F1 {_cell(metrics['F1'][fg]).strip()}")
    lines += [f"{name:<{width}}  {_cell(i)}  {_cell(f)}" + ("" if k in scored else "  (not scored)")
              for k, (name, i, f) in enumerate(zip(class_names, metrics["IoU"], metrics["F1"]))]
    lines.append("-" * len(lines[-1 - len(class_names)]))
    lines += [f"{key:<{width}}  {_cell(metrics[key])}" for key in ("mIoU", "mF1", "OA", "kappa")]
    absent = [class_names[k] for k in metrics.get("absent", [])]
    if absent:
        how = "counted as 0 IoU in" if metrics.get("convention") == "reference" else "left out of"
        lines.append(f"absent from truth and prediction ({how} the means): {', '.join(absent)}")
    return "\n".join(lines)
