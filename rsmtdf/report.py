"""What `rsmtdf inspect` prints: a cache's contents and sizes, or the predicted size of one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .cache import FeatureCache, TeacherLayout, raw_bytes_per_sample
from .data import described_classes
from .scaling import BandScaling


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _views_line(v: dict) -> str:
    lo, hi = v["scale_range"]
    aug = ", ".join(x for x, on in (("hflip", v["hflip"]), ("rot90", v["rot90"])) if on) or "no flips"
    return f"{v['count']} per sample, crop {v['crop_size']}, scale {lo}–{hi}, {aug}, seed {v['seed']}"


def format_cache(cache: FeatureCache) -> str:
    """The inspect table: dataset, views, completeness, then one row per teacher with sizes."""
    a = cache.attrs
    missing = cache.missing_shards()
    state = "complete" if a.get("complete") and not missing else \
        f"INCOMPLETE: {len(missing)} of {cache.num_shards} shards missing {missing[:20]}" if missing else \
        "all shards written, not finalized (re-run extract-features to finalize)"
    d = a["dataset"]
    classes = described_classes(d)
    tiles = f", tiles {d['tile']}² every {d.get('tile_stride', d['tile'])} px" if d.get("tile") else ""
    lines = [
        f"cache     {cache.url}",
        f"state     {state}",
        f"dataset   {d['name']}: {d['num_samples']} samples at {d['root']} (ids sha256 {d['ids_sha256'][:12]}){tiles}",
        f"classes   {len(classes.names)}: {', '.join(classes.names)}",
        f"input     {BandScaling.from_record(a['input']).describe() if 'input' in a else 'not recorded (a cache from before records)'}",
        f"splits    {a['splits']['dir']} (sha256 {a['splits']['sha256'][:12]})",
        f"views     {_views_line(a['views'])}",
        f"storage   {a['storage']}, {cache.num_shards} shards of {cache.shard_samples} samples",
        "",
        f"{'teacher':<16}{'model':<34}{'shape (N, A, L, C)':<26}{'dtype':<9}{'raw':>10}{'on disk':>11}{'ratio':>7}",
    ]
    total_raw = total_disk = 0
    for t in a["teachers"]:
        arr = cache.group[f"teachers/{t['name']}"]
        raw = arr.nbytes + (cache.group[f"scales/{t['name']}"].nbytes if a["storage"] == "int8" else 0)
        disk = cache.bytes_stored(t["name"])
        total_raw, total_disk = total_raw + raw, total_disk + disk
        model = f"{t['model']} L{t['layer']} @{t['input_size']}"
        lines.append(f"{t['name']:<16}{model:<34}{str(arr.shape):<26}{a['storage']:<9}{_bytes(raw):>10}"
                     f"{_bytes(disk):>11}{raw / max(disk, 1):>6.2f}x")
    lines.append(f"{'total':<85}{_bytes(total_raw):>10}{_bytes(total_disk):>11}{total_raw / max(total_disk, 1):>6.2f}x")
    return "\n".join(lines)


def estimate_size(plan, probe: int = 4) -> str:
    """Predict a cache's size: exact raw bytes, and bytes on disk from a real extraction of `probe`
    samples (compression depends on the features, so it is measured, not guessed)."""
    from .extract import extract
    from .tilecache import sample_bytes

    dataset = plan.dataset()
    spec, teachers = plan.spec(), plan.teachers()
    n = len(dataset.ids_in("train"))
    storage = plan.recipe.teachers.storage
    per_sample_raw = raw_bytes_per_sample([TeacherLayout(t.name, t.num_tokens, t.dim) for t in teachers], spec.count,
                                          storage)
    k = max(1, min(probe, n))
    ids = dataset.ids_in("train")
    subset = dataset.subset([ids[int(j)] for j in np.linspace(0, n - 1, k).round()])  # spread over domains
    with tempfile.TemporaryDirectory() as tmp:
        extract(subset, plan.recipe.data.splits, spec, teachers, str(Path(tmp) / "probe"),
                shard_samples=k, num_workers=0, storage=storage, progress=False)
        probe_cache = FeatureCache.open(str(Path(tmp) / "probe"))
        per_sample_disk = sum(probe_cache.bytes_stored(t.name) for t in teachers) / k
    tile = sum(sample_bytes(subset.load(j)) for j in range(k)) / k
    lines = [f"estimate  {plan.recipe.data.dataset}: {n} training samples × {spec.count} views, "
             f"crop {spec.crop_size}, {storage}"]
    for t in teachers:
        lines.append(f"  {t.name:<16} {t.num_tokens} tokens × {t.dim} per view")
    lines.append(f"raw       {_bytes(per_sample_raw * n)}  ({_bytes(per_sample_raw)} per sample)")
    lines.append(f"on disk   {_bytes(per_sample_disk * n)}  (compression measured on {k} samples: "
                 f"{per_sample_raw / per_sample_disk:.2f}x)")
    lines.append(f"decoded   {_bytes(tile * n)}  (every training tile decoded in memory, per loader worker; "
                 f"[train] decoded_cache_mb = {plan.recipe.train.decoded_cache_mb} MB each)")
    return "\n".join(lines)

