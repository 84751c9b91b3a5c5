"""Confusion-matrix segmentation metrics (mIoU, OA, Cohen's kappa, mF1) as remote-sensing papers report them.

Everything is derived from one int64 matrix (rows = target, cols = prediction) so that batches and
DDP ranks can be summed exactly before any ratio is taken; averaging per-batch scores would not match.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Accumulates a `num_classes x num_classes` pixel count matrix; `compute` turns it into scores."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # On the evaluation device so updates avoid host copies and NCCL can reduce it in place.
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of integer label maps (any equal shape); target == ignore_index pixels are skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred = pred.to(self.matrix.device).reshape(-1).long()
        target = target.to(self.matrix.device).reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        # An out-of-range label would silently land in another cell of the flattened matrix.
        if pred.numel() and bool(((pred < 0) | (pred >= n) | (target < 0) | (target >= n)).any()):
            raise ValueError(f"labels must be in [0, {n}) or equal ignore_index={self.ignore_index}")
        counts = torch.bincount(n * target + pred, minlength=n * n)
        self.matrix += counts.reshape(n, n)

    def all_reduce(self) -> None:
        """Sum the matrix over DDP ranks so every rank reports the metrics of the whole evaluation set."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        """Scores in percent (kappa in 0..1); a class with no target and no predicted pixel is NaN and left out of means."""
        m = self.matrix.detach().cpu().double()
        tp = m.diag()
        rows, cols = m.sum(1), m.sum(0)  # target and prediction pixel counts per class
        total = m.sum()
        iou = tp / (rows + cols - tp)  # TP / (TP + FP + FN); 0/0 -> NaN for absent classes
        f1 = 2 * tp / (rows + cols)  # 2TP / (2TP + FP + FN)
        po = (tp.sum() / total).item()
        pe = ((rows * cols).sum() / total**2).item()
        # pe == 1 means target and prediction are the same single class everywhere: perfect agreement.
        kappa = 1.0 if pe == 1.0 else (po - pe) / (1 - pe)
        return {
            "mIoU": 100 * torch.nanmean(iou).item(),
            "OA": 100 * po,
            "kappa": kappa,
            "mF1": 100 * torch.nanmean(f1).item(),
            "IoU": (100 * iou).tolist(),
            "F1": (100 * f1).tolist(),
            "pixels": int(total.item()),
        }


def format_table(metrics: dict, class_names: list[str]) -> str:
    """Plain-text table of per-class IoU/F1 and the summary scores, for logs and the eval report."""
    if len(class_names) != len(metrics["IoU"]):
        raise ValueError(f"{len(class_names)} class names for {len(metrics['IoU'])} classes")
    width = max(len("class"), *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'F1':>7}"]
    lines += [f"{name:<{width}}  {i:7.2f}  {f:7.2f}" for name, i, f in zip(class_names, metrics["IoU"], metrics["F1"])]
    lines.append("-" * len(lines[0]))
    lines += [f"{key:<{width}}  {metrics[key]:7.2f}" for key in ("mIoU", "mF1", "OA", "kappa")]
    return "\n".join(lines)
