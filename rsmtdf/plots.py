"""Training curves as a picture: losses and mask ratio per step, val mIoU of student and EMA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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


def prediction_picture(image: np.ndarray, target: np.ndarray, pred: np.ndarray, colours: np.ndarray,
                       out: str | Path) -> Path:
    """image | ground truth | prediction, side by side, for one tile (image in [0, 1], H×W×3)."""
    from PIL import Image

    rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([rgb, gap, colours[target], gap, colours[pred]], axis=1)).save(out)
    return Path(out)
