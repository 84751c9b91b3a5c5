"""Procedural land-cover scenes in LoveDA's layout and raw codes, for `rsmtdf demo` and tests.

The real LoveDA sample is only a handful of tiles, while training, the teacher cache and the CLI
need many, offline. Each class here has its own colour distribution and texture (striped crop
fields, grainy canopy, smooth water, shadowed roofs), so a model can actually learn the mapping.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

NODATA, BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(8)
DOMAINS = ("Rural", "Urban")  # LoveDA numbers Rural tiles before Urban ones within a split

# Mean RGB per raw code (index = code); each scene jitters them. Fields and roofs use the lists below.
PALETTE = np.array([(0, 0, 0), (128, 132, 108), (170, 165, 160), (128, 128, 124), (38, 62, 90),
                    (178, 148, 110), (44, 76, 42), (0, 0, 0)], np.float32)
CROPS = np.array([(112, 150, 62), (158, 168, 82), (188, 168, 104), (136, 114, 84), (90, 128, 68)], np.float32)
ROOFS = np.array([(186, 84, 64), (206, 206, 200), (112, 112, 120), (92, 122, 168), (214, 186, 148)], np.float32)
# Texture amplitude per raw code: fine grain (tree crowns, gravel) and patchy mid-scale variation.
FINE = np.array([0, 8, 6, 4, 2, 16, 80, 8], np.float32)
MID = np.array([0, 34, 6, 8, 10, 40, 30, 14], np.float32)


def make_landcover_dataset(root: str | Path, train_scenes: int = 4, val_scenes: int = 2, size: int = 1024,
                           domains: tuple[str, ...] = ("Urban", "Rural"), seed: int = 0) -> Path:
    """Write procedural scenes as {Train,Val}/{Urban,Rural}/{images_png,masks_png}/<n>.png; returns root.

    Ids run consecutively over Train then Val, Rural before Urban, as in LoveDA, so they are unique.
    Each scene has its own generator seeded by (seed, id): same seed, byte-identical files.
    """
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"LoveDA has only the domains {DOMAINS}, not {sorted(unknown)}")
    root = Path(root)
    n = 0
    for split, count in (("Train", train_scenes), ("Val", val_scenes)):
        for domain in (d for d in DOMAINS if d in domains):
            images, masks = root / split / domain / "images_png", root / split / domain / "masks_png"
            images.mkdir(parents=True, exist_ok=True)
            masks.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                image, mask = render_scene(size, np.random.default_rng([seed, n]), urban=domain == "Urban")
                Image.fromarray(image, "RGB").save(images / f"{n}.png")
                Image.fromarray(mask, "L").save(masks / f"{n}.png")
                n += 1
    return root


def render_scene(size: int, rng: np.random.Generator, urban: bool) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (size×size×3 uint8 RGB image, size×size uint8 mask with LoveDA raw codes)."""
    s = size / 1024  # all lengths below are in pixels of a 1024² LoveDA tile
    theta = rng.uniform(0, np.pi)  # dominant orientation of fields, streets and buildings
    ys, xs = np.ogrid[:size, :size]
    dy, dx = (ys - size / 2).astype(np.float32), (xs - size / 2).astype(np.float32)
    u, v = dx * math.cos(theta) + dy * math.sin(theta), dy * math.cos(theta) - dx * math.sin(theta)

    # `label` holds raw codes; `paint` indexes rows of `colours`: rows 0..7 are this scene's class
    # colours, later rows one parcel or one roof each (so the image is composed in one gather at the end).
    label, paint, parcel_colours, stripes = _patchwork(size, s, rng, urban, u, v)
    palette = PALETTE + rng.normal(0, 8, PALETTE.shape).astype(np.float32)
    palette[ROAD] = palette[ROAD].mean()  # asphalt stays neutral grey whatever the jitter
    colours = [palette, parcel_colours]

    def fill(mask: np.ndarray, code: int, win: tuple[slice, slice] = np.s_[:, :]) -> None:
        label[win][mask], paint[win][mask] = code, code

    # Natural regions: the top quantile of multi-scale noise gives irregular forest stands and bare patches.
    for code, cover in ((FOREST, rng.uniform(0.03, 0.2)), (BARREN, rng.uniform(0.02, 0.08))):
        field = 0.6 * _noise(size, 4, rng) + 0.4 * _noise(size, 12, rng)
        fill(field > np.quantile(field[::8, ::8], 1 - cover), code)
    mid = _noise(size, max(2, size // 40), rng)
    if rng.random() < 0.6:  # a river: a wide meandering band
        fill(_band(size, s, rng, dx, dy, width=rng.uniform(20, 70) * s, amp=rng.uniform(30, 120) * s), WATER)
    if rng.random() < 0.5:  # a lake: an ellipse with a noisy shore
        cy, cx, ry, rx = *rng.uniform(0, size, 2), *rng.uniform(30, 150, 2) * s
        win = _window(size, cy, cx, 1.5 * ry, 1.5 * rx)
        yy, xx = np.ogrid[win]
        fill(np.hypot((yy - cy) / ry, (xx - cx) / rx) + 1.2 * (mid[win] - 0.5) < 1, WATER, win)

    # Roads: a street grid along theta in towns, a few winding tracks in the country.
    for _ in range(rng.integers(3, 7) if urban else rng.integers(1, 4)):
        turn = theta + rng.integers(2) * np.pi / 2 + (rng.normal(0, 0.03) if urban else rng.uniform(-0.6, 0.6))
        width = max(3.0, (rng.uniform(6, 14) if urban else rng.uniform(3, 7)) * s)
        fill(_band(size, s, rng, dx, dy, width, 0 if urban else rng.uniform(0, 60) * s, turn), ROAD)

    # Buildings: rotated rectangles with a roof colour and a cast shadow, kept off roads, water and each other.
    shade = np.ones((size, size), np.float32)
    azimuth = rng.uniform(0, 2 * np.pi)
    sun = rng.uniform(1, 5) * s * np.array([math.sin(azimuth), math.cos(azimuth)])  # shadow offset
    village = rng.uniform(0.2, 0.8, 2) * size
    roofs = []
    for _ in range(rng.integers(200, 400) if urban else rng.integers(0, 40)):
        centre = rng.uniform(0, size, 2) if urban else village + rng.normal(0, 90 * s, 2)
        h, w = np.maximum(4, rng.uniform(10, 40, 2) * s)
        angle, roof = theta + rng.integers(2) * np.pi / 2 + rng.normal(0, 0.05), ROOFS[rng.integers(len(ROOFS))]
        cy, cx = np.clip(centre, 0, size - 1)
        if label[int(cy), int(cx)] in (ROAD, WATER, BUILDING):
            continue
        win, m = _rect(size, cy + sun[0], cx + sun[1], h, w, angle)
        shade[win][m] *= 0.55
        win, m = _rect(size, cy, cx, h, w, angle)
        label[win][m], paint[win][m], shade[win][m] = BUILDING, 8 + len(parcel_colours) + len(roofs), 1
        roofs.append(roof + rng.normal(0, 6, 3))
    colours.append(np.array(roofs, np.float32).reshape(-1, 3))

    if rng.random() < 0.12:  # LoveDA tiles sometimes end in a black no-data strip
        strip = int(rng.uniform(0.05, 0.3) * size)
        label[[np.s_[:strip, :], np.s_[-strip:, :], np.s_[:, :strip], np.s_[:, -strip:]][rng.integers(4)]] = NODATA

    fine = _noise(size, max(4, size // 6), rng) - 0.5  # ~6 px grain: individual tree crowns
    texture = FINE[label] * fine + MID[label] * (mid - 0.5) + np.where(label == AGRICULTURE, stripes, 0)
    gy, gx = rng.uniform(-0.15, 0.15, 2)  # slight illumination gradient across the tile
    light = shade * (1 + gy * (ys / size - 0.5) + gx * (xs / size - 0.5)).astype(np.float32)
    image = (np.concatenate(colours)[paint] + texture[..., None]) * light[..., None]
    image += (rng.random((size, size, 3), np.float32) - 0.5) * 12  # sensor noise
    image[label == NODATA] = 0
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def _patchwork(size: int, s: float, rng: np.random.Generator, urban: bool, u: np.ndarray,
               v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Base layer: an irregular rotated grid of parcels (mostly crop fields in the country, mostly
    open ground in towns), each with its own colour and, for fields, its own row-stripe direction.

    Returns (label, paint, parcel colours, stripes); parcel k is painted with colour row 8 + k.
    """
    lo = -0.75 * size  # 28 edges at least 60·s px apart span the rotated tile (±0.71·size)
    eu, ev = (np.float32(lo + np.cumsum(rng.uniform(0.5, 1.5, 28) * rng.uniform(120, 300) * s)) for _ in range(2))
    iu, iv = np.searchsorted(eu, u), np.searchsorted(ev, v)
    cell = iu * len(ev) + iv
    n = len(eu) * len(ev)
    probs = (0.08, 0.7, 0.12, 0.1) if urban else (0.66, 0.16, 0.12, 0.06)
    codes = rng.choice(np.array([AGRICULTURE, BACKGROUND, FOREST, BARREN], np.uint8), n, p=probs)
    rgb = np.where((codes == AGRICULTURE)[:, None], CROPS[rng.integers(len(CROPS), size=n)], PALETTE[codes])
    rgb = (rgb + rng.normal(0, 8, (n, 3))).astype(np.float32)
    period = np.maximum(3, rng.uniform(4, 10, n) * s).astype(np.float32)
    amp = rng.uniform(10, 24, n).astype(np.float32)
    along = rng.random(n) < 0.5
    stripes = np.sin(np.where(along[cell], u, v) * (2 * np.pi) / period[cell]) * amp[cell]
    label, paint = codes[cell], (cell + 8).astype(np.int32)
    # Field margins: a thin strip of background where parcels meet.
    bu, bv = np.concatenate([[lo], eu]), np.concatenate([[lo], ev])
    gap = max(1.0, 2 * s)
    margin = (np.minimum(u - bu[iu], eu[iu] - u) < gap) | (np.minimum(v - bv[iv], ev[iv] - v) < gap)
    margin &= label == AGRICULTURE
    label[margin], paint[margin] = BACKGROUND, BACKGROUND
    return label, paint, rgb, stripes


def _band(size: int, s: float, rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray, width: float,
          amp: float, angle: float | None = None) -> np.ndarray:
    """Mask of a straight or sinuous line of `width` px (roads, rivers) through a random point."""
    angle = rng.uniform(0, np.pi) if angle is None else angle
    offset, wavelength, phase = rng.uniform(-0.4, 0.4) * size, rng.uniform(300, 900) * s, rng.uniform(0, 2 * np.pi)
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = dy * math.cos(angle) - dx * math.sin(angle) - offset
    if amp:
        across = across - amp * np.sin(along * (2 * np.pi / wavelength) + phase)
    return np.abs(across) < width / 2


def _rect(size: int, cy: float, cx: float, h: float, w: float, angle: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """Rotated rectangle as (window, mask within window), so small shapes cost only their bounding box."""
    r = 0.5 * np.hypot(h, w)
    win = _window(size, cy, cx, r, r)
    yy, xx = np.ogrid[win]
    py, px = yy - cy, xx - cx
    along, across = px * np.cos(angle) + py * np.sin(angle), py * np.cos(angle) - px * np.sin(angle)
    return win, (np.abs(along) < w / 2) & (np.abs(across) < h / 2)


def _window(size: int, cy: float, cx: float, ry: float, rx: float) -> tuple[slice, slice]:
    """Bounding box of a shape centred at (cy, cx), clipped to the tile."""
    return np.s_[int(np.clip(cy - ry, 0, size)):int(np.clip(cy + ry + 1, 0, size)),
                 int(np.clip(cx - rx, 0, size)):int(np.clip(cx + rx + 1, 0, size))]


def _noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth value noise in [0, 1]: a (cells+1)² random lattice upsampled separably with smoothstep."""
    lattice = rng.random((cells + 1, cells + 1), np.float32)
    t = np.arange(size, dtype=np.float32) * (cells / size)
    i = t.astype(np.int64)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f
