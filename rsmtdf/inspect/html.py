"""`rsmtdf report CACHE -o DIR`: one static HTML page (no server, no network) with the cache's
summary, its statistics as matplotlib figures, and a gallery of samples: each stored view beside
its teachers' PCA pictures (one basis per teacher fitted over the whole gallery, so a colour means
the same in every sample) and, for tiles with a mask, the mask. Images are PNG files beside the page.
"""

from __future__ import annotations

import html
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..cache.store import FeatureCache
from ..data.datasets import SegmentationDataset
from ..errors import RsmtdfError
from ..pipeline.resolve import cache_dataset
from ..transforms.views import apply_view
from .compact import fidelity_figure, stored_fidelity
from .show import choose_samples, pca_rgb, view_images
from .stats import THRESHOLDS, compute_stats, format_stats, write_json
from .summary import format_cache

GENERATOR = '<meta name="generator" content="rsmtdf report">'  # marks a folder as ours to replace
CELL = 128  # gallery picture size in pixels

HOW_TO_READ = {
    "norms.png": "Token norms. Each teacher's curve should be one smooth hump; a spike at 0 means empty tokens "
                 "(unwritten or black input), a long right tail outliers that dominate an MSE loss.",
    "channels.png": "Left: mean of each channel. Right: channel variances, largest first (log scale). A few "
                    "channels far above the rest carry most of the distillation loss; flat zeros are dead channels.",
    "spectrum.png": "Cumulative variance explained by the leading principal components. Where a curve crosses the "
                    "dotted 90 / 99 / 99.9 % lines is how many dimensions the targets really use: a cache whose 99 % "
                    "lies at a small k would lose little if stored at k dimensions.",
    "consistency.png": "Cosine similarity of tokens that lie on the same ground position in two stored views (blue), "
                       "against random token pairs of the same views (grey). Blue must sit clearly right of grey: "
                       "if they overlap, the stored views do not describe what the teachers saw (red title).",
    "fidelity.png": "Token cosines of the stored targets to the full-precision ones, as each shard was written: the "
                    "share of tokens below each cosine (log scales). Where a curve crosses the grey 1 % line is its "
                    "1st percentile; the red line is the floor (the cache's min_cosine, else 0.99). A curve that "
                    "rises early holds tokens the storage kind keeps badly.",
    "agreement.png": "Left: linear CKA between teachers on the same crop positions (1: the same features up to a "
                     "rotation and scale; low: the teachers see different things). Right: per-class separation "
                     "(|class mean − rest mean|² over their spread) from the masks: which teacher carries which class.",
}


