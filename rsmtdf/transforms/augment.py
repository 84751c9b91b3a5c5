"""Strong augmentation and CutMix in two halves: the per-sample random draws, and the pixel work.

The draws stay in the loader worker, seeded per sample exactly as before (`draw_strong`,
`draw_box`: a few numbers each, microseconds). The pixel work (colour jitter, greyscale, blur, the
CutMix mask) runs batched on the training device after the host→device copy (`strong_batch`,
`box_masks`), so that at 518 px the loader workers no longer spend ~20 ms of CPU per unlabeled
sample on it. `strong_augment` keeps the per-sample torchvision definition the batched path is
tested against (same result to float tolerance).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

# one row of strong-view parameters: jitter on, brightness, contrast, saturation, hue, grey on, blur on, sigma
STRONG_PARAMS = 8
MAX_SIGMA = 2.0
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def draw_strong(rng: np.random.Generator) -> torch.Tensor:
    """The reference's strong-view draws, in its order: colour jitter (0.5, 0.5, 0.5, 0.25) with
    p 0.8, greyscale p 0.2, Gaussian blur σ ∈ [0.1, 2] with p 0.5. Identity values where off."""
    p = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    if rng.random() < 0.8:
        b, c, s = rng.uniform(0.5, 1.5, 3)
        p[:5] = torch.tensor([1.0, b, c, s, rng.uniform(-0.25, 0.25)], dtype=torch.float64)
    if rng.random() < 0.2:
        p[5] = 1.0
    if rng.random() < 0.5:
        p[6], p[7] = 1.0, float(rng.uniform(0.1, MAX_SIGMA))
    return p


def blur_kernel_size(sigma: float) -> int:
    """The reference's kernel size for σ: 2·⌈3σ⌉ + 1."""
    return 2 * math.ceil(3 * sigma) + 1


