"""Checkpoints: student, translators, EMA, optimiser, scheduler, step and RNG; never a teacher.

Beside the weights a checkpoint holds what the model was made from (its `Identity`, the student's
input included), the model's config and the labeled split. Written to a temporary file and renamed,
so a checkpoint is only ever replaced whole; read with `torch.load(weights_only=True)`, so loading
one never runs code. Checkpoints of rsmtdf 0.1 (`rsmtdf-checkpoint-1`) are upgraded on read.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from ..cache.identity import Identity
from ..errors import RsmtdfError
from ..utils.files import replaced_whole

FORMAT = "rsmtdf-checkpoint-2"  # 2: the identity type, the model config and split beside it
FORMAT_0_1 = "rsmtdf-checkpoint-1"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write beside, then rename. A full disk ends in one line; the previous file stays whole.

    torch.save writes through a Python file object, so a failed write is an OSError with its errno
    (torch may raise a RuntimeError while closing its archive after it; the OSError is its context)."""
    path = Path(path)
    state = {"format": FORMAT, **state, "identity": state["identity"].record()}
    with replaced_whole(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
        except (OSError, RuntimeError) as exc:
            cause = _os_error(exc)
            if cause is None:
                raise
            if cause.errno != errno.ENOSPC:
                raise RsmtdfError(f"{path}: cannot write the checkpoint ({cause.strerror})") from None
            written = tmp.stat().st_size if tmp.exists() else 0
            need = sum(t.numel() * t.element_size() for t in _tensors(state))
            raise RsmtdfError(f"{path}: disk full while saving the checkpoint ({written / 1e6:.1f} MB written, it "
                              f"needs about {need / 1e6:.1f} MB, {shutil.disk_usage(path.parent).free / 1e6:.1f} MB "
                              f"free); the previous {path.name} is untouched: free space and continue with --resume") \
                from None


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


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint, its `identity` an `Identity` and `model`, `split` beside it (one of rsmtdf 0.1
    upgraded: its identity held them), or one line saying why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise RsmtdfError(f"{path}: no checkpoint here")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input, said in one line
        raise RsmtdfError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, FORMAT_0_1):
        raise RsmtdfError(f"{path}: not an rsmtdf checkpoint")
    if ckpt["format"] == FORMAT_0_1:
        ckpt = {**ckpt, "model": ckpt["identity"]["model"], "split": ckpt["identity"]["split"]}
    return {**ckpt, "identity": model_identity(ckpt["identity"], ckpt["model"], str(path))}


def model_identity(record: dict, model: dict, source: str) -> Identity:
    """The identity a checkpoint or an export records. rsmtdf 0.1's recorded the dataset and the
    split lists (and the model, whose config holds the student's input scaling): upgraded to an
    identity whose views, teachers and teachers' input are not recorded."""
    if "student_input" not in record and model.get("scaling") is not None:
        record = {**record, "student_input": model["scaling"]}
    return Identity.from_record(record, source)


def check_resumable(ckpt: dict, path: Path, identity: Identity, model: dict, split: str) -> None:
    """Refuse to resume a checkpoint made for another model, labeled split or data, in one line."""
    for key, value in (("model", model), ("split", split)):
        if ckpt[key] != value:
            raise RsmtdfError(f"{path}: checkpoint was made for another {key} ({_short(ckpt[key])} vs {_short(value)})")
    ckpt["identity"].require(identity, str(path), "the checkpoint", "this run", what="made from other data: ")


def _short(value) -> str:
    text = str(value)
    return text if len(text) < 80 else text[:77] + "..."