def check_target(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier report, before any work starts."""
    if out.exists() and not out.is_dir():
        raise RsmtdfError(f"{out}: exists and is not a folder (nothing there was changed)")
    if out.is_dir() and any(out.iterdir()):
        page = out / "index.html"
        if not page.is_file() or GENERATOR not in page.read_text(errors="replace"):
            raise RsmtdfError(f"{out}: exists and is not an rsmtdf report (nothing there was changed); "
                              "choose another -o")


def report_cache(url: str, out: Path, gallery: int = 6, samples: int | None = None, seed: int = 0) -> str:
    """`rsmtdf report`: the options checked, the report of the cache at `url` written to `out`, and
    the line that says what it holds."""
    if gallery < 0 or (samples is not None and samples < 1):
        raise RsmtdfError(f"--gallery {gallery} --samples {samples}: give a gallery of 0 or more and at least 1 sample")
    check_target(out)
    cache = FeatureCache.open(url)
    done = write_report(cache, cache_dataset(cache), out, gallery, samples, seed)
    return (f"report of {done['samples']} samples, gallery of {gallery} ({done['gallery']} views), "
            f"{done['images']} images: open {out / 'index.html'}")


def write_report(cache: FeatureCache, dataset: SegmentationDataset | None, out: Path, gallery: int = 6,
                 samples: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Build the report in a folder beside `out`, then put it in place whole. Returns what it holds."""
    out = Path(out)
    check_target(out)
    stats = compute_stats(cache, dataset, samples, seed, progress)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    (tmp / "gallery").mkdir(parents=True)
    try:
        figures = plot_stats(stats, tmp)
        if fidelities := {n: f for n, f in stored_fidelity(cache).items() if f is not None}:
            figures.append(fidelity_figure(fidelities, tmp / "fidelity.png", stats["rate_bound"]["cosine"]).name)
        rows = write_gallery(cache, dataset, tmp / "gallery", gallery, seed, progress)
        write_json(stats, tmp / "stats.json")
        (tmp / "index.html").write_text(page(cache, stats, figures, rows))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    images = sum(1 for _ in out.rglob("*.png"))
    return {"out": out, "images": images, "samples": stats["samples"], "gallery": len(rows), "stats": stats}


# ---- figures -------------------------------------------------------------------------------------


def plot_stats(stats: dict, folder: Path) -> list[str]:
    """Write the figures of HOW_TO_READ that the statistics support; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = {n: f for n, f in stats["features"].items() if f["tokens"]}
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=80)
        plt.close(fig)
        written.append(name)

    if feats:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, f in feats.items():
            h = f["norm_hist"]
            ax.stairs(h["counts"] / np.sum(h["counts"]), h["edges"], label=name)
        ax.set(xlabel="token L2 norm", ylabel="fraction of tokens", title="token norms")
        ax.legend()
        save(fig, "norms.png")

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        for name, f in feats.items():
            axes[0].plot(f["channel_mean"], lw=0.8, label=name)
            axes[1].plot(np.sort(f["channel_var"])[::-1], label=name)
        axes[0].set(xlabel="channel", ylabel="mean", title="per-channel mean")
        axes[1].set(xlabel="channels, by variance", ylabel="variance", yscale="log", title="per-channel variance")
        axes[1].legend()
        save(fig, "channels.png")

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, f in feats.items():
            explained = f["spectrum"]["explained"]
            ax.plot(np.arange(1, len(explained) + 1), explained, label=name)
        for t in THRESHOLDS:
            ax.axhline(t, ls=":", c="grey", lw=0.8)
        ax.set(xscale="log", xlabel="principal components", ylabel="variance explained", title="variance spectrum")
        ax.legend()
        save(fig, "spectrum.png")

    cons = {n: c for n, c in stats["consistency"].items() if c["ok"] is not None}
    if cons:
        fig, axes = plt.subplots(1, len(cons), figsize=(4.5 * len(cons), 3.2), squeeze=False)
        edges = np.linspace(-1, 1, len(next(iter(cons.values()))["matched"]["hist"]) + 1)
        for ax, (name, c) in zip(axes[0], cons.items()):
            for key, colour in (("random", "grey"), ("matched", "tab:blue")):
                h = np.asarray(c[key]["hist"], float)
                ax.stairs(h / max(h.sum(), 1), edges, fill=key == "random", alpha=0.6, color=colour, label=key)
            ax.set_title(f"{name}: gap {c['gap']:.3f}", color="black" if c["ok"] else "red")
            ax.set(xlabel="cosine similarity")
            ax.legend()
        save(fig, "consistency.png")

    sep = {n: s for n, s in stats["agreement"]["separation"].items() if s["overall"] is not None}
    if stats["agreement"]["cka"] or sep:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        names = list(stats["features"])
        m = np.eye(len(names))
        for pair, r in stats["agreement"]["cka"].items():
            p, q = (names.index(x) for x in pair.split("|"))
            m[p, q] = m[q, p] = r["cka"] if r["cka"] is not None else np.nan
        im = axes[0].imshow(m, vmin=0, vmax=1, cmap="viridis")
        axes[0].set(xticks=range(len(names)), yticks=range(len(names)), title="linear CKA")
        axes[0].set_xticklabels(names, rotation=30, ha="right")
        axes[0].set_yticklabels(names)
        for (p, q), v in np.ndenumerate(m):
            axes[0].text(q, p, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=axes[0])
        if sep:
            classes = list(next(iter(sep.values()))["classes"])
            width = 0.8 / len(sep)
            for k, (name, s) in enumerate(sep.items()):
                values = [s["classes"][c]["ratio"] or 0.0 for c in classes]
                axes[1].bar(np.arange(len(classes)) + k * width, values, width, label=name)
            axes[1].set_xticks(np.arange(len(classes)) + 0.4 - width / 2)
            axes[1].set_xticklabels(classes, rotation=30, ha="right")
            axes[1].set(title="class separation (Fisher-like)")
            axes[1].legend()
        else:
            axes[1].set_axis_off()
            axes[1].text(0.5, 0.5, "no masks at hand", ha="center")
        save(fig, "agreement.png")
    return written


# ---- gallery -------------------------------------------------------------------------------------


def write_gallery(cache: FeatureCache, dataset: SegmentationDataset | None, folder: Path, count: int, seed: int,
                  progress: bool = True) -> list[dict]:
    """PNG files of `count` random samples; one row per (sample, view) naming its pictures."""
    if count < 1:
        return []
    ids = choose_samples(cache, random=count, seed=seed)
    index = {sid: k for k, sid in enumerate(cache.ids)}
    teachers = [(t.name, t.grid) for t in cache.identity.teachers]
    reader, crop = cache.reader(), cache.identity.views.crop_size
    colours = cache.identity.dataset.classes.colours()
    rows, feats = [], {name: [] for name, _ in teachers}
    for s, sid in enumerate(tqdm(ids, desc="gallery", unit="sample", disable=not progress, dynamic_ncols=True)):
        i = index[sid]
        views = cache.views_of(i)
        mask = _mask(dataset, sid)
        for a, (view, image) in enumerate(zip(views, view_images(cache, i, sid, dataset, CELL))):
            stem = f"s{s}_v{a}"
            image.save(folder / f"{stem}_view.png")
            row = {"sample": sid, "view": a, "geometry": view, "view_png": f"gallery/{stem}_view.png", "teachers": []}
            if mask is not None:
                Image.fromarray(colours[apply_view(mask, view, crop)]).resize((CELL, CELL), Image.Resampling.NEAREST) \
                    .save(folder / f"{stem}_mask.png")
                row["mask_png"] = f"gallery/{stem}_mask.png"
            for name, x in reader.read(i, a).items():
                feats[name].append(x)
            rows.append(row)
    for t, (name, grid) in enumerate(teachers):  # one PCA basis per teacher over the whole gallery
        f = max(1, CELL // grid)
        for row, rgb in zip(rows, pca_rgb(np.stack(feats[name]), grid)):
            png = f"gallery/s{ids.index(row['sample'])}_v{row['view']}_t{t}.png"
            Image.fromarray(rgb).resize((grid * f, grid * f), Image.Resampling.NEAREST).save(folder.parent / png)
            row["teachers"].append(png)
    return rows


def _mask(dataset: SegmentationDataset | None, sample_id: str) -> np.ndarray | None:
    if dataset is None:
        return None
    try:
        return dataset.load(dataset.index(sample_id)).mask
    except RsmtdfError:
        return None


# ---- the page ------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.bad { color: #c00; font-weight: bold; }
.figures { display: flex; flex-wrap: wrap; gap: 12px 24px; }
figure { margin: 8px 0; max-width: 560px; } figure img { max-width: 100%; } figcaption { color: #555; }
table.gallery { border-collapse: collapse; } table.gallery td, table.gallery th { padding: 3px 6px; text-align: center; }
table.gallery tr.first td { border-top: 1px solid #ccc; } .geom { font-size: 11px; color: #666; text-align: left; }
.swatch { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 10px; vertical-align: middle; }
"""


def page(cache: FeatureCache, stats: dict, figures: list[str], rows: list[dict]) -> str:
    """The HTML text: everything it shows is in the folder beside it."""
    esc = html.escape
    table = esc(format_stats(stats, red=lambda s: "\x00" + s + "\x01")).replace("\x00", '<span class="bad">') \
        .replace("\x01", "</span>")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{GENERATOR}",
             f"<title>rsmtdf report: {esc(cache.url)}</title><style>{STYLE}</style></head><body>",
             f"<h1>Feature cache {esc(cache.url)}</h1>", "<h2>Summary</h2>", f"<pre>{esc(format_cache(cache))}</pre>",
             "<h2>Statistics</h2>", f"<pre>{table}</pre>", '<p>The same numbers: <a href="stats.json">stats.json</a>.</p>']
    parts.append('<div class="figures">')
    for name in figures:
        parts.append(f'<figure><img src="{name}" alt="{esc(name)}"><figcaption>{esc(HOW_TO_READ[name])}'
                     "</figcaption></figure>")
    parts.append("</div>")
    if "fidelity.png" not in figures:
        parts.append("<p>Token cosines of the stored targets: this cache records none (made before rsmtdf measured "
                     "what its storage keeps).</p>")
    if rows:
        teachers = [t.name for t in cache.identity.teachers]
        has_mask = any("mask_png" in r for r in rows)
        classes = cache.identity.class_names
        colours = cache.identity.dataset.classes.colours()
        parts += ["<h2>Gallery</h2>",
                  "<p>Each stored view as the teachers saw it, then each teacher's features as colours: the first "
                  "three principal components of that teacher, fitted once over every picture here, so equal colours "
                  "mean similar features across samples. Objects should keep their colour from view to view.</p>"]
        if has_mask:
            parts.append("<p>Mask: " + "".join(f'<span class="swatch" style="background: rgb{tuple(int(c) for c in colours[k])}">'
                                               f"</span>{esc(n)}" for k, n in enumerate(classes))
                         + '<span class="swatch" style="background: #000"></span>ignore / padding</p>')
        head = "".join(f"<th>{esc(t)}</th>" for t in ["sample / view", "view", *teachers] + (["mask"] if has_mask else []))
        parts.append(f'<table class="gallery"><tr>{head}</tr>')
        for r in rows:
            v = r["geometry"]
            geom = (f"{esc(r['sample'])}<br>view {r['view']}: scale {v.scale:.3g}, at ({v.y0}, {v.x0})"
                    f"{', flipped' if v.hflip else ''}{f', rot90×{v.rot90}' if v.rot90 else ''}")
            cells = [f'<td class="geom">{geom}</td>', f'<td><img src="{r["view_png"]}" alt="view"></td>']
            cells += [f'<td><img src="{p}" alt="{esc(t)} PCA"></td>' for t, p in zip(teachers, r["teachers"])]
            if has_mask:
                cells.append(f'<td><img src="{r["mask_png"]}" alt="mask"></td>' if "mask_png" in r else "<td>-</td>")
            parts.append(f'<tr class="{"first" if r["view"] == 0 else ""}">{"".join(cells)}</tr>')
        parts.append("</table>")
    parts.append(f"<p><small>{stats['samples']} samples inspected, seed {stats['seed']}.</small></p></body></html>")
    return "\n".join(parts)
