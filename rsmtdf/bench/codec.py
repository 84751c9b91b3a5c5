"""`bench codec`: which codec the cache's feature chunks should use, by size and by read speed.

For each candidate (none, Blosc-lz4 and Blosc-zstd at several levels, each with no shuffle, byte
shuffle and bit shuffle; every one followed by the cache's crc32c) the same float16 targets are
written with the cache's chunk and shard layout and read back one chunk at a time in random order,
through zarr. Reported: size against the raw float16 bytes, and read MB/s of raw float16 per
process (CPU seconds, one thread, so a loaded machine slows it less than wall time). One more row
reads the uncompressed store as training does, straight from the shard file (`shardfile`).

Feature sets: real EfficientNet-Lite0 and -Lite1 features (real ImageNet weights) of the real
LoveDA sample when present (generated scenes otherwise), and random float16 tokens shaped like
DINOv2-B at 518 and CLIP-L at 224 (random tokens are the incompressible extreme).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from ..cache.format import checksummed, codec_name, default_compressor
from ..cache.shardfile import ShardFile
from ..data.datasets import open_dataset
from ..models.teachers import Teacher, teacher_config
from ..pipeline.extract import ViewSource, run_teachers
from ..transforms.views import ViewSpec
from ..utils.runtime import intra_op_threads
from .common import LOVEDA_SAMPLE, Context, generated_dataset


DIRECT = "none, read straight from the shard file (training's reader)"


def candidates(quick: bool = False) -> dict[str, BloscCodec | None]:
    """none, then Blosc-lz4 and -zstd at each level with each shuffle (`quick`: one of each kind)."""
    out: dict[str, BloscCodec | None] = {"none": None}
    for cname, levels in (("lz4", (5,)), ("zstd", (1, 3, 5))):
        for level in levels:
            for shuffle in ("noshuffle", "shuffle", "bitshuffle"):
                out[f"{cname}{level}-{shuffle}"] = BloscCodec(cname=cname, clevel=level, shuffle=shuffle)
    return {k: out[k] for k in ("none", "lz45-noshuffle", "zstd3-bitshuffle")} if quick else out


def real_features(ctx: Context) -> tuple[dict[str, np.ndarray], str]:
    """(N, A, L, C) float32 features of two real-weight EfficientNet-Lite teachers (Lite0 at 224,
    Lite1 at 240 px) over the `size_views` views of every training tile of the real LoveDA sample
    (generated scenes where it is absent), and where they come from."""
    s = ctx.sizes
    if LOVEDA_SAMPLE.is_dir():
        ds, source = open_dataset("loveda", LOVEDA_SAMPLE), f"real LoveDA sample ({LOVEDA_SAMPLE})"
    else:
        ds, _ = generated_dataset(ctx.workdir / "codec", 2, 1024)
        source = "generated scenes (rsmtdf.synthetic)"
    ids = ds.ids_in("train")
    out = {}
    for name in ("effnet_lite0", "effnet_lite1"):
        teacher = Teacher(teacher_config(name), pretrained=True).to(ctx.device)
        spec = ViewSpec(s.size_views, teacher.input_size, (0.5, 2.0), True, False, 0)
        src = ViewSource(ds, [ds.index(i) for i in ids], spec)
        crops = torch.cat([src[j][2] for j in range(len(ids))])
        f = run_teachers([teacher], crops, 8, ctx.device, len(ids), s.size_views)[teacher.name]
        out[f"{name} (real weights)"] = f.astype(np.float32)
    return out, source


def _random_features(ctx: Context) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"quick": {"dinov2_vitb14@518 (random)": (37, 48), "clip_vitl14@224 (random)": (16, 64)}}.get(
        ctx.sizes.name, {"dinov2_vitb14@518 (random)": (1369, 768), "clip_vitl14@224 (random)": (256, 1024)})
    return {k: rng.standard_normal((8, 2, *shape), dtype=np.float32).astype(np.float16) for k, shape in shapes.items()}


def measure(x: np.ndarray, codec: BloscCodec | None, path: str, passes: int = 2, direct: bool = False) -> dict:
    """Size ratio to raw float16 and read MB/s (CPU time, one thread) of `x` stored with `codec`,
    read through zarr or (`direct`, codec none only) straight from the shard file as training does."""

    n, a, L, C = x.shape
    group = zarr.open_group(path, mode="w", zarr_format=3)
    arr = group.create_array("t", shape=x.shape, chunks=(1, 1, L, C), shards=(n, a, L, C), dtype="float16",
                             compressors=checksummed(codec))
    arr[:] = x
    stored = sum(f.stat().st_size for f in (Path(path) / "t" / "c").rglob("*") if f.is_file())
    arr = zarr.open_group(path, mode="r")["t"]
    read = (lambda i, v, f=ShardFile.of(arr): f.read((i, v, 0, 0))) if direct else (lambda i, v: arr[i, v])
    pairs = [(i, v) for i in range(n) for v in range(a)]
    best = float("inf")
    for p in range(passes):  # the first pass also warms the page cache
        random.Random(p).shuffle(pairs)
        t0 = time.process_time()
        for i, v in pairs:
            read(i, v)
        best = min(best, time.process_time() - t0)
    return {"ratio": stored / x.nbytes, "read_mb_s": x.nbytes / 1e6 / max(best, 1e-9),
            "ms_per_chunk": 1e3 * best / len(pairs)}


def bench_codec(ctx: Context) -> dict:
    """The codec table on real and DINOv2/CLIP-shaped features; the ratio judged: the default's read
    speed against the fastest candidate's."""
    codecs = candidates(quick=ctx.sizes.name == "quick")
    with intra_op_threads(1):
        real, source = real_features(ctx)
        sets = {**{k: v.astype(np.float16) for k, v in real.items()}, **_random_features(ctx)}
        table: dict[str, dict[str, dict]] = {}
        for fname, x in sets.items():
            table[fname] = {c: measure(x, codec, str(ctx.workdir / "codec.zarr")) for c, codec in codecs.items()}
            table[fname][DIRECT] = measure(x, None, str(ctx.workdir / "codec.zarr"), direct=True)
    default = codec_name(default_compressor())
    real_rows = [table[k] for k in real]
    speed = {c: float(np.mean([r[c]["read_mb_s"] for r in real_rows])) for c in codecs}  # all through zarr
    fastest = max(speed, key=speed.get)
    result = {"sizes": {"features": {k: list(v.shape) for k, v in sets.items()}, "data": source,
                      "views": ctx.sizes.size_views},
            "table": table, "default": default,
            "ratios": {"default/fastest read (real)": {
                "value": speed[default] / speed[fastest], "goal": "-",
                "absolute": f"{default}: {speed[default]:.0f} MB/s vs {fastest}: {speed[fastest]:.0f} MB/s "
                            f"(size {np.mean([r[default]['ratio'] for r in real_rows]):.3f} vs "
                            f"{np.mean([r[fastest]['ratio'] for r in real_rows]):.3f} of raw float16)"}}}
    result["markdown"] = format_codec_table(result)
    return result


def format_codec_table(result: dict) -> str:
    """Markdown: one row per codec, size ratio and read MB/s for each feature set."""
    sets = list(result["table"])
    head = "| codec | " + " | ".join(f"{s}: size, MB/s" for s in sets) + " |"
    lines = [head, "|---" * (len(sets) + 1) + "|"]
    for c in result["table"][sets[0]]:
        cells = [f"{result['table'][s][c]['ratio']:.3f}, {result['table'][s][c]['read_mb_s']:.0f}" for s in sets]
        lines.append(f"| {c}{' (default)' if c == result['default'] else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
