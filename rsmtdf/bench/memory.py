"""`bench memory`: peak memory of one training step at the paper's shapes, and the smallest GPU
that holds the paper's batch (8 + 8 per GPU) with and without gradient accumulation.

The step is the real `Trainer.train_step` (EMA forward and pseudo-labels, CutMix, the student's
forward at 518 and its second pass at CLIP's 224, translators and projections, the losses,
backward, AdamW, the EMA update) at the paper's shapes: DINOv2-S/14 + the small DPT head at 518,
cached float16 targets of 1369×768 (DINOv2-B) and 256×1024 (CLIP-L). The targets are random,
written by stand-in teachers of the real grid and width (memory does not depend on their values;
the real teachers would cost minutes of CPU for values thrown away). After one warm-up step (the
gradients and AdamW's moments exist from then on), each step is measured alone at a micro-batch
of b labeled + b unlabeled crops, sliced from one loaded batch:

- GPU: `torch.cuda.max_memory_allocated` over the step (reset before it): the tensors of weights,
  gradients, optimiser state, EMA, the step's inputs and its activations. The CUDA context, library
  workspaces and the caching allocator's slack come on top (`USABLE`).
- CPU: the process's peak RSS during the step above its RSS just before (Linux: `clear_refs`
  resets the peak, `VmHWM` reads it; freed memory is returned first, and allocations above 1 MB
  get their own mappings, so the rise is the step's own), plus what a GPU would hold at rest: the
  model state (counted tensor by tensor) and the step's inputs. What the process holds besides
  (Python, libraries, the dataset) is not on a GPU and is left out.

Peak(b) = fixed + b · per_pair is fitted through the first two micro-batches and checked at the
third (the `fit check` ratio: measured against the fit): b = 1, 2, 3 on a CPU, 2, 4 and the
paper's 8 on a GPU or with `--full`. Gradient accumulation over k micro-batches
holds one micro-batch's activations at a time and its gradients in the same tensors, so its peak
is Peak(8 / k); the table gives it for k = 1, 2, 4, 8 with the smallest standard card that holds it.
On a CPU the step runs in float32 (`train_step`'s bf16 autocast is CUDA-only) and with CPU
attention kernels, so the activation part measured there is expected to be larger than under CUDA
bf16 autocast: CPU figures should bound a GPU's from above; only a GPU run measures it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
from pathlib import Path

import torch
from torch import nn

from ..models.teachers import teacher_config
from ..pipeline.extract import extract
from ..pipeline.resolve import resolve
from ..train.losses import StepInputs
from ..train.trainer import Trainer
from ..utils.runtime import return_freed_memory
from .common import Context, batch_stream, generated_dataset, recipe_at
from .feed import FEED_SIZES

PAPER_BATCH = 8  # per GPU, labeled and unlabeled each (DESIGN §5)
ACCUMULATION = (1, 2, 4, 8)
CARDS_GB = (16, 24, 40, 48, 80)  # standard GPU memory sizes (nominal, GiB)
USABLE = 0.90  # share of a card's memory a step may use: the rest is CUDA context, workspaces, allocator slack
GIB = 2**30
# micro-batches measured (labeled = unlabeled = b): the first two fit the line, the third checks it
BATCHES = {"quick": (1, 2, 3), "cpu": (1, 2, 3), "gpu": (2, 4, PAPER_BATCH)}


class ShapedTeacher(nn.Module):
    """A stand-in for a registry teacher at the real grid and width: seeded random tokens."""

    def __init__(self, name: str, tokens: int, dim: int, input_size: int) -> None:
        super().__init__()
        self.name, self.input_size, self.num_tokens, self.dim = name, input_size, tokens, dim
        self.grid = round(tokens ** 0.5)
        self.generator = torch.Generator().manual_seed(0)

    def identity(self):
        return dataclasses.replace(teacher_config(self.name, self.input_size).identity(), grid=self.grid, dim=self.dim)

    def targets(self, views: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(views), self.num_tokens, self.dim, generator=self.generator)


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed, per_pair) of the line through the first two (b, peak) points."""
    (b1, p1), (b2, p2) = points[:2]
    per = (p2 - p1) / (b2 - b1)
    return p1 - per * b1, per


