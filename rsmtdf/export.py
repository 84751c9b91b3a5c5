"""A trained model for serving, without the training state: `rsmtdf export` writes the weights of one
model (the student, or the EMA model with `--ema`) as safetensors or ONNX, with a JSON sidecar that
says what input it takes (bands, scaling, normalisation) and what its outputs mean (classes).

`load_model` reads an export or a checkpoint alike, so `evaluate` and `predict` take either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import RsmtdfError
from .model import Student
from .predict import load_trained
from .recipe import Recipe

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx"}
SIDECAR_FORMAT = "rsmtdf-export-1"


def sidecar_path(model_file: str | Path) -> Path:
    """`best.onnx` → `best.onnx.json`: one sidecar per exported file, so two formats never share one."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


class Logits(nn.Module):
    """The student's logits alone: what a served model returns (the translated tokens only train it)."""

    def __init__(self, net: Student) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).logits


def describe(net: Student, identity: dict, recipe: Recipe, weights: str, checkpoint: Path, file: Path) -> dict:
    """The sidecar: enough to rebuild the model and to feed it the pixels it was trained on."""
    from .scaling import model_scaling

    cfg = net.config
    scaling = model_scaling(cfg, recipe).record()
    return {
        "format": SIDECAR_FORMAT, "file": file.name, "weights": weights, "checkpoint": str(checkpoint),
        "model": cfg, "classes": identity["class_names"], "dataset": identity["dataset"]["name"],
        "input": {
            "layout": f"(batch, {len(scaling['bands'])}, height, width) float32; height and width multiples of {net.patch}",
            "bands": scaling["bands"], "max_value": recipe.data.max_value, "low": scaling["low"], "high": scaling["high"],
            "scaling": "raster bands picked by `bands`, (value - low) / (high - low) per band (without low/high: "
                       "divided by `max_value`, the dtype's range when null), clipped to [0, 1]",
            "normalisation": {"mean": cfg.get("input_mean", [0.0, 0.0, 0.0]), "std": cfg.get("input_std", [1.0, 1.0, 1.0]),
                              "applied_by": "the model"},
        },
        "output": "logits (batch, classes, height, width); argmax over classes is the class map",
        "identity": identity, "recipe": recipe.to_dict(),
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata={"format": "pt"})
        else:
            _write_onnx(net, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    side = sidecar_path(out)
    side_tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    side_tmp.write_text(json.dumps(describe(net, identity, recipe, weights, checkpoint, out), indent=2))
    os.replace(side_tmp, side)
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


def load_model(path: str | Path, which: str = "ema") -> tuple[Student, dict, Recipe]:
    """(model, identity, recipe) of a safetensors export (`which` does not apply: an export holds one
    model, named in its sidecar) or of a checkpoint (`which`: "ema" or "student")."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_trained(path, which)
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise RsmtdfError(f"{side}: the export's sidecar is missing (it says how to build the model)") from None
    except json.JSONDecodeError as exc:
        raise RsmtdfError(f"{side}: not valid JSON ({exc})") from None
    if meta.get("format") != SIDECAR_FORMAT:
        raise RsmtdfError(f"{side}: not an rsmtdf export sidecar")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise RsmtdfError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    net = Student.from_config(meta["model"], source=side)
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise RsmtdfError(f"{path}: weights do not fit the model its sidecar describes") from None
    return net.eval(), meta["identity"], Recipe.from_dict(meta["recipe"], f"{side} (its recipe)")
