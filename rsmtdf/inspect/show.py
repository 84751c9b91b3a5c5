"""Look inside the teacher cache: a sample's stored views beside each teacher's features as PCA colours.

A quick check that a cache holds what it should: the features of a crop should outline the crop's
objects, agree across views of the same place, and have each teacher's own token grid.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..cache.store import FeatureCache
from ..data.datasets import SegmentationDataset
from ..errors import RsmtdfError
from ..pipeline.resolve import cache_dataset
from ..transforms.scaling import BandScaling
from ..transforms.views import apply_view

GAP = 4  # white pixels between cells and around the figure
PLACEHOLDER = (160, 160, 160)  # the view column when the dataset's pixels are not at hand


def pca_rgb(tokens: np.ndarray, grid: int) -> np.ndarray:
    """(V, L=grid², C) features of V views of one sample → (V, grid, grid, 3) uint8: the first three
    principal components fitted jointly over all V views (so colours agree across views), each
    min-max scaled to 0..255 over all views. Tokens are row-major on the grid."""
    v, length, c = tokens.shape
    if length != grid * grid:
        raise ValueError(f"{length} tokens do not fill a {grid}×{grid} grid")
    x = tokens.reshape(v * length, c).astype(np.float64)
    x -= x.mean(axis=0)
    _, vectors = np.linalg.eigh(x.T @ x)  # eigenvalues ascending: the last columns lead
    axes = vectors[:, ::-1][:, :3]
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])  # same colours on every run
    p = x @ axes
    p = np.pad(p, ((0, 0), (0, 3 - p.shape[1])))  # fewer than three channels: the rest stay black
    lo, span = p.min(axis=0), np.ptp(p, axis=0)
    scaled = np.where(span > 0, (p - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.rint(scaled * 255).astype(np.uint8).reshape(v, grid, grid, 3)


def _sample_index(cache: FeatureCache, sample_id: str) -> int:
    ids = cache.ids
    try:
        return ids.index(sample_id)
    except ValueError:
        hint = difflib.get_close_matches(sample_id, ids, n=3) or ids[:3]
        raise RsmtdfError(f"{cache.url}: no sample '{sample_id}' in this cache "
                          f"(e.g. {', '.join(hint)}; it holds {len(ids)} samples)") from None


def choose_samples(cache: FeatureCache, sample_id: str | None = None, index: int | None = None,
                   random: int | None = None, seed: int = 0) -> list[str]:
    """The ids `show` draws: one by id, one by position, or N at random (seeded, in cache order)."""
    ids = cache.ids
    if sample_id is not None:
        return [ids[_sample_index(cache, sample_id)]]
    if index is not None:
        if not 0 <= index < len(ids):
            raise RsmtdfError(f"--index {index}: the cache {cache.url} holds samples 0..{len(ids) - 1}")
        return [ids[index]]
    if random is None or random < 1:
        raise RsmtdfError(f"--random {random}: give at least 1")
    picked = np.random.default_rng(seed).choice(len(ids), min(random, len(ids)), replace=False)
    return [ids[k] for k in sorted(picked)]


def view_images(cache: FeatureCache, i: int, sample_id: str, dataset: SegmentationDataset | None,
                 cell: int) -> list[Image.Image]:
    """Each stored view's crop from the dataset, at cell×cell, scaled as the cache's teachers saw it
    (16-bit data with its percentile stretch, not black); grey if the pixels cannot be had."""
    views = cache.views_of(i)
    rgb = None
    scaling = cache.identity.input or BandScaling()
    if dataset is not None:
        try:
            sample = dataset.load(dataset.index(sample_id), with_mask=False)
            rgb = scaling.unit(sample.image, sample.valid)
        except RsmtdfError:  # moved or partial dataset: the features are still worth seeing
            pass
    if rgb is None:
        return [Image.new("RGB", (cell, cell), PLACEHOLDER) for _ in views]
    crop = cache.identity.views.crop_size
    return [Image.fromarray(np.rint(apply_view(rgb, v, crop) * 255).astype(np.uint8)).resize((cell, cell))
            for v in views]


def render_sample(cache: FeatureCache, sample_id: str, out: str | Path, dataset: SegmentationDataset | None = None,
                  cell: int = 160) -> dict:
    """Write a PNG: one row per stored view of the sample; first column the view's crop rendered from
    the dataset with apply_view (if dataset is None or its files are missing, a grey placeholder), then
    one PCA panel per teacher. Each PCA panel is the grid×grid PCA image upscaled by nearest neighbour by
    the integer factor f = max(1, cell // grid), so its size is exactly grid·f and every token is an f×f
    block. Column headers (teacher name, grid) drawn with PIL's default font in a top band.
    Returns the layout: {"size": (W, H), "panels": {teacher: {"grid": g, "factor": f, "boxes": [(x0, y0) per view]}},
    "image_boxes": [(x0, y0) per view]}."""
    i = _sample_index(cache, sample_id)
    images = view_images(cache, i, sample_id, dataset, cell)
    reader = cache.reader()
    feats = [reader.read(i, a) for a in range(len(images))]
    grids = {t.name: t.grid for t in cache.identity.teachers}
    panels = {}
    for name, g in grids.items():
        f = max(1, cell // g)
        pca = pca_rgb(np.stack([x[name] for x in feats]), g)
        panels[name] = (g, f, [Image.fromarray(p).resize((g * f, g * f), Image.Resampling.NEAREST) for p in pca])

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    headers = [("view crop", cell)] + [(f"{n} {g}x{g}", g * f) for n, (g, f, _) in panels.items()]
    widths = [max(size, int(measure.textlength(text, font=font))) for text, size in headers]
    band = int(measure.textbbox((0, 0), "Ag", font=font)[3]) + 2 * GAP
    row = max(size for _, size in headers)
    xs = [GAP + sum(widths[:k]) + k * GAP for k in range(len(widths))]
    ys = [band + a * (row + GAP) for a in range(len(images))]
    size = (xs[-1] + widths[-1] + GAP, ys[-1] + row + GAP)

    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for (text, _), x in zip(headers, xs):
        draw.text((x, GAP), text, fill="black", font=font)
    layout = {"size": size, "panels": {}, "image_boxes": [(xs[0], y) for y in ys]}
    for im, y in zip(images, ys):
        canvas.paste(im, (xs[0], y))
    for (name, (g, f, tiles)), x in zip(panels.items(), xs[1:]):
        for tile, y in zip(tiles, ys):
            canvas.paste(tile, (x, y))
        layout["panels"][name] = {"grid": g, "factor": f, "boxes": [(x, y) for y in ys]}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return layout


def show_samples(url: str, sample_id: str | None, index: int | None, random: int | None, seed: int,
                 out: Path | None) -> list[Path]:
    """`rsmtdf show`: a PNG per chosen sample (`choose_samples`) at `out` (a file, or with `random`
    a folder; default <sample>.png here); the dataset's pixels where it is at hand. Returns the files."""
    if sum(x is not None for x in (sample_id, index, random)) != 1:
        raise RsmtdfError("show: give exactly one of --sample ID, --index I, --random N")
    cache = FeatureCache.open(url)
    dataset = cache_dataset(cache)  # None if the dataset moved: the features alone
    written = []
    for sid in choose_samples(cache, sample_id, index, random, seed):
        name = Path(sid.replace("/", "_") + ".png")
        target = (out or Path(".")) / name if random is not None else out or name
        render_sample(cache, sid, target, dataset)
        written.append(target)
    return written
