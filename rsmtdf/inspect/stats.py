"""`rsmtdf inspect --stats`: are a cache's features sane, do its stored views line up, how do its
teachers differ. Streams over the cache (or a seeded random subset of samples) through the public
reader; needs no GPU and no teacher weights.

- Per teacher: token norms (min, percentiles, max), per-channel mean and variance, fractions of zero,
  NaN and saturated values, the variance spectrum (components explaining 90 / 99 / 99.9 %) and the
  rate–distortion bound it sets beside each storage kind's bytes (`compact`).
- Cross-view consistency: each token of one stored view is placed on the sample (`geometry`) and
  compared (cosine) with the token of another stored view covering that ground position, against
  random token pairs of the same two views. Views replayed wrongly show no gap.
- Teacher agreement: linear CKA between teachers on the same crop positions, and each teacher's
  per-class separation (a Fisher-like ratio) from the tiles' masks at the token centres.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..cache.store import FeatureCache
from ..data.datasets import SegmentationDataset
from ..errors import RsmtdfError
from ..pipeline.resolve import cache_dataset
from ..transforms.pixels import IGNORE
from ..utils.files import write_whole
from .compact import bound_lines, stats_bounds, stored_fidelity
from .geometry import TokenGrid, match_teachers, token_grid, tokens_at, tokens_on_sample

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
THRESHOLDS = (0.9, 0.99, 0.999)
NORMS_KEPT = 1_000_000  # token norms kept (a uniform random subset) for the percentiles: exact below this
SPECTRUM_TOKENS = 256  # tokens per (sample, view) entering the covariance, a seeded random subset
AGREEMENT_ROWS = 8192  # matched positions per teacher pair for CKA
FP16_MAX = 65504.0
HIST_BINS = np.linspace(-1.0, 1.0, 81)  # cosine histograms for the report
GAP_MIN = 0.05  # cross-view cosine gap below which the views do not line up with the features


def default_output(url: str) -> Path:
    """Where the JSON goes: beside a local cache (`cache/loveda` → `cache/loveda.stats.json`); for a
    URL, `<last path part>.stats.json` in the current folder."""
    if "://" in url and not url.startswith("file://"):
        return Path(url.rstrip("/").rsplit("/", 1)[-1] + ".stats.json")
    p = Path(url.removeprefix("file://"))
    return p.with_name(p.name + ".stats.json")


class FeatureStats:
    """Streamed statistics of one teacher's tokens."""

    def __init__(self, dim: int, storage: str, rng: np.random.Generator) -> None:
        self.storage, self.rng = storage, rng
        self.tokens = self.chunks = self.nan_chunks = self.nonfinite = 0
        self.values = self.zeros = self.saturated = 0
        self.norm_min, self.norm_max = math.inf, -math.inf
        self.norms, self.keys = np.empty(0), np.empty(0)
        self.mean, self.m2 = np.zeros(dim), np.zeros(dim)
        self.cov_n, self.cov_sum, self.cov_outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        """x: (L, C) float32 tokens of one (sample, view). Tokens holding ±inf (fp16 overflow) count
        as saturated and non-finite, and stay out of the norms, moments and spectrum."""
        self.chunks += 1
        self.values += x.size
        self.zeros += int((x == 0).sum())
        if self.storage == "int8":  # the per-token scale puts each token's largest channel at ±127
            top = np.abs(x).max(axis=1, keepdims=True)
            self.saturated += int(((np.abs(x) >= top * (1 - 0.5 / 127)) & (top > 0)).sum())
        else:
            self.saturated += int((np.abs(x) >= FP16_MAX).sum())
        finite = np.isfinite(x).all(axis=1)
        self.nonfinite += int((~finite).sum())
        x64 = x[finite].astype(np.float64)
        n = len(x64)
        if n == 0:
            return
        norms = np.linalg.norm(x64, axis=1)
        self.norm_min, self.norm_max = min(self.norm_min, float(norms.min())), max(self.norm_max, float(norms.max()))
        self.norms = np.concatenate([self.norms, norms])
        self.keys = np.concatenate([self.keys, self.rng.random(n)])
        if len(self.norms) > 2 * NORMS_KEPT:  # keep the smallest random keys: a uniform subset
            keep = np.argpartition(self.keys, NORMS_KEPT)[:NORMS_KEPT]
            self.norms, self.keys = self.norms[keep], self.keys[keep]
        total = self.tokens + n  # Chan et al.: merge the chunk's mean and M2 into the running ones
        delta = x64.mean(axis=0) - self.mean
        self.m2 += ((x64 - x64.mean(axis=0)) ** 2).sum(axis=0) + delta**2 * self.tokens * n / total
        self.mean += delta * n / total
        self.tokens = total
        sub = x64 if n <= SPECTRUM_TOKENS else x64[self.rng.choice(n, SPECTRUM_TOKENS, replace=False)]
        self.cov_n += len(sub)
        self.cov_sum += sub.sum(axis=0)
        self.cov_outer += sub.T @ sub

    def result(self) -> dict:
        out = {"tokens": self.tokens, "nonfinite_tokens": self.nonfinite, "chunks": self.chunks,
               "nan_chunks": self.nan_chunks}
        if not self.tokens:
            return out
        norms, values = self.norms, self.values
        mu = self.cov_sum / self.cov_n
        eig = np.clip(np.linalg.eigvalsh(self.cov_outer / self.cov_n - np.outer(mu, mu))[::-1], 0, None)
        explained = np.cumsum(eig) / eig.sum() if eig.sum() > 0 else np.ones_like(eig)
        var = self.m2 / self.tokens
        return {
            **out,
            "norm": {"min": self.norm_min, **{f"p{q}": float(np.percentile(norms, q)) for q in PERCENTILES},
                     "max": self.norm_max, "mean": float(norms.mean())},
            "norm_hist": dict(zip(("counts", "edges"), (v.tolist() for v in np.histogram(norms, 60)))),
            "channel_mean": self.mean.tolist(), "channel_var": var.tolist(),
            "fraction": {"zero": self.zeros / values, "saturated": self.saturated / values,
                         "nan_chunks": self.nan_chunks / (self.chunks + self.nan_chunks)},
            "spectrum": {"components": {str(t): int(np.searchsorted(explained, t - 1e-12) + 1) for t in THRESHOLDS},
                         "explained": explained.tolist(), "variances": eig.tolist(), "tokens": self.cov_n},
        }


