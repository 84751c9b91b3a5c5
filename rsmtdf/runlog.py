"""What rank 0 records of a training run, in two forms read by different people: `metrics.jsonl`
(and `curves.png` drawn from it) for scripts, TensorBoard events for watching a run live
(`tensorboard --logdir runs/`).

TensorBoard tags: `train/<loss>`, `train/mask_ratio`, `train/lr` every step; `val/<model>/mIoU` and
`val/<model>/IoU/<class>` at each evaluation (model: student, ema); `val/<model>/<sample>` images
(image | truth | prediction) of the first few validation tiles; the resolved recipe as text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .plots import plot_curves
from .recipe import Recipe

PICTURES = 4  # validation tiles pictured per model and evaluation


class RunLog:
    """Appends to RUN/metrics.jsonl and writes TensorBoard events into RUN; one per run, on rank 0."""

    def __init__(self, run_dir: Path, recipe: Recipe, class_names: list[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard loads slowly

        self.run_dir, self.class_names = Path(run_dir), list(class_names)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.writer = SummaryWriter(str(self.run_dir))
        toml = recipe.to_toml()
        tmp = self.run_dir / ".recipe.toml.tmp"
        tmp.write_text(toml)
        tmp.replace(self.run_dir / "recipe.toml")  # the resolved recipe, as `rsmtdf recipe show` prints it
        self.writer.add_text("recipe", "```toml\n" + toml + "```", 0)

    def pictures_dir(self, step: int, model: str) -> Path:
        """Where `evaluate(pictures=...)` draws this evaluation's tiles for `model`."""
        return self.run_dir / "pictures" / f"step-{step:07d}" / model

    def step(self, step: int, values: dict[str, float]) -> None:
        """One training step's losses, mask ratio and learning rate."""
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def evaluation(self, step: int, results: dict[str, dict]) -> None:
        """One evaluation: {"student": metrics, "ema": metrics}, with the pictures already drawn."""
        from PIL import Image

        self.jsonl.write(json.dumps({"step": step, "eval": results["student"], "eval_ema": results["ema"]}) + "\n")
        self.jsonl.flush()
        for model, res in results.items():
            if res["mIoU"] is not None:  # no scored class present
                self.writer.add_scalar(f"val/{model}/mIoU", res["mIoU"], step)
            for name, iou in zip(self.class_names, res["IoU"]):
                if iou is not None:  # a class absent from both truth and prediction has no IoU (null)
                    self.writer.add_scalar(f"val/{model}/IoU/{name}", iou, step)
            for png in sorted(self.pictures_dir(step, model).glob("*.png")):
                self.writer.add_image(f"val/{model}/{png.stem}", np.asarray(Image.open(png).convert("RGB")), step,
                                      dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        """Flush everything and draw curves.png from metrics.jsonl."""
        self.jsonl.close()
        self.writer.close()
        plot_curves(self.run_dir)
