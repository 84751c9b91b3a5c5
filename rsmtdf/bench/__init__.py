"""`rsmtdf bench`: the measured goals of DESIGN §6 as ratios of two timings taken in one run.

One module per part, each runnable alone:

- `step`    one training step in four set-ups at the same batch and crop: FixMatch without
            distillation, RS-MTDF with targets handed in from memory, RS-MTDF reading targets from
            the cache through the real loader path, RS-MTDF with online teachers; FLOP-count
            predictions (`FlopCounterMode` over the whole step: forward, backward, EMA, teachers)
            printed beside the measured ratios.
- `extract` the real `extract()` into a temporary folder vs the teachers' bare forward over the
            same crops at the same batch size.
- `read`    targets/s the `CacheReader` delivers through a default DataLoader (2 workers) vs the
            targets/s one training step consumes (2 × batch per step).
- `size`    bytes per (sample, view) on disk for float32, float16, float16 + the default compressor
            and int8 + per-token scale, each with its cosine similarity to float32, from real
            EfficientNet-Lite0 features (real weights) on the real LoveDA sample when present.
- `codec`   size and read MB/s of each candidate codec on real and DINOv2/CLIP-shaped features.
- `feed`    CPU ms per step of each part of the data path at the paper's size (before/after this
            work's changes), loader steps/s for 1, 2, 4 workers, and the loader cores one GPU needs
            against the model step predicted from its FLOPs (`feed.py`).
- `predict` streamed mapping: peak memory at two scene sizes, throughput against the bare forward
            (`predict.py`).
- `tiles`   one large scene read as tiles by window vs the same tiles as files: loading and
            extraction rates, a loader worker's peak memory at two scene sizes (`tiles.py`).
- `memory`  peak memory of one training step at the paper's shapes at three micro-batches, the line
            through them, and the smallest GPU holding the paper's batch (8 + 8) with and without
            gradient accumulation (`memory.py`).
- `storage` the compact storage kinds: bytes per (tile, view), token cosines on real and ViT-like
            features, the rate–distortion bound, read and decode ms per batch (`storage.py`).
            `feed:pca` (also `feed:int4`, `feed:int8`) runs `feed` with targets of that kind's bytes.

Speed does not depend on weights, so step/extract/read use the configured architectures with random
weights (`pretrained=False`); every figure is a ratio, with the absolute times beside it.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import RsmtdfError
from ..utils.files import write_whole
from ..utils.launch import choose_device
from .codec import bench_codec
from .common import SIZES, Context, interleaved_times, machine, median_time, step_flops
from .extract import bench_extract
from .feed import bench_feed
from .memory import bench_memory
from .predict import bench_predict
from .read import bench_read
from .size import bench_size
from .step import bench_step
from .storage import FEED_KINDS, bench_storage
from .tiles import bench_tiles

# part name -> its function, in the order `bench all` runs them; a part returns one result record
# whose "ratios" each carry value, goal, optionally predicted, and an "absolute" line for the table
PARTS: dict[str, Callable[[Context], dict]] = {
    "step": bench_step, "extract": bench_extract, "read": bench_read, "size": bench_size, "codec": bench_codec,
    "feed": bench_feed, "predict": bench_predict, "tiles": bench_tiles, "storage": bench_storage,
    "memory": bench_memory}
VARIANTS = {"feed": FEED_KINDS}  # `bench feed:pca`: the part with its targets stored as that kind
__all__ = ["PARTS", "SIZES", "VARIANTS", "format_table", "interleaved_times", "median_time", "run", "run_parts",
           "step_flops", "verdict"]


def chosen(parts: list[str]) -> dict[str, Callable[[Context], dict]]:
    """The named parts in the order of PARTS, each variant (`feed:pca`) after its part."""
    out = {}
    for name, bench in PARTS.items():
        if name in parts:
            out[name] = bench
        for option in VARIANTS.get(name, ()):
            if f"{name}:{option}" in parts:
                out[f"{name}:{option}"] = functools.partial(bench, storage=option)
    return out


def run(parts: list[str], size: str = "default", device: str | None = None, out: str | Path | None = None,
        workdir: str | Path | None = None, echo: Callable[[str], None] = print, threads: int | None = None) -> dict:
    """Run the named parts (`chosen`) and return (and optionally write) the results.

    `threads` sets torch's intra-op threads in this process (loader workers use one each anyway)."""
    if threads:
        torch.set_num_threads(threads)
    sizes = SIZES[size]
    device = choose_device(device)
    with tempfile.TemporaryDirectory(prefix="rsmtdf-bench-", dir=workdir) as tmp:
        ctx = Context(sizes, device, Path(tmp))
        results: dict = {"machine": {**machine(), "device": device}, "size": size,
                         "weights": "random (pretrained=False) for step/extract/read: speed does not depend on "
                                    "weights; real effnet_lite0 weights for size", "parts": {}}
        for part, bench in chosen(parts).items():
            t0 = time.perf_counter()
            echo(f"bench {part} ...")
            results["parts"][part] = bench(ctx)
            results["parts"][part]["wall_s"] = time.perf_counter() - t0
    if out is not None:
        write_whole(out, json.dumps(results, indent=2))
    return results


