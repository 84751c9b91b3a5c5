"""The model work of one cached training step (the EMA forward on the unlabeled batch, the
student's forward and backward on both), its FLOPs counted on the meta device, and the time it is
predicted to take on a GPU: what `inspect --estimate` divides a step's target bytes by, and what
`bench feed` measures the data path against. Here, below `bench`, so both share one computation.

The prediction: FLOPs at `MFU` of the H200's dense bf16 peak. A ViT-S has 384-wide matmuls and
1370-token attention and the DPT head adds convolutions and elementwise work, much smaller than the
large-model training that reaches 40–50 % of peak: 30 % is an optimistic middle (BENCHMARKS.md,
`bench feed`). `bench feed` on a GPU measures the step instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.recipe import Recipe
from ..models.student import Student, TeacherSlot

H200_BF16_DENSE_FLOPS = 989e12  # H100/H200 SXM dense bf16 peak (NVIDIA's datasheet figure, no sparsity)
MFU = 0.30  # a small ViT (384-wide matmuls) + DPT head under autocast reaches about a third of peak


@dataclass(frozen=True)
class StepModel:
    """What one cached step computes on: the student and its teachers' slots, the crop, and the
    labeled batch per GPU (the unlabeled batch is as large)."""

    encoder: str
    classes: int
    crop: int
    batch: int
    slots: tuple[TeacherSlot, ...]
    decoder: str = "small"
    fusion_weights: tuple[float, float] = (0.8, 0.1)
    translator_hidden: int = 1024
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of_recipe(cls, recipe: Recipe, classes: int, slots: list[TeacherSlot], bands: int = 3) -> StepModel:
        """The step a recipe trains: its student, crop and batch, `bands` input bands."""
        st = recipe.student
        kwargs = {**st.kwargs, **({} if bands == 3 else {"in_chans": bands})}
        return cls(st.encoder, classes, recipe.views.crop_size, recipe.train.batch_size, tuple(slots), st.decoder,
                   tuple(st.fusion_weights), st.translator_hidden, kwargs)

    def models(self, device: str | torch.device) -> tuple[Student, Student]:
        """The student and its EMA twin, random weights, on `device` ("meta": no memory, for counting)."""
        with torch.device(device):
            student = Student(self.encoder, self.classes, self.crop, list(self.slots), self.decoder,
                              self.fusion_weights, self.translator_hidden, pretrained=None, **self.kwargs)
            ema = Student.from_config(student.config).requires_grad_(False)
        return student, ema

    def flops(self) -> int:
        """FLOPs of `model_work` at (crop, batch + batch), counted on the meta device."""
        from torch.utils.flop_counter import FlopCounterMode

        student, ema = self.models("meta")
        channels = self.kwargs.get("in_chans", 3)
        with FlopCounterMode(display=False) as counter:
            model_work(student, ema, torch.zeros(2 * self.batch, channels, self.crop, self.crop, device="meta"),
                       self.batch)
        return int(counter.get_total_flops())

    def predicted(self) -> dict:
        """The step's FLOPs, its predicted seconds and how they were predicted, in words."""
        flops = self.flops()
        return {"flops": flops, "step_s": flops / (H200_BF16_DENSE_FLOPS * MFU), "measured": False,
                "basis": f"predicted: {flops / 1e12:.2f} TFLOP at {MFU:.0%} of the H200's "
                         f"{H200_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s dense bf16"}


def model_work(student: torch.nn.Module, ema: torch.nn.Module, x: torch.Tensor, batch: int) -> None:
    """The cached step's model work: EMA forward on the unlabeled batch, student forward and
    backward on both."""
    with torch.no_grad():
        ema(x[:batch])
    out = student(x)
    (out.logits.float().mean() + sum(v.float().mean() for v in out.translated.values())).backward()
