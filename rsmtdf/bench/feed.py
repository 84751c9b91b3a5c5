"""`bench feed`: can the data path keep one GPU busy at the paper's size (crop 518, batch 8 + 8)?

On generated 1024² LoveDA-layout scenes (512² tiles) and a cache holding float16 targets of the
real shapes (DINOv2-B@518 1369×768, CLIP-L@224 256×1024; random values: speed does not depend on
them), it measures, in CPU milliseconds per training step (one thread, `time.process_time`, so load
from other processes inflates it less than wall time), each part of the data path:

- decode          `dataset.load` of the step's 16 tiles; after, from the worker's `DecodedTiles`
                  (a later epoch: every tile already decoded once);
- views (worker)  before, `to_unit_rgb` of the whole tile and `views.resize_and_crop` (the whole
                  tile resized) of image and mask; after, `train.loader.loader_pixels`: the view's window
                  of raw pixels cut out, and the label crop (a gather);
- views (device)  after: `train.loader.render_crops`, scaling and resampling the windows on the training
                  device (timed on this CPU when there is no GPU; not loader work);
- strong (worker) what the loader worker spends on strong augmentation and CutMix: before, the
                  per-sample torchvision pixels (`augment.strong_augment`, `cutmix_box`); after, the
                  draws alone (`augment.draw_strong`, `draw_box`);
- strong (device) after: `augment.strong_batch` + `box_masks` on the batch, which runs on the
                  training device (timed on this CPU when there is no GPU; not loader work);
- cache reads     the step's 16 (sample, view) targets: before, `CacheReader.read` in the workers,
                  Blosc-zstd through zarr, widened to float32; after, `train.loader.read_targets` in the
                  training process: the default codec (none) read straight from the shard files
                  (`shardfile`), float16, stacked into the batch;
- collate         `default_collate` of both batches (after: `train.loader.collate`, without targets);
- pin + copy      the copy into page-locked memory (measured as a memcpy of the batch's bytes on a
                  machine without CUDA) and the host→device transfer (measured on a GPU, otherwise
                  predicted at PCIe 5.0 x16 speed, overlapped with compute by `non_blocking`).

It also runs the data path as training does (the real `ReplaySet` + `EpochSampler` DataLoaders
with 1, 2 and 4 workers per loader, targets read one batch ahead in this process) and measures its
steps/s and its CPU per step, workers and this process together: the parts' sum leaves out the
hand-over between processes. The model's step (the student's forward and backward on 16 crops, the EMA forward on 8,
the AdamW step) is measured on a GPU under bf16 autocast; without one it is predicted from its FLOP
count (counted on the meta device) at `MFU` of the H200's dense bf16 peak (`inspect.step`, which
`inspect --estimate` shares).
Verdict: loader cores one GPU needs to never wait = the data path's measured CPU seconds per step
(the most of the three worker counts) / model step seconds (goal ≤ 4).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate
from zarr.codecs import BloscCodec

from ..cache.format import checksummed, codec_name, default_compressor
from ..cache.reader import CacheReader
from ..config.recipe import load_recipe
from ..data.batch import Batch
from ..data.tilecache import DecodedTiles
from ..inspect.step import StepModel, model_work
from ..models.student import TeacherSlot
from ..train.loader import EpochSampler, ReplaySet, collate, loader_pixels, one_ahead, read_targets, render_crops, sample_rng
from ..transforms.augment import box_masks, cutmix_box, draw_box, draw_strong, strong_augment, strong_batch
from ..transforms.pixels import to_unit_rgb
from ..transforms.scaling import BandScaling
from ..transforms.views import View, ViewSpec, apply_view, resize_and_crop
from ..utils.runtime import keep_freed_buffers
from .common import Context, cpu_ms, generated_dataset
from .storage import decoder, stand_in

PCIE_BYTES_PER_S = 50e9  # PCIe 5.0 x16 host→device from pinned memory, as measured in practice (64 GB/s raw)
BEFORE_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")  # the default until this benchmark

FEED_SIZES = {  # `quick` for CI; every other size runs the paper's, which is the point of this part
    "quick": {"crop": 56, "batch": 2, "scenes": 1, "scene": 512, "repeats": 1, "loader_steps": 2, "workers": (1,),
              "targets": {"dinov2_vitb14": (16, 32, 56), "clip_vitl14": (4, 64, 28)},  # tokens, dim, input
              "student": {"encoder": "vit_small_patch14_dinov2", "kwargs": {"embed_dim": 48, "depth": 4, "num_heads": 3},
                          "translator_hidden": 64}},
    "paper": {"crop": 518, "batch": 8, "scenes": 2, "scene": 1024, "repeats": 5, "loader_steps": 32, "workers": (1, 2, 4),
              "targets": {"dinov2_vitb14": (1369, 768, 518), "clip_vitl14": (256, 1024, 224)},
              "student": {"encoder": "vit_small_patch14_dinov2", "kwargs": {}, "translator_hidden": 1024}},
}


def _targets_store(path: Path, n: int, a: int, shapes: dict[str, tuple[int, int, int]], codec, shard: int) -> str:
    """Random float16 targets with the cache's chunk (one sample, one view) and shard layout and codecs."""
    rng = np.random.default_rng(0)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, (tokens, dim, _) in shapes.items():
        arr = group.create_array(f"teachers/{name}", shape=(n, a, tokens, dim), chunks=(1, 1, tokens, dim),
                                 shards=(shard, a, tokens, dim), dtype="float16", compressors=checksummed(codec))
        for s in range(0, n, shard):
            k = min(shard, n - s)
            arr[s : s + k] = rng.standard_normal((k, a, tokens, dim), dtype=np.float32).astype(np.float16)
    return str(path)


