"""A trained model for serving, without the training state: `rsmtdf export` writes the weights of one
model (the student, or the EMA model with `--ema`) as safetensors or ONNX, with a JSON sidecar that
says what input it takes (bands, scaling, normalisation) and what its outputs mean (classes).

`pipeline.trained.load_model` reads an export or a checkpoint alike, so `evaluate` and `predict`
take either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..cache.identity import Identity
from ..config.recipe import Recipe
from ..errors import RsmtdfError
from ..models.student import Student
from ..pipeline.trained import SIDECAR_FORMAT, load_trained, model_scaling, sidecar_path
from ..utils.files import replaced_whole, write_whole

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx"}


class Logits(nn.Module):
    """The student's logits alone: what a served model returns (the translated tokens only train it)."""

    def __init__(self, net: Student) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).logits


def describe(net: Student, identity: Identity, recipe: Recipe, weights: str, checkpoint: Path, file: Path) -> dict:
    """The sidecar: enough to rebuild the model and to feed it the pixels it was trained on."""
    cfg = net.config
    scaling = model_scaling(net, recipe).record()
    return {
        "format": SIDECAR_FORMAT, "file": file.name, "weights": weights, "checkpoint": str(checkpoint),
        "model": cfg, "classes": identity.class_names, "dataset": identity.dataset.name,
        "input": {
            "layout": f"(batch, {len(scaling['bands'])}, height, width) float32; height and width multiples of {net.patch}",
            "bands": scaling["bands"], "max_value": recipe.data.max_value, "low": scaling["low"], "high": scaling["high"],
            "scaling": "raster bands picked by `bands`, (value - low) / (high - low) per band (without low/high: "
                       "divided by `max_value`, the dtype's range when null), clipped to [0, 1]",
            "normalisation": {"mean": cfg.get("input_mean", [0.0, 0.0, 0.0]), "std": cfg.get("input_std", [1.0, 1.0, 1.0]),
                              "applied_by": "the model"},
        },
        "output": "logits (batch, classes, height, width); argmax over classes is the class map",
        "identity": identity.record(), "recipe": recipe.to_dict(),
    }


def export_model(checkpoint: str | Path, fmt: str, out: str | Path | None = None, ema: bool = False) -> tuple[Path, Path]:
    """Write the checkpoint's student (or EMA model) as `fmt` and its sidecar; returns both paths.

    Each file is written beside its target and renamed, so an export is only ever replaced whole."""
    if fmt not in FORMATS:
        raise RsmtdfError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_suffix(FORMATS[fmt])
    if out.suffix != FORMATS[fmt]:
        raise RsmtdfError(f"{out}: a {fmt} export must end in {FORMATS[fmt]}")
    weights = "ema" if ema else "student"
    net, identity, recipe = load_trained(checkpoint, weights)
    with replaced_whole(out) as tmp:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata={"format": "pt"})
        else:
            _write_onnx(net, tmp)
    side = write_whole(sidecar_path(out), json.dumps(describe(net, identity, recipe, weights, checkpoint, out), indent=2))
    return out, side


def _write_onnx(net: Student, path: Path) -> None:
    """ONNX through torch.export, with batch, height and width dynamic. The example input has batch 2
    and height ≠ width: torch.export gives equal sizes one symbol, which would tie them in the graph."""
    try:
        import onnx  # noqa: F401 - the exporter needs both; say so in one line
        import onnxscript  # noqa: F401
    except ImportError:
        raise RsmtdfError("--format onnx needs the onnx extra: pip install 'rsmtdf[onnx]'") from None
    crop = int(net.config["crop_size"])
    example = torch.rand(2, len(net.config["input_mean"]), crop, crop + net.patch)  # the model's bands
    dynamic = {"image": {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    torch.onnx.export(Logits(net).eval(), (example,), str(path), dynamo=True, input_names=["image"],
                      output_names=["logits"], dynamic_shapes=dynamic, external_data=False, verbose=False)