def run_parts(part: str, quick: bool, full: bool, device: str | None, out: Path | None,
              echo: Callable[[str], None] = print, threads: int | None = None) -> str:
    """`rsmtdf bench PART`: the part (or `all`) run at the quick, full or default sizes, its results
    written to `out`; returns the table."""
    variants = [f"{name}:{option}" for name, options in VARIANTS.items() for option in options]
    if part not in (*PARTS, *variants, "all"):
        raise RsmtdfError(f"bench {part}: choose one of {', '.join(PARTS)}, {', '.join(variants)}, all")
    if quick and full:
        raise RsmtdfError("bench: give --quick or --full, not both")
    size = "quick" if quick else "full" if full else "default"
    table = format_table(run(list(PARTS) if part == "all" else [part], size, device, out, echo=echo, threads=threads))
    return table + (f"\nwrote {out}" if out is not None else "")


def _within(value: float, predicted: float) -> bool:
    return abs(value / predicted - 1) <= 0.10


def verdict(name: str, r: dict) -> str:
    v, goal = r["value"], r["goal"]
    if "met" in r:  # a part that judges several goals at once says so itself
        return "met" if r["met"] else "missed"
    if "predicted" in r:
        return "met" if _within(v, r["predicted"]) else "missed"
    if goal.startswith("<="):
        ok = v <= float(goal.split()[1])
        if "cosine" in r:
            ok = ok and r["cosine"] >= 0.999
        return "met" if ok else "missed"
    if goal.startswith(">="):
        return "met" if v >= float(goal.split()[1]) else "missed"
    return "-"


def format_table(results: dict) -> str:
    m = results["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; device {m['device']}; sizes '{results['size']}'",
             f"weights: {results['weights']}", "",
             f"| {'part':<8}| {'ratio':<28}| {'measured':>9} | {'predicted':>9} | {'goal':<28}| {'verdict':<7}| absolute |",
             f"|{'-' * 9}|{'-' * 29}|{'-' * 11}|{'-' * 11}|{'-' * 29}|{'-' * 8}|----------|"]
    for part, res in results["parts"].items():
        for name, r in res["ratios"].items():
            pred = f"{r['predicted']:.3f}" if "predicted" in r else "-"
            lines.append(f"| {part:<8}| {name:<28}| {r['value']:>9.3f} | {pred:>9} | {r['goal']:<28}| "
                         f"{verdict(name, r):<7}| {r['absolute']} |")
    for part, res in results["parts"].items():  # a part's own table, where it has one
        if "markdown" in res:
            lines += ["", f"{part}:", res["markdown"]]
    return "\n".join(lines)
