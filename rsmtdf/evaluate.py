"""Evaluation: confusion-matrix mIoU, per-class IoU and F1, OA, kappa; whole-tile or sliding window."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import SegmentationDataset, to_unit_rgb
from .metrics import ConfusionMatrix
from .plots import palette, prediction_picture

MODES = ("whole", "sliding")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mode: str, crop: int, patch: int) -> torch.Tensor:
    """Logits (B, K, H, W) for images (B, 3, H, W) in [0, 1].

    whole: the tile at once, padded bottom/right to the encoder's patch multiple;
    sliding: crop-sized windows at 2/3 overlap stride, logits averaged where they overlap."""
    h, w = x.shape[-2:]
    if mode == "whole":
        ph, pw = -h % patch, -w % patch
        return model(F.pad(x, (0, pw, 0, ph))).logits[..., :h, :w]
    x = F.pad(x, (0, max(crop - w, 0), 0, max(crop - h, 0)))
    H, W = x.shape[-2:]
    stride = max(1, crop * 2 // 3)
    ys = sorted({*range(0, H - crop, stride), H - crop})
    xs = sorted({*range(0, W - crop, stride), W - crop})
    out, count = None, torch.zeros(1, 1, H, W, device=x.device)
    for y0 in ys:
        for x0 in xs:
            logits = model(x[..., y0 : y0 + crop, x0 : x0 + crop]).logits
            out = torch.zeros(x.shape[0], logits.shape[1], H, W, device=x.device) if out is None else out
            out[..., y0 : y0 + crop, x0 : x0 + crop] += logits
            count[..., y0 : y0 + crop, x0 : x0 + crop] += 1
    return (out / count)[..., :h, :w]


def evaluate(model: nn.Module, dataset: SegmentationDataset, ids: list[str], num_classes: int,
             device: torch.device | str, mode: str = "whole", crop: int = 518,
             bands: tuple[int, int, int] = (0, 1, 2), max_value: float | None = None,
             pictures: Path | None = None, num_pictures: int = 0) -> dict:
    """Metrics of `model` over the samples `ids` (sharded over DDP ranks, summed); with `pictures`,
    also image | ground truth | prediction PNGs of the first `num_pictures` samples there."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    cm, drawn = ConfusionMatrix(num_classes, device=device), 0
    colours = palette(num_classes, dataset.classes.colors) if pictures is not None else None
    for sid in ids[rank::world]:
        sample = dataset.load(dataset.index(sid))
        x = torch.from_numpy(to_unit_rgb(sample.image, bands, max_value, sample.valid)).permute(2, 0, 1)[None].to(device)
        pred = predict(model, x, mode, crop, model.patch).argmax(1)
        cm.update(pred, torch.from_numpy(sample.mask).long()[None].to(device))
        if pictures is not None and drawn < num_pictures:
            pictures.mkdir(parents=True, exist_ok=True)
            prediction_picture(x[0].permute(1, 2, 0).cpu().numpy(), sample.mask, pred[0].cpu().numpy(), colours,
                               pictures / f"{sid.replace('/', '_')}.png")
            drawn += 1
    cm.all_reduce()
    model.train(was_training)
    return cm.compute()
