"""Evaluation: confusion-matrix mIoU, per-class IoU and F1, OA, kappa; whole-tile or sliding window.

Two protocols (`PROTOCOLS`): ours (`rsmtdf`) and the paper's code's (`reference`), which differ in
which model is the headline, how a whole tile meets the patch grid, how windows combine, which
classes are scored and how absent classes count. Both models of a checkpoint are always reported.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..cache.identity import Identity, SplitsIdentity
from ..cache.store import FeatureCache
from ..config.recipe import EvalConfig, parse_sets
from ..data.datasets import SegmentationDataset
from ..data.splits import check_labeled, read_list
from ..errors import RsmtdfError
from ..models.student import inference_precision
from ..pipeline.resolve import dataset_of
from ..pipeline.trained import load_trained, model_scaling
from ..transforms.scaling import BandScaling, check_data
from ..utils.files import write_whole
from ..utils.launch import choose_device
from .metrics import ConfusionMatrix, foreground, format_table

MODES = ("whole", "sliding")
WHOLE = ("pad", "resize")
SLIDING = ("logits", "softmax")


@dataclass(frozen=True)
class Protocol:
    """How a checkpoint is scored; `scored` comes from the recipe's `[eval]` for the dataset."""

    name: str
    model: str  # headline model: "ema" or "student"
    whole: str  # whole tile: "pad" to the patch multiple, or "resize" to the nearest one and back
    sliding: str  # windows combined by averaging "logits" or summing "softmax" probabilities
    convention: str  # metrics convention (rsmtdf.metrics): absent classes, precision's denominator


PROTOCOLS = {
    "rsmtdf": Protocol("rsmtdf", model="ema", whole="pad", sliding="logits", convention="rsmtdf"),
    # the reference's eval scripts: the student of the checkpoint chosen by the student's val mIoU,
    # tiles resized to a multiple of 14 and logits resized back, softmax summed over windows
    "reference": Protocol("reference", model="student", whole="resize", sliding="softmax", convention="reference"),
}


def resolve_protocol(name: str, eval_section: EvalConfig, class_names: list[str], where: str = "recipe [eval]") -> tuple[Protocol, list[int]]:
    """The protocol `name` and the class indices it scores, from the recipe's `[eval]` section:
    `scored_classes` for ours, `reference_scored_classes` for the reference's ([] = all)."""
    if name not in PROTOCOLS:
        raise RsmtdfError(f"--protocol {name}: choose one of {', '.join(PROTOCOLS)}")
    key = "reference_scored_classes" if name == "reference" else "scored_classes"
    names = list(getattr(eval_section, key))
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise RsmtdfError(f"{where} {key}: '{unknown[0]}' is not a class of this model ({', '.join(class_names)})")
    scored = sorted(class_names.index(n) for n in names) if names else list(range(len(class_names)))
    return PROTOCOLS[name], scored


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mode: str, crop: int, patch: int, whole: str = "pad",
            sliding: str = "logits") -> torch.Tensor:
    """Class scores (B, K, H, W) for images (B, C, H, W) in [0, 1]; their argmax is the prediction.

    whole: the tile at once, either padded bottom/right with 0 to the encoder's patch multiple
    (`pad`) or resized (bilinear, align_corners) to the nearest multiple and its logits resized back
    (`resize`, the reference's); sliding: crop-sized windows at 2/3 overlap stride, either logits
    averaged (`logits`) or softmax probabilities summed, here averaged, which has the same argmax
    (`softmax`, the reference's)."""
    h, w = x.shape[-2:]
    if mode == "whole":
        if whole == "resize":
            size = tuple(max(patch, int(s / patch + 0.5) * patch) for s in (h, w))  # the reference's rounding
            logits = model(F.interpolate(x, size=size, mode="bilinear", align_corners=True)).logits
            return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
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
            scores = logits.softmax(1) if sliding == "softmax" else logits
            out = torch.zeros(x.shape[0], logits.shape[1], H, W, device=x.device) if out is None else out
            out[..., y0 : y0 + crop, x0 : x0 + crop] += scores
            count[..., y0 : y0 + crop, x0 : x0 + crop] += 1
    return (out / count)[..., :h, :w]