class Cosines:
    """Mean, spread and histogram of cosine similarities, streamed."""

    def __init__(self) -> None:
        self.n, self.total, self.total_sq = 0, 0.0, 0.0
        self.hist = np.zeros(len(HIST_BINS) - 1, np.int64)

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if not len(a):
            return
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            c = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)
        c = c[np.isfinite(c)]
        self.n += len(c)
        self.total += float(c.sum())
        self.total_sq += float((c.astype(np.float64) ** 2).sum())
        self.hist += np.histogram(np.clip(c, -1, 1), HIST_BINS)[0]

    def result(self) -> dict:
        mean = self.total / self.n if self.n else None
        var = max(self.total_sq / self.n - mean**2, 0.0) if self.n else None
        return {"pairs": self.n, "mean": mean, "var": var, "hist": self.hist.tolist()}


class Consistency:
    """Cross-view consistency of one teacher: matched ground positions vs random token pairs."""

    def __init__(self, grid: TokenGrid, crop: int, rng: np.random.Generator) -> None:
        self.grid, self.crop, self.rng = grid, crop, rng
        self.matched, self.random = Cosines(), Cosines()

    def add(self, feats: list[np.ndarray], views: list, hw: tuple[int, int]) -> None:
        placed = [tokens_on_sample(self.grid, v, self.crop, hw) for v in views]
        for a in range(len(views)):
            s, on = placed[a]
            for b in range(a + 1, len(views)):
                index, covered = tokens_at(self.grid, views[b], self.crop, hw, s)
                keep = on & covered
                self.matched.add(feats[a][keep], feats[b][index[keep]])
                n = int(keep.sum())
                self.random.add(feats[a][self.rng.integers(0, len(feats[a]), n)],
                                feats[b][self.rng.integers(0, len(feats[b]), n)])

    def result(self) -> dict:
        m, r = self.matched.result(), self.random.result()
        out = {"matched": m, "random": r, "grid": asdict(self.grid)}
        if not m["pairs"]:
            return {**out, "gap": None, "ok": None}
        gap = m["mean"] - r["mean"]
        se = math.sqrt(m["var"] / m["pairs"] + r["var"] / r["pairs"])
        return {**out, "gap": gap, "stderr": se, "ok": bool(gap >= GAP_MIN and gap > 3 * se)}


