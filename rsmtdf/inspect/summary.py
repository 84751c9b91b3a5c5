"""What `rsmtdf inspect` prints: a cache's contents and sizes, or the predicted size of one."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..cache.format import TeacherLayout, raw_bytes_per_sample
from ..cache.identity import Identity
from ..cache.store import FeatureCache
from ..cache.verify import verify_cache
from ..data.tilecache import sample_bytes
from ..errors import RsmtdfError
from ..models.teachers import Teacher
from ..pipeline.extract import extract, training_ids
from ..config.recipe import Recipe
from ..pipeline.resolve import Resolved, check_for_student, resolve
from ..transforms.views import ViewSpec
from ..utils.files import format_bytes
from .compact import predicted_step, storage_estimate
from .stats import format_stats, inspect_stats


def _views_line(v: ViewSpec) -> str:
    lo, hi = v.scale_range
    aug = ", ".join(x for x, on in (("hflip", v.hflip), ("rot90", v.rot90)) if on) or "no flips"
    return f"{v.count} per sample, crop {v.crop_size}, scale {lo}–{hi}, {aug}, seed {v.seed}"


def format_cache(cache: FeatureCache) -> str:
    """The inspect table: dataset, views, completeness, then one row per teacher with sizes."""
    a, ident = cache.attrs, cache.identity
    missing = cache.missing_shards()
    state = "complete" if a.get("complete") and not missing else \
        f"INCOMPLETE: {len(missing)} of {cache.num_shards} shards missing {missing[:20]}" if missing else \
        "all shards written, not finalized (re-run extract-features to finalize)"
    d = ident.dataset
    tiles = f", tiles {d.tile}² every {d.tile_stride} px" if d.tile else ""
    stats = ident.splits.stats_sha256
    stats = "" if stats in (None, "none") else f", band statistics sha256 {stats[:12]}"
    lines = [
        f"cache     {cache.url}",
        f"state     {state}",
        f"dataset   {d.name}: {d.num_samples} samples at {d.root} (ids sha256 {d.ids_sha256[:12]}){tiles}",
        f"classes   {len(d.classes.names)}: {', '.join(d.classes.names)}",
        f"input     {ident.input.describe() if ident.input else 'not recorded (a cache from before records)'}",
        f"splits    {ident.splits.dir} (sha256 {ident.splits.sha256[:12]}{stats})",
        f"views     {_views_line(ident.views)}",
        f"storage   {_storage_line(ident)}, {cache.num_shards} shards of {cache.shard_samples} samples",
        "",
        f"{'teacher':<16}{'model':<34}{'shape (N, A, L, C)':<26}{'stored':<9}{'raw':>10}{'on disk':>11}{'ratio':>7}",
    ]
    total_raw = total_disk = 0
    for t in ident.teachers:
        raw, disk = cache.bytes_raw(t.name), cache.bytes_stored(t.name)
        total_raw, total_disk = total_raw + raw, total_disk + disk
        model = f"{t.model} L{t.layer} @{t.input_size}"
        shape = (cache.num_samples, cache.num_views, t.grid ** 2, t.dim)
        lines.append(f"{t.name:<16}{model:<34}{str(shape):<26}{cache.stored[t.name]['kind']:<9}{format_bytes(raw):>10}"
                     f"{format_bytes(disk):>11}{raw / max(disk, 1):>6.2f}x")
    lines.append(f"{'total':<85}{format_bytes(total_raw):>10}{format_bytes(total_disk):>11}"
                 f"{total_raw / max(total_disk, 1):>6.2f}x")
    return "\n".join(lines + ["", *fidelity_lines(cache)])


def _storage_line(ident: Identity) -> str:
    """The storage request in words: its kind and the options that apply to it."""
    o = ident.storage_options
    if o is None:
        return str(ident.storage)
    said = [f"groups of {o.group_size}"] if o.group_size else []
    said += [f"probe of {o.probe_samples} samples"] if o.probe_samples else []
    floor = o.floor(ident.storage)
    said += [f"floor {floor:g} on each shard's mean token cosine" + ("" if o.min_cosine else " (auto's default)")] \
        if floor else []
    return f"{ident.storage} ({', '.join(said)})" if said else str(ident.storage)


def fidelity_lines(cache: FeatureCache) -> list[str]:
    """Per teacher, the kind it is stored as and what that keeps of the full-precision targets,
    measured when each shard was written (token cosine: mean, 1st percentile, min; the error's
    share of the targets' energy)."""
    written = int(cache.done_flags().sum())
    if not cache.measured:
        return ["fidelity  not recorded (a cache made before rsmtdf measured what its storage keeps)"]
    if not written:
        return ["fidelity  not measured yet (no shard written)"]
    lines = [f"{'stored as':<16}{'kind':<44}{'token cosine: mean':>19}{'p01':>8}{'min':>8}{'error energy':>14}"]
    for name, kind in cache.kinds.items():
        f = cache.fidelity(name)
        lines.append(f"{name:<16}{kind.describe():<44}{f.mean_cosine:>19.5f}{f.percentile(1):>8.4f}"
                     f"{f.cosine_min:>8.4f}{f.error / max(f.energy, 1e-30):>14.2e}")
    lines.append(f"          measured against the full-precision targets as each shard was written ({written} of "
                 f"{cache.num_shards} shards)")
    return lines


def estimate_size(resolved: Resolved, teachers: list[Teacher], probe: int = 4) -> str:
    """Predict a cache's size: exact raw bytes, and bytes on disk from a real extraction of `probe`
    samples (compression depends on the features, so it is measured, not guessed)."""
    recipe, spec = resolved.recipe, resolved.recipe.view_spec()
    ids = training_ids(resolved.dataset)
    n, storage = len(ids), recipe.teachers.storage
    per_sample_raw = raw_bytes_per_sample([TeacherLayout(t.name, t.num_tokens, t.dim) for t in teachers], spec.count,
                                          storage, recipe.teachers.group_size)
    k = max(1, min(probe, n))
    probed = resolved.restricted([ids[int(j)] for j in np.linspace(0, n - 1, k).round()])  # spread over domains
    with tempfile.TemporaryDirectory() as tmp:
        extract(probed, teachers, str(Path(tmp) / "probe"), shard_samples=k, num_workers=0, progress=False,
                device="cpu")
        probe_cache = FeatureCache.open(str(Path(tmp) / "probe"))
        per_sample_disk = sum(probe_cache.bytes_stored(t.name) for t in teachers) / k
    tile = sum(sample_bytes(probed.dataset.load(j)) for j in range(k)) / k
    lines = [f"estimate  {recipe.data.dataset}: {n} training samples × {spec.count} views, "
             f"crop {spec.crop_size}, {storage}"]
    for t in teachers:
        lines.append(f"  {t.name:<16} {t.num_tokens} tokens × {t.dim} per view")
    lines.append(f"raw       {format_bytes(per_sample_raw * n)}  ({format_bytes(per_sample_raw)} per sample)")
    lines.append(f"on disk   {format_bytes(per_sample_disk * n)}  (compression measured on {k} samples: "
                 f"{per_sample_raw / per_sample_disk:.2f}x)")
    lines.append(f"decoded   {format_bytes(tile * n)}  (every training tile decoded in memory, per loader worker; "
                 f"[train] decoded_cache_mb = {recipe.train.decoded_cache_mb} MB each)")
    lines += storage_estimate([TeacherLayout(t.name, t.num_tokens, t.dim) for t in teachers], spec.count, n, storage,
                              getattr(recipe.teachers, "group_size", 16), predicted_step(resolved, teachers),
                              recipe.train.batch_size)
    return "\n".join(lines)


def estimate_recipe(recipe: Recipe, teacher_weights: dict[str, str] | None = None, probe: int = 4) -> str:
    """`inspect --estimate`: `estimate_size` of the cache a recipe would make."""
    resolved = resolve(check_for_student(recipe, training=False))
    return estimate_size(resolved, resolved.teachers(teacher_weights), probe)


def inspect_cache(url: str, verify: bool = False, stats: bool = False, samples: int | None = None,
                  seed: int = 0, stats_out: Path | None = None, echo: Callable[[str], None] = print,
                  red: Callable[[str], str] = lambda text: text) -> None:
    """`rsmtdf inspect`: what the cache holds (`format_cache`); with `verify`, every chunk read and
    the damaged shards named (one error line after them); with `stats`, the statistics printed and
    written as JSON (`inspect_stats`)."""
    cache = FeatureCache.open(url)
    if verify:
        report = verify_cache(cache)
        for line in report.lines():
            echo(line)
        if problem := report.problem():
            raise RsmtdfError(problem)
        return echo(report.summary())
    echo(format_cache(cache))
    if stats:
        result, out = inspect_stats(cache, samples, seed, stats_out)
        echo("\n" + format_stats(result, red=red))
        echo(f"inspected {result['samples']} samples × {result['views']} views in {result['seconds']:.1f} s; "
             f"wrote {out}")
