"""Per-band statistics of a dataset's training tiles (`rsmtdf stats`), written beside its split lists.

Percentiles must be exact enough without holding every pixel, so each band is streamed into a
fixed-bin histogram: one bin per value for uint8 and uint16 (exact), and `FLOAT_BINS` bins over a
first pass's min/max for every other dtype (within one bin). Means and standard deviations are
float64 sums over the valid pixels. Only valid pixels count: the nodata value, NaN and whatever the
dataset's `Sample.valid` leaves out are excluded.

The file (`<splits>/band_stats.json`) also holds each band's mean and std after the 2–98 %
stretch (clipped to [0, 1]), computed from the histogram, which is what a multi-band student
normalises its extra bands with (`scaling.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import RsmtdfError
from ..utils.files import ids_sha256, write_whole
from . import splits as splits_mod
from .datasets import SegmentationDataset

STATS_FILE = "band_stats.json"
PERCENTILES = (2.0, 98.0)  # the stretch `[data] scaling = "percentile"` applies
FLOAT_BINS = 65536
EXACT_DTYPES = ("uint8", "uint16")


def stats_path(splits_dir: str | Path) -> Path:
    return Path(splits_dir) / STATS_FILE


def training_ids(splits_dir: str | Path) -> list[str]:
    """Every id of every `<split>/labeled` and `<split>/unlabeled` list, once, sorted."""
    names = splits_mod.split_names(splits_dir)
    if not names:
        raise RsmtdfError(f"{splits_dir}: no split lists here (run `rsmtdf make-splits` first)")
    ids = {sid for n in names for part in ("labeled", "unlabeled")
           if (Path(splits_dir) / n / f"{part}.txt").is_file() for sid in splits_mod.read_list(splits_dir, f"{n}/{part}")}
    return sorted(ids)


def _valid_values(image: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """(C, n) values of the pixels that count: valid ones, finite in every band."""
    flat = image.reshape(-1, image.shape[2])
    keep = np.ones(len(flat), bool) if valid is None else valid.reshape(-1).copy()
    if np.issubdtype(image.dtype, np.floating):
        keep &= np.isfinite(flat).all(axis=1)
    return flat[keep].T


class _Accumulator:
    """Sums and a histogram per band over the bins `edges` describes (an exact dtype: one bin per value)."""

    def __init__(self, bands: int, dtype: np.dtype, lo: np.ndarray | None = None, hi: np.ndarray | None = None):
        self.exact = dtype.name in EXACT_DTYPES
        self.nbins = int(np.iinfo(dtype).max) + 1 if self.exact else FLOAT_BINS
        self.lo = np.zeros(bands) if self.exact else lo
        self.width = np.ones(bands) if self.exact else np.maximum(hi - lo, 1e-12) / FLOAT_BINS
        self.hist = np.zeros((bands, self.nbins), np.int64)
        self.total = np.zeros(bands)
        self.squares = np.zeros(bands)
        self.low = np.full(bands, np.inf)
        self.high = np.full(bands, -np.inf)

    def add(self, values: np.ndarray) -> None:
        if values.shape[1] == 0:
            return
        v = values.astype(np.float64)
        self.total += v.sum(axis=1)
        self.squares += (v * v).sum(axis=1)
        self.low = np.minimum(self.low, v.min(axis=1))
        self.high = np.maximum(self.high, v.max(axis=1))
        for b in range(len(values)):
            if self.exact:
                self.hist[b] += np.bincount(values[b], minlength=self.nbins)
            else:
                k = np.clip(((v[b] - self.lo[b]) / self.width[b]).astype(np.int64), 0, self.nbins - 1)
                self.hist[b] += np.bincount(k, minlength=self.nbins)

    def band(self, b: int) -> dict:
        counts = self.hist[b]
        n = int(counts.sum())
        if n == 0:
            return {"band": b, "count": 0}
        mean = self.total[b] / n
        std = float(np.sqrt(max(self.squares[b] / n - mean * mean, 0.0)))
        centres = self.lo[b] + (np.arange(self.nbins) + (0 if self.exact else 0.5)) * self.width[b]
        cum = np.cumsum(counts)
        p2, p98 = (float(centres[np.searchsorted(cum, q / 100 * n)]) for q in PERCENTILES)
        if not self.exact:  # bin centres stay inside the true range
            p2, p98 = float(np.clip(p2, self.low[b], self.high[b])), float(np.clip(p98, self.low[b], self.high[b]))
        unit = np.clip((centres - p2) / max(p98 - p2, 1e-12), 0, 1)
        s_mean = float((counts * unit).sum() / n)
        s_std = float(np.sqrt(max((counts * unit * unit).sum() / n - s_mean ** 2, 0.0)))
        return {"band": b, "count": n, "mean": float(mean), "std": std, "p2": p2, "p98": p98,
                "min": float(self.low[b]), "max": float(self.high[b]), "stretched": {"mean": s_mean, "std": s_std}}


def compute_band_stats(dataset: SegmentationDataset, ids: list[str], progress: bool = True) -> dict:
    """Statistics of every band over the valid pixels of tiles `ids` (two passes for non-exact dtypes)."""
    if not ids:
        raise RsmtdfError(f"{dataset.root}: the split lists name no training tiles")
    indices = [dataset.index(sid) for sid in ids]
    first = dataset.load(indices[0], with_mask=False).image
    dtype, bands = first.dtype, first.shape[2]

    def tiles(desc: str):
        for i in tqdm(indices, desc=desc, unit="tile", disable=not progress, dynamic_ncols=True):
            s = dataset.load(i, with_mask=False)
            if s.image.dtype != dtype or s.image.shape[2] != bands:
                raise RsmtdfError(f"{dataset.records[i].image}: {s.image.dtype} with {s.image.shape[2]} bands, but "
                                  f"{dataset.records[indices[0]].image} is {dtype} with {bands}: one dtype and band "
                                  "count per dataset")
            yield _valid_values(s.image, s.valid)

    lo = hi = None
    if dtype.name not in EXACT_DTYPES:
        lo, hi = np.full(bands, np.inf), np.full(bands, -np.inf)
        for v in tiles("stats (range)"):
            if v.shape[1]:
                lo, hi = np.minimum(lo, v.min(axis=1)), np.maximum(hi, v.max(axis=1))
        lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 1.0)
    acc = _Accumulator(bands, dtype, lo, hi)
    for v in tiles("stats"):
        acc.add(v)
    return {"dataset": {"name": dataset.name, "root": str(dataset.root.resolve())}, "tiles": len(ids),
            "ids_sha256": ids_sha256(ids), "dtype": dtype.name, "percentiles": list(PERCENTILES),
            "histogram": "exact" if acc.exact else f"{FLOAT_BINS} bins over [min, max]",
            "bands": [acc.band(b) for b in range(bands)]}


def write_band_stats(stats: dict, splits_dir: str | Path) -> Path:
    """Write the statistics beside the split lists, whole."""
    return write_whole(stats_path(splits_dir), json.dumps(stats, indent=1) + "\n")


def read_band_stats(splits_dir: str | Path) -> dict | None:
    """The statistics beside these split lists, or None when `rsmtdf stats` has not been run."""
    path = stats_path(splits_dir)
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text())
        stats["bands"][0]["count"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RsmtdfError(f"{path}: not a band statistics file; run `rsmtdf stats` again") from None
    return stats


def summary_table(stats: dict) -> str:
    """The statistics as a fixed-width table, one row per band."""
    head = f"{'band':>4} {'valid px':>12} {'mean':>11} {'std':>11} {'p2':>11} {'p98':>11} {'min':>11} {'max':>11}"
    rows = [head]
    for b in stats["bands"]:
        if not b["count"]:
            rows.append(f"{b['band']:>4} {0:>12}   (no valid pixel)")
            continue
        rows.append(f"{b['band']:>4} {b['count']:>12} " + " ".join(f"{b[k]:>11.5g}" for k in
                                                                  ("mean", "std", "p2", "p98", "min", "max")))
    return "\n".join(rows)