class Agreement:
    """Linear CKA between two teachers on the same crop positions of the same views."""

    def __init__(self, a: TokenGrid, b: TokenGrid, crop: int, per_chunk: int, rng: np.random.Generator) -> None:
        self.index, self.ok = match_teachers(a, b, crop)
        self.per_chunk, self.rng = per_chunk, rng
        self.x, self.y = [], []

    def add(self, fa: np.ndarray, fb: np.ndarray) -> None:
        rows = np.flatnonzero(self.ok)
        rows = rows if len(rows) <= self.per_chunk else self.rng.choice(rows, self.per_chunk, replace=False)
        self.x.append(fa[rows])
        self.y.append(fb[self.index[rows]])

    def result(self) -> dict:
        if not self.x:
            return {"cka": None, "positions": 0}
        x, y = np.concatenate(self.x).astype(np.float64), np.concatenate(self.y).astype(np.float64)
        finite = np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1)
        x, y = x[finite], y[finite]
        return {"cka": linear_cka(x, y), "positions": len(x)}


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of two (n, ·) representations of the same n positions."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / den) if den > 0 else 0.0


class Separation:
    """Per-class mean-feature separation of one teacher, from the class under each token centre."""

    def __init__(self, grid: TokenGrid, crop: int, dim: int, classes: list[str]) -> None:
        self.grid, self.crop, self.classes = grid, crop, classes
        k = len(classes)
        self.n, self.sum, self.sumsq = np.zeros(k, np.int64), np.zeros((k, dim)), np.zeros(k)

    def add(self, x: np.ndarray, view, hw: tuple[int, int], mask: np.ndarray) -> None:
        s, on = tokens_on_sample(self.grid, view, self.crop, hw)
        yx = np.clip(np.rint(s).astype(np.int64), 0, np.array(hw) - 1)
        label = np.where(on, mask[yx[:, 0], yx[:, 1]], IGNORE)
        keep = (label != IGNORE) & np.isfinite(x).all(axis=1)
        x, label = x[keep].astype(np.float64), label[keep].astype(np.int64)
        self.n += np.bincount(label, minlength=len(self.classes))
        np.add.at(self.sum, label, x)
        self.sumsq += np.bincount(label, weights=(x**2).sum(axis=1), minlength=len(self.classes))

    def result(self) -> dict:
        total, s_all, q_all = self.n.sum(), self.sum.sum(axis=0), self.sumsq.sum()
        if total == 0:
            return {"tokens": 0, "overall": None, "classes": {}}
        mu = s_all / total
        between = within = 0.0
        classes = {}
        for k, name in enumerate(self.classes):
            n = self.n[k]
            if n == 0 or n == total:
                classes[name] = {"tokens": int(n), "ratio": None}
                continue
            mu_k, mu_r = self.sum[k] / n, (s_all - self.sum[k]) / (total - n)
            tr_k = self.sumsq[k] / n - mu_k @ mu_k
            tr_r = (q_all - self.sumsq[k]) / (total - n) - mu_r @ mu_r
            between += n * float((mu_k - mu) @ (mu_k - mu))
            within += n * tr_k
            classes[name] = {"tokens": int(n), "ratio": float((mu_k - mu_r) @ (mu_k - mu_r) / max(tr_k + tr_r, 1e-12))}
        return {"tokens": int(total), "overall": between / within if within > 0 else None, "classes": classes}


def _chosen(cache: FeatureCache, samples: int | None, seed: int) -> list[int]:
    """Written samples, all or a seeded random subset of them, in cache order."""
    missing = set(cache.missing_shards())
    written = [i for k in range(cache.num_shards) if k not in missing for i in cache.shard_range(k)]
    if not written:
        raise RsmtdfError(f"{cache.url}: no shard of this cache is written yet")
    if samples is not None and samples < len(written):
        written = sorted(np.random.default_rng(seed).choice(written, samples, replace=False).tolist())
    return written


