"""`bench extract`: the real `extract()` vs the teachers' bare forward over the same crops."""

from __future__ import annotations

import shutil

import torch

from ..pipeline.extract import ViewSource, extract, run_teachers
from ..pipeline.resolve import resolve
from .common import Context, generated_dataset, median_time, recipe_at


def bench_extract(ctx: Context) -> dict:
    """The real extract() vs the teachers' bare forward over the same crops at the same batch size."""
    s = ctx.sizes
    root = ctx.workdir / "extract"
    ds, splits = generated_dataset(root, s.extract_scenes, s.scene_size)
    resolved = resolve(recipe_at(root / "data", splits, dict(s.teachers), s.extract_views, s.crop))
    spec = resolved.recipe.view_spec()
    teachers = ctx.teachers()
    ids = ds.ids_in("train")
    source = ViewSource(ds, [ds.index(i) for i in ids], spec, resolved.scaling.teachers())
    crops = torch.cat([source[j][2] for j in range(len(ids))])
    out = root / "cache"

    def run_extract():
        shutil.rmtree(out, ignore_errors=True)
        # several shards, as in any real cache, so shard writes overlap the teachers' compute
        extract(resolved, teachers, str(out), shard_samples=max(1, len(ids) // 4), batch_size=s.extract_batch,
                device=ctx.device, progress=False)

    def run_bare():
        run_teachers(teachers, crops, s.extract_batch, ctx.device, len(ids), s.extract_views)

    times = {"extract": median_time(run_extract, s.repeats, s.warmup), "bare_forward": median_time(run_bare, s.repeats, s.warmup)}
    shutil.rmtree(out, ignore_errors=True)
    ratio = times["extract"]["median_s"] / times["bare_forward"]["median_s"]
    return {"sizes": {"images": len(ids), "views": s.extract_views, "crops": len(crops), "crop": s.crop,
                      "batch": s.extract_batch, "teachers": s.teachers, "workers": 2},
            "times": times, "ratios": {"extract/bare_forward": {
                "value": ratio, "goal": "<= 1.10",
                "absolute": f"{times['extract']['median_s']:.3f} s vs {times['bare_forward']['median_s']:.3f} s "
                            f"for {len(crops)} crops"}}}
