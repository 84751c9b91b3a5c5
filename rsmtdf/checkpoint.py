"""Checkpoints: student, translators, EMA, optimiser, scheduler, step and RNG; never a teacher.

Written to a temporary file and renamed, so a checkpoint is only ever replaced whole; read with
`torch.load(weights_only=True)`, so loading one never runs code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import RsmtdfError

FORMAT = "rsmtdf-checkpoint-1"


def save_checkpoint(state: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, identity: dict | None = None) -> dict:
    """Load a checkpoint; with `identity`, refuse one made for another model, classes, data or split."""
    path = Path(path)
    if not path.is_file():
        raise RsmtdfError(f"{path}: no checkpoint here")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input, said in one line
        raise RsmtdfError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RsmtdfError(f"{path}: not an rsmtdf checkpoint")
    if identity is not None:
        found = ckpt["identity"]
        for key, value in identity.items():
            if found.get(key) != value:
                raise RsmtdfError(f"{path}: checkpoint was made for another {key} "
                                  f"({_short(found.get(key))} vs {_short(value)})")
    return ckpt


def _short(value) -> str:
    text = str(value)
    return text if len(text) < 80 else text[:77] + "..."