def compute_stats(cache: FeatureCache, dataset: SegmentationDataset | None, samples: int | None = None,
                  seed: int = 0, progress: bool = True) -> dict:
    """Every statistic of the module docstring, streamed over the chosen samples."""
    start = time.perf_counter()
    ident = cache.identity
    teachers = [t.record() for t in ident.teachers]
    crop = ident.views.crop_size
    rng = np.random.default_rng(seed)
    order = _chosen(cache, samples, seed)
    grids = {t["name"]: token_grid(t) for t in teachers}
    feature = {t["name"]: FeatureStats(int(t["dim"]), ident.storage, rng) for t in teachers}
    consistency = {t["name"]: Consistency(grids[t["name"]], crop, rng) for t in teachers}
    per_chunk = max(1, -(-AGREEMENT_ROWS // (len(order) * cache.num_views)))
    pairs = {(p["name"], q["name"]): Agreement(grids[p["name"]], grids[q["name"]], crop, per_chunk, rng)
             for k, p in enumerate(teachers) for q in teachers[k + 1:]}
    classes = ident.class_names
    separation = {t["name"]: Separation(grids[t["name"]], crop, int(t["dim"]), classes) for t in teachers}
    reader, ids = cache.reader(), cache.ids
    tile = ident.dataset.tile
    where = {"sizes": 0, "masks": 0}
    unread: list[str] = []  # why masks could not be read, one entry per sample

    for i in tqdm(order, desc=f"inspect {cache.url}", unit="sample", disable=not progress, dynamic_ncols=True):
        views = cache.views_of(i)
        hw, mask, why = _sample_geometry(dataset, ids[i], tile)
        unread += [why] if why else []
        where["sizes"] += hw is not None
        where["masks"] += mask is not None
        chunks = []
        for v in range(len(views)):
            try:
                chunks.append(reader.read(i, v))
            except RsmtdfError:  # NaN in the chunk: unwritten or broken; counted, not used
                for f in feature.values():
                    f.nan_chunks += 1
                chunks.append(None)
        good = [v for v, c in enumerate(chunks) if c is not None]
        for name, f in feature.items():
            for v in good:
                f.add(chunks[v][name])
            if hw is not None:
                consistency[name].add([chunks[v][name] for v in good], [views[v] for v in good], hw)
            if mask is not None and classes:
                for v in good:
                    separation[name].add(chunks[v][name], views[v], hw, mask)
        for (p, q), agree in pairs.items():
            for v in good:
                agree.add(chunks[v][p], chunks[v][q])

    features = {n: f.result() for n, f in feature.items()}
    return {
        "cache": cache.url, "storage": ident.storage, "samples": len(order), "of_samples": cache.num_samples,
        "views": cache.num_views, "seed": seed, "crop_size": crop, "seconds": round(time.perf_counter() - start, 2),
        "samples_with_size": where["sizes"], "samples_with_mask": where["masks"],
        "masks_unread": {"samples": len(unread), "first": unread[0] if unread else None},
        "geometry": {n: asdict(g) for n, g in grids.items()},
        "features": features, "rate_bound": stats_bounds(features, cache),
        "fidelity": {n: f.record() if f else None for n, f in stored_fidelity(cache).items()},
        "consistency": {n: c.result() for n, c in consistency.items()},
        "agreement": {"cka": {f"{p}|{q}": g.result() for (p, q), g in pairs.items()},
                      "separation": {n: s.result() for n, s in separation.items()}},
    }


def _sample_geometry(dataset: SegmentationDataset | None, sample_id: str, tile: int | None):
    """(height, width), mask and why the mask could not be read, of a sample; None where the
    dataset cannot say (no dataset at hand: no reason, since none was expected)."""
    if dataset is None:
        return ((tile, tile) if tile else None), None, None
    try:
        k = dataset.index(sample_id)
        hw = dataset.size_of(k)
        return hw, dataset.load(k, with_mask=True).mask, None
    except RsmtdfError as exc:  # moved, partial or undecodable: features alone, and the reason reported
        return ((tile, tile) if tile else None), None, str(exc)


def write_json(result: dict, path: Path) -> Path:
    """Strict JSON, written whole."""
    return write_whole(path, json.dumps(result, allow_nan=False))


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def format_stats(result: dict, red=lambda s: s) -> str:
    """The tables `inspect --stats` prints; `red` colours a failed check (typer.style in the CLI)."""
    lines = [f"stats     {result['samples']} of {result['of_samples']} samples × {result['views']} views "
             f"({result['storage']}), seed {result['seed']}", "",
             f"{'teacher':<16}{'tokens':>9}  {'norm min':>8}{'p1':>8}{'p50':>8}{'p99':>8}{'max':>8}"
             f"{'|mean|':>8}{'var':>9}{'zero':>8}{'satur.':>8}{'NaN ch.':>8}{'PCs 90/99/99.9 %':>19}"]
    for name, f in result["features"].items():
        if not f["tokens"]:
            lines.append(f"{name:<16}{'no readable chunk':>30}")
            continue
        n, fr, comp = f["norm"], f["fraction"], f["spectrum"]["components"]
        lines.append(f"{name:<16}{f['tokens']:>9}  {n['min']:>8.3g}{n['p1']:>8.3g}{n['p50']:>8.3g}{n['p99']:>8.3g}"
                     f"{n['max']:>8.3g}{float(np.abs(f['channel_mean']).mean()):>8.3g}"
                     f"{float(np.mean(f['channel_var'])):>9.3g}{fr['zero']:>8.2%}{fr['saturated']:>8.2%}"
                     f"{fr['nan_chunks']:>8.1%}{'/'.join(str(comp[str(t)]) for t in THRESHOLDS):>19}")
    lines += ["", "cross-view consistency: cosine of tokens at the same ground position in two stored views, "
              "against random token pairs",
              f"{'teacher':<16}{'token centres':<26}{'matched':>9}{'random':>9}{'gap':>9}{'pairs':>10}  verdict"]
    for name, c in result["consistency"].items():
        g = c["grid"]
        where = f"{g['method']} {g['offset']:g}+{g['stride']:g}j"
        if c["ok"] is None:
            lines.append(f"{name:<16}{where:<26}{'no overlapping positions (sample sizes unknown?)':>40}")
            continue
        verdict = "ok" if c["ok"] else red(f"NO GAP: the stored views do not line up with the features "
                                           f"(gap {c['gap']:.3f} < {GAP_MIN} or within 3 standard errors)")
        lines.append(f"{name:<16}{where:<26}{c['matched']['mean']:>9.3f}{c['random']['mean']:>9.3f}"
                     f"{c['gap']:>9.3f}{c['matched']['pairs']:>10}  {verdict}")
    ag = result["agreement"]
    if ag["cka"]:
        lines += ["", "teacher agreement: linear CKA on the same crop positions (1 = the same up to rotation and scale)"]
        lines += [f"  {pair.replace('|', ' vs '):<40}{_num(r['cka'])}  ({r['positions']} positions)"
                  for pair, r in ag["cka"].items()]
    sep = ag["separation"]
    classes = list(next(iter(sep.values()))["classes"]) if sep and next(iter(sep.values()))["classes"] else []
    if classes:
        lines += ["", f"class separation (Fisher-like: |mean of class − mean of rest|² / (spread of class + rest)), "
                      f"from the masks of {result['samples_with_mask']} samples",
                  f"{'teacher':<16}{'overall':>9}" + "".join(f"{c[:11]:>12}" for c in classes)]
        for name, s in sep.items():
            lines.append(f"{name:<16}{_num(s['overall']):>9}" + "".join(f"{_num(s['classes'][c]['ratio']):>12}"
                                                                       for c in classes))
    elif result["samples_with_mask"] == 0 and not result["masks_unread"]["samples"]:
        lines += ["", "class separation: no masks reachable (the dataset named in the cache is not at hand)"]
    lines += bound_lines(result["rate_bound"])
    if unread := result["masks_unread"]["samples"]:
        lines += ["", f"masks not read for {unread} of {result['samples']} samples, left out of the class separation "
                      f"(first: {result['masks_unread']['first']})"]
    return "\n".join(lines)


def inspect_stats(cache: FeatureCache, samples: int | None, seed: int, out: Path | None) -> tuple[dict, Path]:
    """`inspect --stats`: the statistics of a cache (its dataset's masks and sizes where the data is
    at hand), written as JSON to `out` (default beside the cache); returns (result, file)."""
    result = compute_stats(cache, cache_dataset(cache), samples, seed)
    return result, write_json(result, out or default_output(cache.url))
