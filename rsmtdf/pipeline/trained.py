"""A trained model read back, from a checkpoint or an export: the network, its identity, its recipe.

`load_trained` reads a checkpoint (`rsmtdf train`'s best.pt or latest.pt), `load_model` a
safetensors export with its sidecar or a checkpoint alike, so `evaluate` and `predict` take either.
Weights that do not fit the model their config describes are refused in one line; records of
rsmtdf 0.1 are upgraded (`models.checkpoint.model_identity`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cache.identity import Identity
from ..config.recipe import Recipe, recipe_from_json
from ..errors import RsmtdfError
from ..models.checkpoint import load_checkpoint, model_identity
from ..models.student import Student
from ..transforms.scaling import BandScaling
from ..utils.files import parse_file

SIDECAR_FORMAT = "rsmtdf-export-2"  # 2: the identity type
SIDECAR_FORMATS = (SIDECAR_FORMAT, "rsmtdf-export-1")


def sidecar_path(model_file: str | Path) -> Path:
    """`best.onnx` → `best.onnx.json`: one sidecar per exported file, so two formats never share one."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def load_trained(checkpoint: str | Path, which: str = "ema") -> tuple[Student, Identity, Recipe]:
    """(model, identity, recipe) of a checkpoint; `which` is "ema" or "student"."""
    ckpt = load_checkpoint(checkpoint)
    net = _fitted(ckpt["model"], ckpt[which], checkpoint, f"its {which} weights")
    return net, ckpt["identity"], recipe_from_json(ckpt["recipe"], str(checkpoint))


def load_model(path: str | Path, which: str = "ema") -> tuple[Student, Identity, Recipe]:
    """(model, identity, recipe) of a safetensors export (`which` does not apply: an export holds one
    model, named in its sidecar) or of a checkpoint (`which`: "ema" or "student")."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_trained(path, which)
    side = sidecar_path(path)
    meta = parse_file(side, json.loads, "JSON", "the export's sidecar is missing (it says how to build the model)")
    if meta.get("format") not in SIDECAR_FORMATS:
        raise RsmtdfError(f"{side}: not an rsmtdf export sidecar")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise RsmtdfError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    net = _fitted(meta["model"], state, side, "the weights")
    identity = model_identity(meta["identity"], meta["model"], str(side))
    return net, identity, Recipe.from_dict(meta["recipe"], f"{side} (its recipe)")


def model_scaling(net: Student, recipe: Recipe) -> BandScaling:
    """How a trained model's input is scaled: its config's record, or (a model from before records)
    the recipe's bands and `max_value`, unresolved."""
    record = net.config.get("scaling")
    if record is not None:
        return BandScaling.from_record(record)
    return BandScaling(tuple(recipe.data.bands), recipe.data.max_value)


def _fitted(config: dict, state: dict, source: str | Path, what: str) -> Student:
    """The model `config` describes with `state` loaded, in eval mode, or one line why not."""
    try:
        net = Student.from_config(config, source=source)
        net.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise RsmtdfError(f"{source}: {what} do not fit the model its config describes "
                          f"({type(exc).__name__}: {detail})") from None
    return net.eval()