def _step_model(f: dict, crop: int, batch: int) -> StepModel:
    """The student (DINOv2-S/14 + the recipe's DPT head, translators, projections) at the feed sizes."""
    st = load_recipe(None).student
    slots = [TeacherSlot(n, d, int(round(t ** 0.5)), size) for n, (t, d, size) in f["targets"].items()]
    return StepModel(f["student"]["encoder"], 7, crop, batch, tuple(slots), st.decoder, tuple(st.fusion_weights),
                     f["student"]["translator_hidden"], f["student"]["kwargs"])


def _model_step(f: dict, crop: int, batch: int, device: str, measure: bool, repeats: int = 10) -> dict:
    """The model step: with `measure` (a GPU), `model_work` under bf16 autocast plus the AdamW
    step, timed (median of `repeats` after 3 warm-ups); otherwise predicted from its FLOPs
    (`inspect.step.StepModel.predicted`: `MFU` of the H200's peak)."""
    model = _step_model(f, crop, batch)
    predicted = model.predicted()
    if not measure:
        return predicted
    flops = predicted["flops"]
    dev = torch.device(device)
    student, ema = model.models(dev)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    x = torch.rand(2 * batch, 3, crop, crop, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for k in range(3 + repeats):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            model_work(student, ema, x, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if k >= 3:
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "this CPU"
    return {"flops": flops, "step_s": step, "measured": True,
            "basis": f"measured on {name}: {flops / 1e12:.2f} TFLOP in {step * 1e3:.1f} ms, "
                     f"{flops / step / 1e12:.0f} TFLOP/s"}


def bench_feed(ctx: Context, storage: str = "float16") -> dict:
    """CPU ms per step of each data-path part (before and after), loader steps/s, and the verdict;
    with another `storage` than float16 (`bench feed:pca`), the targets hold that kind's bytes
    (`storage.stand_in`) and their decode is timed as device work."""
    f = FEED_SIZES["quick" if ctx.sizes.name == "quick" else "paper"]
    stored = f["targets"] if storage == "float16" else stand_in(f["targets"], storage)
    crop, batch, reps = f["crop"], f["batch"], f["repeats"]
    root = ctx.workdir / "feed"
    ds, _ = generated_dataset(root, f["scenes"], f["scene"])
    ids = ds.ids_in("train")
    n, a = len(ids), 2
    spec = ViewSpec(a, crop)
    views = np.stack([np.stack([v.to_array() for v in spec.sample(sid, *ds.load(ds.index(sid)).image.shape[:2])])
                      for sid in ids])
    shard = max(1, n // 2)
    stores = {"before": _targets_store(root / "before.zarr", n, a, stored, BEFORE_CODEC, shard),
              "after": _targets_store(root / "after.zarr", n, a, stored, default_compressor(), shard)}
    readers = {k: CacheReader(url, list(stored), "float16", ids) for k, url in stores.items()}
    step = [(j % n, (j // n) % a) for j in range(2 * batch)]  # the step's (sample, view) pairs: 8 + 8
    index = [ds.index(ids[i]) for i, _ in step]
    samples = [ds.load(k) for k in index]
    rgbs = [to_unit_rgb(s.image, (0, 1, 2), None, s.valid) for s in samples]
    crops = [torch.from_numpy(apply_view(r, View.from_array(views[i, v]), crop)).permute(2, 0, 1).contiguous()
             for r, (i, v) in zip(rgbs, step)]
    unl = range(batch, 2 * batch)

    def rng(j: int):  # the unlabeled set's generator of the step's j-th sample, as ReplaySet seeds it
        return sample_rng(0, 0, ids[step[j][0]], "u")
    snap = 14 if crop % 14 == 0 else 1

    def decode():
        for k in index:
            ds.load(k)

    tiles = DecodedTiles(2**40)  # a worker's store once it has seen the step's tiles (a later epoch)

    def decode_kept():
        for (i, _), k in zip(step, index):
            tiles.get((ids[i], True), lambda k=k: ds.load(k))

    def render_whole():
        for s, (i, v) in zip(samples, step):
            view = View.from_array(views[i, v])
            resize_and_crop(to_unit_rgb(s.image, (0, 1, 2), None, s.valid), view, crop)
            resize_and_crop(s.mask, view, crop)

    scaling = BandScaling().resolved("uint8")

    def render_window() -> list[dict]:  # the worker's half: windows and label crops
        return [loader_pixels(s, View.from_array(views[i, v]), crop, scaling, labeled=j < batch)
                for j, (s, (i, v)) in enumerate(zip(samples, step))]

    def strong_before():
        for j in unl:
            g = rng(j)
            strong_augment(crops[j], g)
            cutmix_box(crop, snap, g)

    drawn = {}

    def strong_after():
        params, boxes = [], []
        for j in unl:
            g = rng(j)
            params.append(draw_strong(g))
            boxes.append(draw_box(crop, snap, g))
        drawn["params"], drawn["boxes"] = torch.stack(params), torch.stack(boxes)

    strong_after()
    xw = torch.stack([crops[j] for j in unl])

    def strong_device():
        strong_batch(xw, drawn["params"])
        box_masks(drawn["boxes"], crop)

    def reads(which: str) -> Callable[[], object]:
        """The step's target reads: before, by the loader workers, widened to float32; after, by the
        training process (`train.loader.read_targets`, both batches, stacked as they are handed on)."""
        if which == "before":
            return lambda: [readers["before"].read(i, v) for i, v in step]
        index, view = torch.tensor([i for i, _ in step]), torch.tensor([v for _, v in step])
        return lambda: [read_targets(readers["after"], index[h], view[h], False) for h in (slice(0, batch), slice(batch, None))]

    windows = render_window()

    def items(which: str) -> list[dict]:
        """The step's items as loader workers return them (before: with their targets)."""
        targets = reads("before")()
        out = []
        for j, (i, v) in enumerate(step):
            item = {**windows[j], "index": i, "view": v} if which == "after" else \
                {"image": crops[j], "mask": torch.zeros(crop, crop, dtype=torch.uint8), "index": i, "view": v,
                 "targets": {k: torch.from_numpy(t) for k, t in targets[j].items()}}
            if j >= batch:
                item.update({"strong": crops[j].clone(), "box": torch.zeros(crop, crop)} if which == "before" else
                            {"strong": drawn["params"][j - batch], "box": drawn["boxes"][j - batch]})
            out.append(item)
        return out

    batches = {w: items(w) for w in ("before", "after")}
    collators = {"before": default_collate, "after": collate}
    collated = {w: [collators[w](b[:batch]), collators[w](b[batch:])] for w, b in batches.items()}
    # after, the targets join the batch in the training process; pinning them is counted twice (the
    # stack in `read_targets` writes page-locked memory already): a conservative figure
    copied = {**collated, "after": [[c, t] for c, t in zip(collated["after"], reads("after")())]}
    nbytes = {w: sum(t.numel() * t.element_size() for c in cs for t in _tensors(c)) for w, cs in copied.items()}
    copy = _copy_ms(copied, reps, ctx.device)

    def collating(which: str) -> Callable[[], object]:
        return lambda: (collators[which](batches[which][:batch]), collators[which](batches[which][batch:]))

    def render_device() -> list[torch.Tensor]:
        return [render_crops(c, views, crop, scaling, torch.device("cpu")) for c in collated["after"]]

    runs = {"decode": (decode, decode_kept), "views (worker)": (render_whole, render_window),
            "strong+cutmix (worker)": (strong_before, strong_after),
            "cache reads": (reads("before"), reads("after")), "collate": (collating("before"), collating("after"))}
    parts = {k: {"before": cpu_ms(before, reps)} for k, (before, _) in runs.items()}
    keep_freed_buffers()  # from here on this process allocates as loader workers now do
    for k, (_, after) in runs.items():
        parts[k]["after"] = cpu_ms(after, reps)
    parts["pin (host memcpy)"] = {w: copy[w]["pin_ms"] for w in ("before", "after")}
    loader = {w: sum(p[w] for p in parts.values()) / 1e3 for w in ("before", "after")}
    device_ms = {"views (device: scaling + resampling)": cpu_ms(render_device, reps),
                 "strong+cutmix (device, batched)": cpu_ms(strong_device, reps),
                 "host→device transfer": copy["after"]["transfer_ms"]}
    if storage != "float16":
        device_ms[f"targets decode ({storage}, device)"] = cpu_ms(decoder(f["targets"], storage, 2 * batch, "cpu"), reps)

    gpu = _model_step(f, crop, batch, ctx.device, measure=torch.device(ctx.device).type == "cuda")
    pin = torch.device(ctx.device).type == "cuda"
    throughput = _loader_rates(ds, ids, views, crop, readers["after"], batch, snap, f["loader_steps"], f["workers"],
                               pin)
    # the verdict: the data path's CPU measured through the real loaders (the most of the worker
    # counts), plus pinning where this machine could not pin; the parts' sum misses the hand-over
    measured = max(r["cpu_ms_per_step"] for r in throughput.values()) / 1e3 + \
        (0.0 if pin else parts["pin (host memcpy)"]["after"] / 1e3)
    cores = {w: loader[w] / gpu["step_s"] for w in loader} | {"measured": measured / gpu["step_s"]}
    return {"sizes": {"crop": crop, "batch": f"{batch} + {batch}", "tiles": n, "scene": f["scene"],
                      "targets": {k: list(v) for k, v in f["targets"].items()}, "storage": storage,
                      "stored": {k: list(v) for k, v in stored.items()}, "codec_after": codec_name(default_compressor()),
                      "codec_before": "zstd3-bitshuffle"},
            "cpu_ms_per_step": parts, "device_ms_per_step": device_ms, "loader_cpu_s_per_step": loader,
            "bytes_per_step": nbytes, "model": gpu, "loaders": throughput,
            "ratios": {"loader cores per GPU": {
                "value": cores["measured"], "goal": "<= 4",
                "absolute": f"{measured * 1e3:.0f} ms loader CPU per step through the real loaders (the parts: "
                            f"{loader['after'] * 1e3:.0f} ms; before: {loader['before'] * 1e3:.0f} ms, "
                            f"{cores['before']:.1f} cores) vs {gpu['step_s'] * 1e3:.1f} ms model step ({gpu['basis']})"}},
            "markdown": _table(parts, device_ms, loader, throughput, gpu, cores)}


def _tensors(batch):
    """The tensors a batch pins and copies: a `Batch`'s one buffer; those of dicts and lists."""
    if isinstance(batch, Batch):
        yield batch.buffer
    elif isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (dict, list)):
        for v in (batch.values() if isinstance(batch, dict) else batch):
            yield from _tensors(v)


def _copy_ms(collated: dict, repeats: int, device: str) -> dict:
    """Pinning (page-locked copy) CPU ms and host→device transfer ms of each set-up's two batches."""
    out = {}
    for w, cs in collated.items():
        tensors = [t for c in cs for t in _tensors(c)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if torch.device(device).type == "cuda":
            pinned = [t.pin_memory() for t in tensors]
            pin = cpu_ms(lambda: [t.pin_memory() for t in tensors], repeats)

            def transfer():
                for t in pinned:
                    t.to(device, non_blocking=True)
                torch.cuda.synchronize()

            t0 = time.perf_counter()
            for _ in range(repeats):
                transfer()
            out[w] = {"pin_ms": pin, "transfer_ms": 1e3 * (time.perf_counter() - t0) / repeats}
        else:
            buffers = [torch.empty_like(t) for t in tensors]
            pin = cpu_ms(lambda: [b.copy_(t) for b, t in zip(buffers, tensors)], repeats)
            out[w] = {"pin_ms": pin, "transfer_ms": 1e3 * nbytes / PCIE_BYTES_PER_S}
    return out


def _loader_rates(ds, ids, views, crop, reader, batch, snap, steps, worker_counts,
                  pin: bool) -> dict[int, dict[str, float]]:
    """Per worker count, steps/s of the data path as training runs it (the labeled + unlabeled
    loaders: ReplaySet with the recipe's decoded-tile store, EpochSampler; the targets read one
    batch ahead in this process) and the CPU it spends per step, workers and this process
    together (item work, collation into shared memory, hand-over, target reads), after every
    worker has seen its tiles."""
    n = len(ids)
    common = dict(dataset=ds, ids=ids, cache_index={s: i for i, s in enumerate(ids)}, views=views,
                  valid=np.ones(views.shape[:2], np.float32), crop=crop, seed=0, snap=snap,
                  scaling=BandScaling(), tiles_mb=load_recipe(None).train.decoded_cache_mb)
    rates = {}
    for workers in worker_counts:
        sets = [ReplaySet(unlabeled=u, **common) for u in (False, True)]
        loaders = [DataLoader(s, batch_size=batch, sampler=EpochSampler(n, 0, 0, 1), drop_last=True,
                              num_workers=workers, persistent_workers=True, prefetch_factor=2, pin_memory=pin,
                              worker_init_fn=keep_freed_buffers, collate_fn=collate) for s in sets]
        path = one_ahead(zip(*(_forever(loader) for loader in loaders)),
                         lambda pair: [read_targets(reader, b["index"], b["view"], pin) for b in pair])
        for _ in range(max(1, n // batch) * max(1, workers)):  # start-up: every worker has decoded its tiles
            next(path)
        t0, cpu0 = time.perf_counter(), _cpu_s()
        for _ in range(steps):
            next(path)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        rates[workers] = {"steps_per_s": steps / wall, "cpu_ms_per_step": 1e3 * cpu / steps}
        path.close()
        del loaders
    return rates


def _cpu_s() -> float:
    """CPU seconds of this process and its live children (the loader workers; Linux /proc)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == os.getpid():  # fields after the name: state, ppid, ..., utime, stime at 11, 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _forever(loader):
    epoch = 0
    while True:
        loader.sampler.epoch = epoch
        yield from loader
        epoch += 1


def _table(parts: dict, device_ms: dict, loader: dict, rates: dict, gpu: dict, cores: dict) -> str:
    lines = ["| part | before, CPU ms/step | after, CPU ms/step |", "|---|---|---|"]
    lines += [f"| {k} | {v['before']:.1f} | {v['after']:.1f} |" for k, v in parts.items()]
    lines.append(f"| **loader total** | **{loader['before'] * 1e3:.0f}** | **{loader['after'] * 1e3:.0f}** |")
    lines += [f"| {k} (device work, not loader) | - | {v:.1f} |" for k, v in device_ms.items()]
    lines += ["", f"model step: {gpu['step_s'] * 1e3:.1f} ms ({gpu['basis']}); loader cores needed per GPU: "
                  f"{cores['before']:.1f} before, {cores['after']:.1f} after by the parts, **{cores['measured']:.1f} "
                  "measured through the real loaders** (goal <= 4)",
              "loader steps/s (labeled + unlabeled loaders, N workers each, on this machine): "
              + ", ".join(f"{w}: {r['steps_per_s']:.2f}" for w, r in rates.items()),
              "loader CPU per step measured through those loaders (workers and the training process): "
              + ", ".join(f"{w} workers {r['cpu_ms_per_step']:.0f} ms" for w, r in rates.items())]
    return "\n".join(lines)