def evaluate(model: nn.Module, dataset: SegmentationDataset, ids: list[str], num_classes: int,
             device: torch.device | str, mode: str = "whole", crop: int = 518,
             scaling: BandScaling = BandScaling(), pictures: Path | None = None, num_pictures: int = 0,
             protocol: Protocol = PROTOCOLS["rsmtdf"], scored: list[int] | None = None,
             progress: bool = True) -> dict:
    """Metrics of `model` over the samples `ids` (sharded over DDP ranks, summed) under `protocol`,
    scoring the classes `scored` (default all); with `pictures`, also image | ground truth |
    prediction PNGs of the first `num_pictures` samples there. Rank 0 shows a progress bar over its
    tiles unless `progress` is false. `scaling` is how the model's input bands were scaled in training."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    cm, drawn = ConfusionMatrix(num_classes, device=device), 0
    colours = dataset.classes.colours() if pictures is not None else None
    for sid in tqdm(ids[rank::world], desc="evaluate", unit="tile", leave=False, dynamic_ncols=True,
                    disable=not progress or rank != 0):
        sample = dataset.load(dataset.index(sid))
        x = torch.from_numpy(scaling.unit(sample.image, sample.valid)).permute(2, 0, 1)[None].to(device)
        with inference_precision(device):
            pred = predict(model, x, mode, crop, model.patch, protocol.whole, protocol.sliding).argmax(1)
        cm.update(pred, torch.from_numpy(sample.mask).long()[None].to(device))
        if pictures is not None and drawn < num_pictures:
            pictures.mkdir(parents=True, exist_ok=True)
            prediction_picture(x[0, :3].permute(1, 2, 0).cpu().numpy(), sample.mask, pred[0].cpu().numpy(), colours,
                               pictures / f"{sid.replace('/', '_')}.png")
            drawn += 1
    cm.all_reduce()
    model.train(was_training)
    return cm.compute(scored, protocol.convention)


def evaluate_checkpoint(checkpoint: Path, split: str = "test", mode: str = "whole", protocol: str | None = None,
                        model: str | None = None, cache: str | None = None, eval_section: EvalConfig | None = None,
                        pictures: Path | None = None, num_pictures: int = 0, sets: list[str] | None = None,
                        device: str = "auto") -> dict:
    """Score both models of a checkpoint (student and EMA) on a split list under a protocol; the
    report (strict JSON) leads with the protocol's headline model, or `model` when given.

    The data is where the checkpoint's identity (or, with `cache`, the cache's) says it is, moved
    with `sets` (`data.root=...`, `data.splits=...`); its samples and split lists must be the ones
    the identity records. `eval_section` (a recipe's `[eval]`) defaults to the checkpoint's."""
    if mode not in MODES:
        raise RsmtdfError(f"--mode {mode}: choose one of {', '.join(MODES)}")
    if model not in (None, "ema", "student"):
        raise RsmtdfError(f"--model {model}: choose ema or student")
    device = choose_device(device)
    nets = {which: load_trained(checkpoint, which) for which in ("student", "ema")}
    _, ident, recipe = nets["student"]
    names = ident.class_names
    section = eval_section if eval_section is not None else recipe.eval
    proto, scored = resolve_protocol(protocol or section.protocol, section, names)
    headline = model or proto.model
    dataset, splits = _evaluated_data(checkpoint, ident, cache, sets)
    scaling = model_scaling(nets["student"][0], recipe)
    check_data(scaling, *dataset.pixel_format(), f"{dataset.records[0].image} (dataset {dataset.root})")
    ids = read_list(splits, split)
    check_labeled(dataset, ids, Path(splits) / f"{split}.txt")
    results = {}
    for which in (headline, "ema" if headline == "student" else "student"):
        net = nets[which][0].to(device)
        results[which] = evaluate(net, dataset, ids, len(names), device, mode, net.config["crop_size"], scaling,
                                  pictures if which == headline else None, num_pictures, proto, scored)
    main = results[headline]
    report = {"checkpoint": str(checkpoint), "split": split, "mode": mode,
              "protocol": {"name": proto.name, "whole": proto.whole, "sliding": proto.sliding,
                           "absent_classes": "zero" if proto.convention == "reference" else "left out",
                           "convention": proto.convention},
              "model": headline, "classes": names, "scored_classes": [names[k] for k in main["scored"]],
              "absent_classes": [names[k] for k in main["absent"]], **main}
    fg = foreground(names)
    if fg is not None:
        report["foreground"] = {"class": names[fg], "IoU": main["IoU"][fg], "F1": main["F1"][fg]}
    report["models"] = {which: results[which] for which in ("student", "ema")}
    return report


def _evaluated_data(checkpoint: Path, ident: Identity, cache: str | None,
                    sets: list[str] | None) -> tuple[SegmentationDataset, str]:
    """(dataset, split-list folder) to evaluate on: the dataset and lists the checkpoint's identity
    (or, with `cache`, the cache's) records, where they were found or where `sets` moved them
    (`data.root=...`, `data.splits=...`); refused where the samples or the lists are not the recorded ones."""
    moved = parse_sets(sets or [])
    unknown = sorted(set(moved) - {"data.root", "data.splits"})
    if unknown:
        raise RsmtdfError(f"--set {unknown[0]}: evaluate takes data.root and data.splits (where the data and "
                          f"lists are now); the rest is the checkpoint's")
    found, where = ident, str(checkpoint)
    if cache is not None:
        found, where = FeatureCache.open(cache).identity, cache
        if found.class_names != ident.class_names:
            raise RsmtdfError(f"{checkpoint}: model has {len(ident.class_names)} classes {ident.class_names}, "
                              f"cache {cache} has {len(found.class_names)} {found.class_names}")
    dataset = dataset_of(found, moved.get("data.root"))
    splits = str(moved.get("data.splits") or found.splits.dir)
    here = dataclasses.replace(found, splits=SplitsIdentity.of(splits))
    found.require(here, where, "the checkpoint" if cache is None else "the cache", f"the lists at {splits}",
                  what="evaluated on other split lists: ")
    return dataset, splits


def evaluate_to_file(checkpoint: Path, split: str, mode: str, out: Path | None = None, pictures: int = 0,
                     **options) -> tuple[dict, Path, Path]:
    """`rsmtdf evaluate`: `evaluate_checkpoint` with its report written (strict JSON, whole) to `out`
    (default beside the checkpoint) and `pictures` PNGs in a folder beside it; returns the report,
    the file and the pictures' folder."""
    folder = out.with_suffix("") if out else checkpoint.with_name(f"{checkpoint.stem}-{split}-{mode}-pictures")
    report = evaluate_checkpoint(checkpoint, split, mode, pictures=folder, num_pictures=pictures, **options)
    out = out or checkpoint.with_name(f"{checkpoint.stem}-{split}-{mode}-{report['protocol']['name']}.json")
    write_whole(out, json.dumps(report, indent=2, allow_nan=False))
    return report, out, folder


def format_report(report: dict) -> str:
    """The printed evaluation: what was scored and how, the headline table, the other model's scores."""
    p = report["protocol"]
    how = (f"whole tiles {'resized to a multiple of the patch' if p['whole'] == 'resize' else 'padded'}"
           if report["mode"] == "whole" else
           f"sliding windows ({'softmax summed' if p['sliding'] == 'softmax' else 'logits averaged'})")
    scored = report["scored_classes"]
    lines = [f"protocol {p['name']}: {report['model']} model, {how}, "
             f"scoring {'all ' + str(len(scored)) if len(scored) == len(report['classes']) else len(scored)} "
             f"classes ({', '.join(scored)}), split {report['split']}",
             format_table(report, report["classes"])]
    other = "ema" if report["model"] == "student" else "student"
    o = report["models"][other]
    lines.append(f"{other} model: " + ", ".join(f"{key} {'n/a' if o[key] is None else format(o[key], fmt)}"
                                                for key, fmt in (("mIoU", ".2f"), ("mF1", ".2f"), ("OA", ".2f"), ("kappa", ".4f"))))
    return "\n".join(lines)


def prediction_picture(image: np.ndarray, target: np.ndarray, pred: np.ndarray, colours: np.ndarray,
                       out: str | Path) -> Path:
    """image | ground truth | prediction, side by side, for one tile (image in [0, 1], H×W×3)."""
    from PIL import Image

    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([rgb, gap, colours[target], gap, colours[pred]], axis=1)).save(out)
    return Path(out)