def smallest_card(peak_bytes: float) -> int | None:
    """The smallest standard card (GiB) whose usable share holds `peak_bytes`; None if none does."""
    return next((gb for gb in CARDS_GB if peak_bytes <= USABLE * gb * GIB), None)


def accumulation_table(fixed: float, per_pair: float, batch: int = PAPER_BATCH) -> dict[int, dict]:
    """Per accumulation k: the micro-batch, its predicted peak and the smallest card holding it."""
    out = {}
    for k in ACCUMULATION:
        peak = fixed + per_pair * batch / k
        out[k] = {"micro_batch": batch // k, "peak_bytes": peak, "card_gb": smallest_card(peak)}
    return out


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_bytes(trainer: Trainer) -> dict[str, int]:
    """What a step leaves in memory between steps, by tensor: the student's weights and buffers,
    its gradients, AdamW's moments, the EMA model."""
    student = trainer.student
    return {"weights": _tensor_bytes(student.state_dict().values()),
            "gradients": _tensor_bytes(p.grad for p in student.parameters()),
            "optimizer": _tensor_bytes(v for s in trainer.optimizer.state.values() for v in s.values()),
            "ema": _tensor_bytes(trainer.ema.state_dict().values())}


def _mapped(inp: StepInputs, fn) -> StepInputs:
    def one(v):
        return {k: fn(t) for k, t in v.items()} if isinstance(v, dict) else None if v is None else fn(v)
    return StepInputs(**{f.name: one(getattr(inp, f.name)) for f in dataclasses.fields(inp)})


def micro_batch(inp: StepInputs, b: int) -> StepInputs:
    """The first b labeled and b unlabeled samples of a batch."""
    return _mapped(inp, lambda t: t[:b])


def moved(inp: StepInputs, device: torch.device) -> StepInputs:
    """A batch's own copy on `device` (a slice moved alone holds only its samples)."""
    return _mapped(inp, lambda t: t.to(device, copy=True))


def _input_bytes(inp: StepInputs) -> int:
    values = [getattr(inp, f.name) for f in dataclasses.fields(inp)]
    return _tensor_bytes([t for v in values for t in (v.values() if isinstance(v, dict) else [v])])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_step_rise(step) -> int:
    """Bytes the process's peak RSS rises by during `step()` above its RSS just before."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc: return freed heap to the system
    if trim is not None:
        trim(0)
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    step()
    return _status_kb("VmHWM") - before


def _gpu_step_peak(step, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _measure(trainer: Trainer, part: StepInputs, state: int, device: torch.device) -> dict:
    """The peak of one step on `part`: a GPU's own count, or a CPU's RSS rise + state + inputs."""
    def step():
        trainer.train_step(part)
    if device.type == "cuda":
        return {"peak_bytes": _gpu_step_peak(step, device), "resting_bytes": torch.cuda.memory_allocated(device)}
    rise, inputs = _cpu_step_rise(step), _input_bytes(part)
    return {"peak_bytes": state + inputs + rise, "rss_rise_bytes": rise, "input_bytes": inputs}


def _trainer(ctx: Context, f: dict, batch: int) -> Trainer:
    """A Trainer at the sizes `f` over a cache of stand-in targets of generated tiles (one view)."""
    root = ctx.workdir / "memory"
    quick = ctx.sizes.name == "quick"
    generated_dataset(root, 3 if quick else 2, 512 if quick else 1024)  # ≥ 4 unlabeled tiles; 14 at the paper's
    st = f["student"]
    recipe = recipe_at(root / "data", root / "splits", {n: s for n, (_, _, s) in f["targets"].items()}, 1, f["crop"], **{
        "student.encoder": st["encoder"], "student.pretrained": False, "student.translator_hidden": st["translator_hidden"],
        "student.kwargs": dict(st["kwargs"]), "train.batch_size": batch, "train.workers": 0,
        "train.max_steps": 10**9, "train.eval_every": 10**6})
    teachers = [ShapedTeacher(n, t, d, s) for n, (t, d, s) in f["targets"].items()]
    extract(resolve(recipe), teachers, str(root / "cache"), device="cpu", num_workers=0, progress=False)
    return Trainer(str(root / "cache"), "10pct", recipe, root / "run", "cached", ctx.device, progress=False)


def bench_memory(ctx: Context) -> dict:
    """Peak memory of one training step at three micro-batches, the line through them, and the
    smallest card for the paper's batch at each accumulation."""
    quick = ctx.sizes.name == "quick"
    f = FEED_SIZES["quick" if quick else "paper"]
    device = torch.device(ctx.device)
    gpu = device.type == "cuda"
    batches = BATCHES["quick" if quick else "gpu" if gpu or ctx.sizes.name == "full" else "cpu"]
    if not gpu:
        return_freed_memory()  # large blocks mapped alone and returned when freed: RSS follows what is live
    trainer = _trainer(ctx, f, max(batches))
    trainer.student.train()
    stream = batch_stream(trainer)
    host = moved(next(stream), torch.device("cpu"))  # micro-batches go to the device one at a time
    stream.close()  # no read of the next batch runs beside the steps measured
    trainer.train_step(moved(micro_batch(host, batches[0]), device))  # warm-up: gradients and AdamW's moments exist
    state = state_bytes(trainer)
    measured = {}
    for b in batches:
        part = moved(micro_batch(host, b), device)
        measured[b] = _measure(trainer, part, sum(state.values()), device)
    points = [(b, m["peak_bytes"]) for b, m in measured.items()]
    fixed, per_pair = fit_line(points)
    check_b, check_peak = points[2]
    table = accumulation_table(fixed, per_pair)
    basis = (f"measured on {torch.cuda.get_device_name(device)} (max_memory_allocated, bf16 autocast)" if gpu else
             "measured on this CPU (peak RSS rise + model state + inputs; float32, CPU attention: activations "
             "expected larger than under CUDA bf16 autocast, so an upper bound for a GPU)")
    return {"sizes": {"crop": f["crop"], "student": f["student"]["encoder"], "batches": list(batches),
                      "targets": {k: list(v) for k, v in f["targets"].items()}, "paper_batch": PAPER_BATCH},
            "basis": basis, "state_bytes": state, "measured": measured,
            "fit": {"fixed_bytes": fixed, "per_pair_bytes": per_pair, "from_batches": list(batches[:2])},
            "accumulation": table, "usable_share": USABLE, "cards_gb": list(CARDS_GB),
            "ratios": {f"peak GiB at {check_b} + {check_b} (fit check)": {
                "value": check_peak / GIB, "predicted": (fixed + per_pair * check_b) / GIB,
                "goal": "within 10 % of predicted",
                "absolute": f"fixed {fixed / GIB:.2f} GiB + {per_pair / GIB:.3f} GiB per labeled + unlabeled pair; "
                            f"8 + 8: {table[1]['peak_bytes'] / GIB:.1f} GiB ({basis.split(' (')[0]})"}},
            "markdown": _table(state, fixed, per_pair, table, basis)}


def _card(gb: int | None) -> str:
    return f"{gb} GB" if gb else f"none of {CARDS_GB[-1]} GB or less"


def _table(state: dict, fixed: float, per_pair: float, table: dict, basis: str) -> str:
    lines = [f"model state between steps: {', '.join(f'{k} {v / GIB:.2f} GiB' for k, v in state.items())}; "
             f"fit: fixed {fixed / GIB:.2f} GiB + {per_pair / GIB:.3f} GiB per pair ({basis})", "",
             f"| accumulation k | micro-batch | predicted peak | smallest card ({USABLE:.0%} usable) |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {r['micro_batch']} + {r['micro_batch']} | {r['peak_bytes'] / GIB:.2f} GiB | {_card(r['card_gb'])} |"
              for k, r in table.items()]
    return "\n".join(lines)
