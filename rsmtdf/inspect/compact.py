"""What each storage kind (`cache.storage`) costs and how close it comes to the least any coder
could spend: `inspect --estimate`'s bytes and read bandwidth per kind, `inspect --stats`'
rate–distortion bound from a cache's measured spectrum, and the report's picture of the token
cosines a cache recorded of its stored targets.

The bound: reverse water-filling over independent Gaussian components with the measured covariance
eigenvalues (`storage.gaussian_rate_bits`), at the error a token cosine `cos` allows, D =
(1 − cos²) · E|x|² per token (`storage.distortion_at`; E|x|² of the raw targets, their mean included,
which is stored once per teacher and costs a token nothing). It is the rate a transform coder that
knows the covariance needs at best; a Gaussian is the hardest source of a given covariance, so a
coder exploiting more than second-order structure could go below it, and one spending the error
unevenly across tokens (as a floor on every token's cosine asks) needs more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cache.format import TeacherLayout
from ..cache.storage import COSINE_EDGES, KINDS, Fidelity, Int4, Kind, Pca, distortion_at, gaussian_rate_bits
from ..errors import RsmtdfError
from ..models.student import TeacherSlot
from ..models.teachers import Teacher
from ..pipeline.resolve import Resolved, check_for_student
from .step import StepModel

DEFAULT_FLOOR = 0.99  # the token cosine the bound is taken at where a cache names no floor (issue #23's)
SHOWN = ("float16", "int8", "int4", "pca")
LABELS = {"float16": "float16", "int8": "int8 (per-token scale)", "int4": "int4 (groups of {g})",
          "pca": "pca (a quarter of float16)"}


def nominal_kind(name: str, dim: int, group: int = 16, teacher: str = "") -> Kind:
    """The kind `name` for `dim` channels (int4 in groups of `group`); pca with an unfitted basis of
    a fitted one's shape (the first C − 4 channels, all at 4 bits), whose bytes (C/2 per token) and
    decoding cost do not depend on the fit. Refused in one line where the kind cannot hold `dim`
    channels."""
    if name == "pca":
        if dim % 2 or dim < 8:
            raise RsmtdfError(f"teacher '{teacher}': pca storage needs an even number of channels ≥ 8, not {dim}")
        return Pca(np.zeros(dim, np.float32), np.eye(dim, dim - 4, dtype=np.float32), np.ones(dim - 4, np.float32), 0)
    kind = Int4(group) if name == "int4" else KINDS[name]()
    kind.check(teacher, dim)
    return kind


def view_bytes(name: str, layouts: list[TeacherLayout], group: int = 16) -> int:
    """Bytes of one (tile, view) of every teacher stored as kind `name`."""
    return int(sum(lay.tokens * nominal_kind(name, lay.dim, group, lay.name).bytes_per_token(lay.dim)
                   for lay in layouts))


def predicted_step(resolved: Resolved, teachers: list[Teacher]) -> dict:
    """The model step the recipe trains, predicted (`step.StepModel`); `step_s` None, with the
    reason, where its student cannot train with these teachers."""
    try:
        check_for_student(resolved.recipe, training=True)
    except RsmtdfError as exc:
        return {"step_s": None, "basis": f"not predicted: {exc}"}
    slots = [TeacherSlot(t.name, t.dim, t.grid, t.input_size) for t in teachers]
    return StepModel.of_recipe(resolved.recipe, len(resolved.dataset.classes.names), slots,
                               len(resolved.scaling.bands)).predicted()


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def storage_estimate(layouts: list[TeacherLayout], views: int, samples: int, storage: str, group: int,
                     step: dict, batch: int) -> list[str]:
    """`inspect --estimate`'s lines per kind: bytes per (tile, view), for every sample's views, and
    the reads one GPU makes per second at the predicted step (`step`: `inspect.step`), whose
    `batch` labeled + `batch` unlabeled samples each read one (tile, view)."""
    lines = [f"{'kinds at these teachers':<38}{'per (tile, view)':<26}{f'{samples:,} × {views} views':>16}"
             f"{'read per GPU':>14}"]
    for name in SHOWN:
        label = "  " + LABELS[name].format(g=group) + (" ← the recipe's" if name == storage else "")
        try:
            b = view_bytes(name, layouts, group)
        except RsmtdfError as exc:
            lines.append(f"{label:<38}not possible: {exc}")
            continue
        read = f"{2 * batch * b / step['step_s'] / 1e9:>9.2f} GB/s" if step["step_s"] else f"{'-':>14}"
        lines.append(f"{label:<38}{_mb(b) + f' ({b:,} B)':<26}{samples * views * b / 1e9:>13.1f} GB{read}")
    if storage == "auto":
        lines.append("  auto: each teacher's kind is chosen at extraction (the fewest bytes keeping min_cosine "
                     "on a probe)")
    lines.append(f"step      {step['step_s'] * 1e3:.1f} ms per GPU ({step['basis']}) for batch {batch} + {batch}: "
                 f"{2 * batch} (tile, view) targets read per step" if step["step_s"] else f"step      {step['basis']}")
    return lines


# ---- the rate–distortion bound -----------------------------------------------------------------

def rate_bound(variances: np.ndarray, mean: np.ndarray, channel_var: np.ndarray, cosine: float) -> dict:
    """Bits and bytes per token at token cosine `cosine` of tokens whose covariance has
    `variances` (eigenvalues) and whose channels have `mean` and `channel_var` (the module's bound)."""
    energy = float(np.sum(np.square(mean)) + np.sum(channel_var))
    distortion = distortion_at(cosine) * energy
    bits = gaussian_rate_bits(np.asarray(variances, np.float64), distortion)
    return {"cosine": cosine, "energy": energy, "distortion": distortion, "bits_per_token": bits,
            "bytes_per_token": bits / 8}


def token_bound(x: np.ndarray, cosine: float) -> dict:
    """`rate_bound` of (n, C) tokens from their own covariance."""
    x = x.astype(np.float64)
    values = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0, None)
    return rate_bound(values, x.mean(axis=0), x.var(axis=0), cosine)


