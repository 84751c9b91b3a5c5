"""Checkpoints: student, translators, EMA, optimiser, scheduler, step and RNG; never a teacher.

Written to a temporary file and renamed, so a checkpoint is only ever replaced whole; read with
`torch.load(weights_only=True)`, so loading one never runs code.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch

from .errors import RsmtdfError

FORMAT = "rsmtdf-checkpoint-1"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write beside, then rename. A full disk ends in one line; the previous file stays whole.

    torch.save writes through a Python file object, so a failed write is an OSError with its errno
    (torch may raise a RuntimeError while closing its archive after it; the OSError is its context)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
    except (OSError, RuntimeError) as exc:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        cause = _os_error(exc)
        if cause is None:
            raise
        if cause.errno != errno.ENOSPC:
            raise RsmtdfError(f"{path}: cannot write the checkpoint ({cause.strerror})") from None
        need = sum(t.numel() * t.element_size() for t in _tensors(state))
        raise RsmtdfError(f"{path}: disk full while saving the checkpoint ({written / 1e6:.1f} MB written, it needs "
                          f"about {need / 1e6:.1f} MB, {shutil.disk_usage(path.parent).free / 1e6:.1f} MB free); "
                          f"the previous {path.name} is untouched: free space and continue with --resume") from None
    os.replace(tmp, path)


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind an exception, following what it was raised while handling."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__context__
    return exc


def _tensors(obj):
    """Every tensor inside nested dicts, lists and tuples (what a checkpoint's size is made of)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


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
