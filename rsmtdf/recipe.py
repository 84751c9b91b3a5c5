"""Recipes: one TOML file per dataset/protocol under `pipeline/`, over defaults that are the paper's."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from .errors import RsmtdfError
from .views import ViewSpec

DEFAULTS: dict = {
    "data": {"dataset": "loveda", "root": "data/LoveDA", "splits": None, "classes": [], "bands": [0, 1, 2],
             "max_value": None},
    "views": {"count": 8, "crop_size": 518, "scale_range": [0.5, 2.0], "hflip": True, "rot90": False, "seed": 0},
    "teachers": {"names": ["dinov2_vitb14", "clip_vitl14"], "storage": "float16", "sizes": {}},
    "student": {"encoder": "vit_small_patch14_dinov2.lvd142m", "decoder": "small", "fusion_weights": [0.8, 0.1],
                "translator_hidden": 1024, "pretrained": True, "kwargs": {}},
    "train": {"epochs": 60, "batch_size": 8, "lr": 5e-6, "head_lr_multiplier": 40.0, "weight_decay": 0.01,
              "poly_power": 0.9, "conf_thresh": 0.95, "ema_momentum": 0.996, "distill_loss": "mse",
              "workers": 2, "eval_every": 1, "eval_mode": "whole", "seed": 0, "max_steps": None},
    # `rsmtdf evaluate`: protocol "rsmtdf" or "reference" (the paper's code's); the class names each
    # scores in its means ([] = all classes)
    "eval": {"protocol": "rsmtdf", "scored_classes": [], "reference_scored_classes": []},
}


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            raise RsmtdfError(f"{where}: unknown recipe key '{key}' (known: {', '.join(base)})")
        out[key] = _merge(base[key], value, f"{where}.{key}") if isinstance(base[key], dict) and base[key] \
            else value
    return out


def load_recipe(path: str | Path | None) -> dict:
    """The recipe at `path` merged over DEFAULTS; `splits` defaults to pipeline/splits/<dataset>."""
    recipe: dict = {}
    if path is not None:
        path = Path(path)
        try:
            recipe = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise RsmtdfError(f"{path}: recipe not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise RsmtdfError(f"{path}: not valid TOML ({exc})") from None
    merged = _merge(DEFAULTS, recipe, str(path or "recipe"))
    if merged["data"]["splits"] is None:
        merged["data"]["splits"] = f"pipeline/splits/{merged['data']['dataset']}"
    return merged


def view_spec(recipe: dict) -> ViewSpec:
    v = recipe["views"]
    return ViewSpec(int(v["count"]), int(v["crop_size"]), tuple(v["scale_range"]), bool(v["hflip"]),
                    bool(v["rot90"]), int(v["seed"]))