def stats_bounds(features: dict, cache) -> dict:
    """Per teacher of `inspect --stats` (`features`: its `FeatureStats` results), the bound at the
    cache's floor (`[teachers] min_cosine`, else `DEFAULT_FLOOR`) beside each kind's bytes per
    token (int4 at the cache's group size, else 16), the cache's own kind marked."""
    ident = cache.identity
    options = getattr(ident, "storage_options", None)  # recorded by caches with the compact kinds
    cosine = (options.min_cosine if options is not None else 0.0) or DEFAULT_FLOOR
    group = (options.group_size if options is not None else None) or 16
    stored = {n: s.get("kind") for n, s in getattr(cache, "stored", {}).items()}  # each teacher's kind, where recorded
    out = {"cosine": cosine, "error_share": distortion_at(cosine), "group_size": group, "teachers": {}}
    for t in (t.record() for t in ident.teachers):
        f = features[t["name"]]
        if not f["tokens"]:
            continue
        b = rate_bound(f["spectrum"]["variances"], f["channel_mean"], f["channel_var"], cosine)
        dim, tokens = int(t["dim"]), int(t["grid"]) ** 2
        kinds = {}
        for name in SHOWN:
            try:
                kinds[name] = nominal_kind(name, dim, group, t["name"]).bytes_per_token(dim)
            except RsmtdfError:
                kinds[name] = None
        out["teachers"][t["name"]] = {**b, "tokens_per_view": tokens, "bytes_per_view": b["bytes_per_token"] * tokens,
                                      "kinds": kinds, "stored": stored.get(t["name"], ident.storage)}
    return out


def bound_lines(bound: dict) -> list[str]:
    """The bound's table in `inspect --stats`' text."""
    g = bound["group_size"]
    lines = ["", f"rate–distortion bound at token cosine {bound['cosine']:g} (error {bound['error_share']:.2%} of the "
                 f"targets' energy; independent Gaussian components of the measured spectrum, the mean free) beside "
                 f"each kind: bytes per token (× the bound; * the cache's own)",
             f"{'teacher':<16}{'bound/token':>12}{'per view':>11}" + "".join(
                 f"{n if n != 'int4' else f'int4 g{g}':>17}" for n in SHOWN)]
    for name, t in bound["teachers"].items():
        cells = []
        for kind in SHOWN:
            b, mark = t["kinds"][kind], "*" if kind == t["stored"] else " "
            cell = "-" if b is None else f"{b:.0f} ({b / max(t['bytes_per_token'], 1e-9):.1f}×){mark}"
            cells.append(f"{cell:>17}")
        lines.append(f"{name:<16}{t['bytes_per_token']:>10.1f} B{t['bytes_per_view'] / 1e3:>8.1f} kB" + "".join(cells))
    return lines


# ---- the stored targets' token cosines -----------------------------------------------------------

def stored_fidelity(cache) -> dict[str, Fidelity | None]:
    """Per teacher, the fidelity a cache recorded of its stored targets as each shard was written
    (`FeatureCache.fidelity`); None where it records none (caches from before) or none yet."""
    out: dict[str, Fidelity | None] = {}
    for t in cache.identity.teachers:
        recorded = hasattr(cache, "fidelity") and f"fidelity/{t.name}" in cache.group
        fid = cache.fidelity(t.name) if recorded else None
        out[t.name] = fid if fid is not None and fid.tokens else None
    return out


def share_below(f: Fidelity) -> tuple[np.ndarray, np.ndarray]:
    """The histogram's bin edges below 1 (ascending) and the share of `f`'s tokens whose cosine is
    below each: exact at the edges (bins of 1e-4 above 0.9, 1e-2 below)."""
    below = np.concatenate([[0], np.cumsum(f.histogram)[:-1]]) / max(f.tokens, 1)
    return COSINE_EDGES[:-1], below


def fidelity_figure(fidelities: dict[str, Fidelity], path: Path, floor: float | None = None) -> Path:
    """The share of tokens whose cosine to the full-precision target is below c, against c, per
    teacher (log axes on 1 − c and on the share, so 0.999 and 0.99 are as far apart as 0.99 and 0.9),
    from each `Fidelity`'s histogram; the dotted lines: 1 % of tokens (where a curve crosses it is
    the 1st percentile) and the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lowest = 1.0
    for name, f in fidelities.items():
        edges, below = share_below(f)
        gap = 1 - edges  # the last bin (cosine ≥ 0.9999) is never below an edge: 1e-4 is the axis' end
        lowest = min(lowest, 1 / max(f.tokens, 1))
        shown = below > 0
        label = f"{name}: mean {f.mean_cosine:.4f}, p01 {f.percentile(1):.4f}"
        if shown.any():
            ax.plot(gap[shown], below[shown], label=label)
        else:
            ax.plot([], [], label=label + " (every token ≥ 0.9999)")
    ax.axhline(0.01, ls=":", c="grey", lw=0.8)
    if floor:
        ax.axvline(1 - floor, ls=":", c="tab:red", lw=0.8)
    ticks = [1e-4, 1e-3, 1e-2, 1e-1, 1]
    ax.set(xscale="log", yscale="log", xlim=(2, 1e-4), ylim=(lowest / 2, 1.5), xticks=ticks,
           xlabel="token cosine c of stored to full-precision target", ylabel="share of tokens below c",
           title="stored targets: token cosines")
    ax.set_xticklabels([f"{1 - t:g}" for t in ticks])
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
