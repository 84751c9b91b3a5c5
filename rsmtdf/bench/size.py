"""`bench size`: bytes per (sample, view) and cosine to float32 for each storage, on real features."""

from __future__ import annotations

import numpy as np
import torch

from ..cache.store import FeatureCache
from ..data.datasets import open_dataset
from ..data.splits import make_splits
from ..models.teachers import Teacher, teacher_config
from ..pipeline.extract import ViewSource, extract, run_teachers
from ..pipeline.resolve import resolve
from .common import LOVEDA_SAMPLE, Context, generated_dataset, recipe_at


def bench_size(ctx: Context) -> dict:
    """Bytes per (sample, view) and cosine to float32, from real teacher features written by extract()."""
    s = ctx.sizes
    root = ctx.workdir / "size"
    if LOVEDA_SAMPLE.is_dir():
        data, source_name = LOVEDA_SAMPLE, f"real LoveDA sample ({LOVEDA_SAMPLE})"
        ds = open_dataset("loveda", data)
        make_splits(ds, root / "splits")
        splits = root / "splits"
    else:
        (ds, splits), data = generated_dataset(root, 2, 1024), root / "data"
        source_name = "generated scenes (rsmtdf.synthetic)"
    teacher = Teacher(teacher_config("effnet_lite0"), pretrained=True).to(ctx.device)
    recipes = {storage: recipe_at(data, splits, {"effnet_lite0": None}, s.size_views, s.size_crop,
                                  **{"teachers.storage": storage}) for storage in ("float16", "int8")}
    ids = ds.ids_in("train")
    src = ViewSource(ds, [ds.index(i) for i in ids], recipes["float16"].view_spec())
    crops = torch.cat([src[j][2] for j in range(len(ids))])
    ref = run_teachers([teacher], crops, 8, ctx.device, len(ids), s.size_views)[teacher.name]
    per = ref.shape[2] * ref.shape[3]  # values per (sample, view)
    count = ref.shape[0] * ref.shape[1]

    def cosine(x: np.ndarray) -> dict:
        a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), x.reshape(-1, ref.shape[-1]).astype(np.float64)
        c = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        return {"mean": float(c.mean()), "min": float(c.min())}

    rows = {"float32": {"bytes_per_sample": 4.0 * per, "cosine": cosine(ref)},
            "float16": {"bytes_per_sample": 2.0 * per, "cosine": cosine(ref.astype(np.float16))}}
    for storage, label in (("float16", "float16+default codec"), ("int8", "int8+scale (compressed)")):
        out = root / f"cache-{storage}"
        # one full shard: a real cache has many full shards, so no shard index sized for absent samples
        extract(resolve(recipes[storage]), [teacher], str(out), batch_size=8, device=ctx.device,
                shard_samples=len(ids), progress=False)
        cache = FeatureCache.open(str(out))
        reader = cache.reader()
        back = np.stack([np.stack([reader.read(i, a)[teacher.name] for a in range(s.size_views)]) for i in range(len(ids))])
        rows[label] = {"bytes_per_sample": cache.bytes_stored(teacher.name) / count, "cosine": cosine(back)}
    for r in rows.values():
        r["ratio_to_float32"] = r["bytes_per_sample"] / rows["float32"]["bytes_per_sample"]
    int8 = rows["int8+scale (compressed)"]

    def absolute(key: str) -> str:
        return (f"{rows[key]['bytes_per_sample'] / 1e3:.1f} kB vs {rows['float32']['bytes_per_sample'] / 1e3:.1f} kB "
                f"per sample, cosine {rows[key]['cosine']['mean']:.5f} (min {rows[key]['cosine']['min']:.5f})")

    return {"sizes": {"teacher": "effnet_lite0 (real weights)", "data": source_name, "samples": count,
                      "tokens": ref.shape[2], "channels": ref.shape[3], "crop": s.size_crop},
            "rows": rows,
            "ratios": {"float16/float32": {"value": rows["float16"]["ratio_to_float32"], "goal": "0.5",
                                           "absolute": absolute("float16")},
                       "float16+codec/float32": {"value": rows["float16+default codec"]["ratio_to_float32"], "goal": "-",
                                                      "absolute": absolute("float16+default codec")},
                       "int8/float32": {"value": int8["ratio_to_float32"], "goal": "<= 0.27 at cosine >= 0.999",
                                        "cosine": int8["cosine"]["mean"], "absolute": absolute("int8+scale (compressed)")}}}