def draw_box(size: int, snap: int, rng: np.random.Generator, p: float = 0.5) -> torch.Tensor:
    """The reference's CutMix box (area 2–40 %, aspect 0.3–3.3, p 0.5) as (y0, x0, h, w), edges
    snapped to `snap` px so cached token maps mix with the same box exactly; (0, 0, 0, 0): no box."""
    if rng.random() > p:
        return torch.zeros(4, dtype=torch.int64)
    area = rng.uniform(0.02, 0.4) * size * size
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        w = max(snap, round(math.sqrt(area / ratio) / snap) * snap)
        h = max(snap, round(math.sqrt(area * ratio) / snap) * snap)
        x0, y0 = int(rng.integers(0, size // snap)) * snap, int(rng.integers(0, size // snap)) * snap
        if x0 + w <= size and y0 + h <= size:
            return torch.tensor([y0, x0, h, w], dtype=torch.int64)


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4) boxes → (B, size, size) float masks, 1 inside each box, on the boxes' device."""
    r = torch.arange(size, device=boxes.device)
    y0, x0, h, w = (boxes[:, k, None] for k in range(4))
    rows = (r >= y0) & (r < y0 + h)
    cols = (r >= x0) & (r < x0 + w)
    return (rows[:, :, None] & cols[:, None, :]).float()


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (r * GREY[0] + g * GREY[1] + b * GREY[2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (a * ratio + b * (1 - ratio)).clamp(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB → HSV, hue + shift (mod 1), → RGB, per sample."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc
    delta = torch.where(flat, torch.ones_like(maxc), maxc - minc)
    s = torch.where(flat, torch.zeros_like(maxc), (maxc - minc) / torch.where(flat, torch.ones_like(maxc), maxc))
    h = torch.where(maxc == r, (g - b) / delta, torch.where(maxc == g, 2 + (b - r) / delta, 4 + (r - g) / delta))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6 + shift.view(-1, 1, 1), 1.0)
    h6 = h * 6
    sector = torch.floor(h6).clamp(max=5)
    f = h6 - sector
    v, p, q, t = maxc, maxc * (1 - s), maxc * (1 - s * f), maxc * (1 - s * (1 - f))

    def pick(per_sector: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = per_sector[5]
        for k in range(4, -1, -1):
            out = torch.where(sector == k, per_sector[k], out)
        return out

    return torch.stack([pick((v, q, p, p, t, v)), pick((t, v, v, q, p, p)), pick((p, p, t, v, v, q))], 1)


def _blur(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each (3, H, W) sample with its own σ (torchvision's kernel, reflect padding),
    as one grouped separable convolution; each kernel is zero-padded to the largest size."""
    sigmas = sigmas.tolist()
    sizes = [blur_kernel_size(s) for s in sigmas]
    k = max(sizes)
    kernels = torch.zeros(len(sizes), k, dtype=x.dtype, device=x.device)
    for j, (n, sigma) in enumerate(zip(sizes, sigmas)):
        lim = (n - 1) / (2.0 * math.sqrt(2.0))
        grid = torch.linspace(-lim, lim, n, dtype=x.dtype, device=x.device)
        kernels[j, (k - n) // 2 : (k + n) // 2] = torch.softmax(-(grid / sigma) ** 2, 0)
    c = x.shape[1]
    weight = kernels.repeat_interleave(c, 0)  # (B·C, k)
    y = F.pad(x.reshape(1, -1, *x.shape[2:]), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, weight[:, None, :, None], groups=y.shape[1])
    y = F.conv2d(y, weight[:, None, None, :], groups=y.shape[1])
    return y.reshape(x.shape)


def strong_batch(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Strong views of a (B, C, H, W) [0, 1] batch from `draw_strong` rows (B, 8), on x's device.

    Colour ops (contrast, saturation, hue, grayscale) are defined on RGB, so they act on the first
    three channels (the teachers' bands); bands past them get the same brightness factor and blur,
    as `strong_augment` defines."""
    params = params.to(x.device)

    def col(k: int) -> torch.Tensor:
        return params[:, k].to(x.dtype).view(-1, 1, 1, 1)

    rgb, extra = x[:, :3], x[:, 3:]
    jitter = params[:, 0] > 0
    if jitter.any():
        y = (rgb * col(1)).clamp(0, 1)
        y = _blend(y, _grey(y).mean((1, 2, 3), keepdim=True), col(2))
        y = _blend(y, _grey(y), col(3))
        y = _shift_hue(y, params[:, 4].to(x.dtype))
        rgb = torch.where(jitter.view(-1, 1, 1, 1), y, rgb)
        extra = torch.where(jitter.view(-1, 1, 1, 1), (extra * col(1)).clamp(0, 1), extra)
    grey = params[:, 5] > 0
    if grey.any():
        rgb = torch.where(grey.view(-1, 1, 1, 1), _grey(rgb).expand_as(rgb), rgb)
    x = torch.cat([rgb, extra], 1) if extra.shape[1] else rgb
    blur = torch.nonzero(params[:, 6] > 0).flatten()
    if len(blur):
        x = x.index_copy(0, blur, _blur(x[blur], params[blur, 7]))
    return x.clamp(0, 1)


def strong_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The reference's photometric strong view of one (C, H, W) [0, 1] crop, with torchvision's
    per-image tensor functions: the definition `strong_batch` (what training runs, batched on the
    device) is tested against. Draws as `draw_strong`. The reference itself runs these ops on PIL
    uint8 images (and PIL's box-blur approximation of a Gaussian): each op here is within 1/255
    mean absolute difference of PIL's on a real photograph (tests/test_augment.py, README).

    Colour ops (contrast, saturation, hue, grayscale) are defined on RGB, so they act on the first
    three channels (the teachers' bands) only; bands past them get the same brightness factor and
    the same blur, the ops that mean the same on any band."""
    jitter, b, c, s, h, grey, blur, sigma = draw_strong(rng).tolist()
    rgb, extra = x[:3], x[3:]
    if jitter:
        rgb = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(rgb, b), c), s), h)
        extra = (extra * float(b)).clamp(0, 1)
    if grey:
        rgb = TF.rgb_to_grayscale(rgb, num_output_channels=3)
    x = torch.cat([rgb, extra]) if len(extra) else rgb
    if blur:
        x = TF.gaussian_blur(x, kernel_size=blur_kernel_size(sigma), sigma=sigma)
    return x.clamp(0, 1)


def cutmix_box(size: int, snap: int, rng: np.random.Generator, p: float = 0.5) -> torch.Tensor:
    """One sample's CutMix mask (size, size) from `draw_box`'s snapped box."""
    return box_masks(draw_box(size, snap, rng, p)[None], size)[0]
