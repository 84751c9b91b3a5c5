"""Pixels as networks take them: raster values scaled to [0, 1] per band, missing pixels filled.

`to_unit_rgb` (numpy, the loader's and evaluation's) and `unit_pixels` (torch, the training device's)
are the same arithmetic, bit for bit (a test keeps them so). A pixel is missing where the raster
says so (`valid`) and where any of its values is not finite: NaN is nodata, and so are ±inf (a
float raster's overflow or a sensor's flag), never clipped into valid-looking values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE = 255  # the label of pixels no loss or metric counts
# What networks see where a raster has no data (NaN, ±inf or its nodata value), in [0, 1] RGB: the
# ImageNet mean, which DINOv2, CLIP (fed ImageNet-normalised input, as the paper's code does) and the
# student normalise to 0. Those pixels are also ignored (255) by every loss and metric.
NODATA_FILL = (0.485, 0.456, 0.406)


def to_unit_rgb(image: np.ndarray, bands: tuple[int, ...] = (0, 1, 2), max_value: float | Sequence[float] | None = None,
                valid: np.ndarray | None = None, low: Sequence[float] | None = None,
                fill: Sequence[float] = NODATA_FILL) -> np.ndarray:
    """H×W×C raster → H×W×len(bands) float32 in [0, 1], the input every teacher and student expects:
    `(v - low) / max_value` per band, clipped (`scaling.BandScaling` says which numbers).

    Single-band rasters are repeated to every channel; `max_value` defaults to the dtype's range.
    Pixels outside `valid` (a Sample's) and pixels with a NaN or ±inf value become `fill`, so
    neither reaches a network, nor an overflow clipped to full brightness.
    `unit_pixels` is the same arithmetic on a tensor, for the training device; numpy here, because
    on the CPU it is about 3× faster on large tiles (huge pages), and a test keeps the two bit-equal.
    """
    if max_value is None:
        max_value = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    elif not isinstance(max_value, (int, float)):
        max_value = np.asarray(max_value, np.float32)
    rgb = pick_bands(image, bands).astype(np.float32)
    # integers hold no NaN or inf; for floats, judged before clipping turns an inf into a valid 1.0
    invalid = None if np.issubdtype(image.dtype, np.integer) else ~np.isfinite(rgb).all(axis=2)
    if low is not None:
        rgb -= np.asarray(low, np.float32)
    rgb = np.clip(rgb / max_value, 0.0, 1.0, out=rgb)
    if valid is not None:
        invalid = ~valid if invalid is None else invalid | ~valid
    if invalid is not None:
        rgb[invalid] = fill
    return rgb


def pick_bands(image: np.ndarray, bands: tuple[int, ...]) -> np.ndarray:
    """The raster's `bands` (H×W×len(bands), its dtype); a single-band raster's one band repeated.
    All bands in their order: the image itself (a view, not a copy)."""
    if tuple(bands) == tuple(range(image.shape[2])):
        return image
    return image[..., list((0,) * len(bands) if image.shape[2] == 1 else bands)]


def unit_pixels(pixels: torch.Tensor, max_value: float | Sequence[float] | None = None, valid: torch.Tensor | None = None,
                low: Sequence[float] | None = None, fill: Sequence[float] = NODATA_FILL) -> torch.Tensor:
    """`to_unit_rgb`'s arithmetic on picked bands (H×W×C, the raster's dtype, a tensor on any
    device) → float32 H×W×C: what training runs on the device, bit-equal to `to_unit_rgb`."""
    if max_value is None:
        max_value = float(torch.iinfo(pixels.dtype).max) if not pixels.dtype.is_floating_point else 1.0
    elif not isinstance(max_value, (int, float)):
        max_value = torch.tensor(np.asarray(max_value, np.float32), device=pixels.device)
    x = pixels.to(torch.float32, copy=True)
    invalid = ~torch.isfinite(x).all(-1) if pixels.dtype.is_floating_point else None  # as `to_unit_rgb`
    if low is not None:
        x -= torch.tensor(np.asarray(low, np.float32), device=x.device)
    x = x.div_(max_value).clamp_(0.0, 1.0)
    if valid is not None:
        invalid = ~valid if invalid is None else invalid | ~valid
    if invalid is not None:
        x[invalid] = torch.tensor(fill, dtype=torch.float32, device=x.device)
    return x
