"""What rank 0 records of a training run, in two forms read by different people: `metrics.jsonl`
(and `curves.png` drawn from it, `plot_curves`) for scripts, TensorBoard events for watching a run live
(`tensorboard --logdir runs/`).

TensorBoard tags: `train/<loss>`, `train/mask_ratio`, `train/lr` every step; `val/<model>/mIoU` and
`val/<model>/IoU/<class>` at each evaluation (model: student, ema); `val/<model>/<sample>` images
(image | truth | prediction) of the first few validation tiles; the resolved recipe as text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config.recipe import Recipe
from ..utils.files import write_whole

PICTURES = 4  # validation tiles pictured per model and evaluation


class RunLog:
    """Appends to RUN/metrics.jsonl and writes TensorBoard events into RUN; one per run, on rank 0.
    Its files are made with the first record, so a run refused before its first step writes none."""

    def __init__(self, run_dir: Path, recipe: Recipe, class_names: list[str]) -> None:
        self.run_dir, self.recipe, self.class_names = Path(run_dir), recipe, list(class_names)
        self.jsonl = self.writer = None

    def _open(self) -> None:
        if self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard loads slowly

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.writer = SummaryWriter(str(self.run_dir))
        toml = self.recipe.to_toml()
        write_whole(self.run_dir / "recipe.toml", toml)  # the resolved recipe, as `rsmtdf recipe show` prints it
        self.writer.add_text("recipe", "```toml\n" + toml + "```", 0)

    def pictures_dir(self, step: int, model: str) -> Path:
        """Where `evaluate(pictures=...)` draws this evaluation's tiles for `model`."""
        return self.run_dir / "pictures" / f"step-{step:07d}" / model

    def step(self, step: int, values: dict[str, float]) -> None:
        """One training step's losses, mask ratio and learning rate."""
        self._open()
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def evaluation(self, step: int, results: dict[str, dict]) -> None:
        """One evaluation: {"student": metrics, "ema": metrics}, with the pictures already drawn."""
        from PIL import Image

        self._open()
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
        """Flush everything and draw curves.png from metrics.jsonl (nothing if nothing was recorded)."""
        if self.writer is None:
            return
        self.jsonl.close()
        self.writer.close()
        plot_curves(self.run_dir)


def plot_curves(run_dir: str | Path) -> Path:
    """Read RUN/metrics.jsonl and write RUN/curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "loss_sup", "loss_unsup", "loss_distill"):
        axes[0].plot([r["step"] for r in steps], [r[key] for r in steps], label=key)
    axes[0].set(title="losses", xlabel="step", yscale="log")
    axes[1].plot([r["step"] for r in steps], [r["mask_ratio"] for r in steps])
    axes[1].set(title="pseudo-label mask ratio", xlabel="step", ylim=(0, 1))
    for key, label in (("eval", "student"), ("eval_ema", "EMA")):
        axes[2].plot([r["step"] for r in evals], [r[key]["mIoU"] for r in evals], marker="o", label=label)
    axes[2].set(title="val mIoU", xlabel="step")
    for ax in axes[[0, 2]]:
        ax.legend()
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
