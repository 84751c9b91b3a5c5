"""`bench storage`: issue #23's compact targets, kind by kind (float16, int8, int4 in groups of 16
and of 64, pca; `cache.storage`):

- bytes per (tile, view) at the paper's shapes (DINOv2-B@518 1369×768 + CLIP-L@224 256×1024), and
  LoveDA's training set at A = 8 views (`LOVEDA_TILES`);
- the token cosine of what a reader decodes to the full-precision targets (mean, 1st percentile,
  min: `storage.Fidelity`) on (i) real EfficientNet-Lite0 and -Lite1 features (real weights) of the
  real LoveDA sample (`codec.real_features`) and (ii) ViT-like features at the paper's shapes
  (`vit_like`: a ViT with random weights has no meaningful spectrum). pca's basis is fitted as extraction
  fits it, on tiles spread over the set (every other tile, all their views), and every cosine is
  measured on the tiles in between, which the basis never saw;
- each feature set's rate–distortion bound at cosine 0.99 (`inspect.compact.token_bound`, from the
  measured half's own covariance) beside each kind's bytes per token;
- read ms of one batch of 8 + 8 (CPU, one thread): the kind's parts of 16 (sample, view)s of the
  ViT-like sets written with the cache's chunk (one sample, one view) and shard layout and codecs
  (crc32c only), then read chunk by chunk straight from the shard files into the batch's arrays, as
  the reader's direct path does (`shardfile.ShardFile.read_into`);
- decode ms of that batch with the kind's torch decode on the device (this CPU without a GPU; the
  torch threads of the run), and the decode's matmul FLOPs.

Goal: ≤ 0.66 MB per (tile, view) (LoveDA at A = 8 a quarter of float16's 212 GB, ≤ 53 GB), mean
token cosine ≥ 0.99 and 1st percentile ≥ 0.98 on every feature set.
"""

from __future__ import annotations

import numpy as np
import torch
import zarr

from ..cache.format import TeacherLayout, checksummed
from ..cache.shardfile import ShardFile
from ..cache.storage import Fidelity, Kind, Pca, roundtrip
from ..errors import RsmtdfError
from ..inspect.compact import DEFAULT_FLOOR, nominal_kind, token_bound, view_bytes
from .codec import real_features
from .common import Context, cpu_ms, median_time, step_flops

PAPER = {"dinov2_vitb14": (1369, 768), "clip_vitl14": (256, 1024)}  # tokens, channels
QUICK = {"dinov2_vitb14": (37, 64), "clip_vitl14": (16, 128)}  # channels int4's groups of 64 divide
LOVEDA_TILES, LOVEDA_VIEWS = 10_088, 8  # 2,522 training scenes of 1024² (DWL), four 512² tiles each
BATCH = 8  # labeled samples per step and GPU; as many unlabeled
GOAL_BYTES, GOAL_MEAN, GOAL_P01 = 660_000, 0.99, 0.98
BENCHED = {"float16": ("float16", 16), "int8": ("int8", 16), "int4 g=16": ("int4", 16), "int4 g=64": ("int4", 64),
           "pca": ("pca", 16)}  # label → (kind, int4 group)
# the ViT-like features (`vit_like`)
DECAY = 1.0  # covariance eigenvalues ∝ k^-DECAY
MEAN_SPREAD = 0.5  # channel means ~ N(0, MEAN_SPREAD²), in units of the average channel deviation
MASSIVE = 2  # channels with a large mean on every token ...
MASSIVE_MEAN = 8.0
HIGH_NORM = 0.02  # ... and a share of high-norm tokens on which they spike
SPIKE = 100.0


def vit_like(n: int, a: int, tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, a, tokens, dim) float32 tokens with what makes a ViT's features hard to store, exactly:

    - a Gaussian part of covariance Q diag(λ) Qᵀ, λ_k ∝ k^-`DECAY` scaled so the channels' variances
      average 1, Q a random orthogonal basis (no channel privileged);
    - channel means drawn from N(0, `MEAN_SPREAD`²), but for `MASSIVE` channels whose mean is
      ±`MASSIVE_MEAN` (outlier dimensions present on every token, as CLIP's and DINOv2's have);
    - `HIGH_NORM` of the tokens, at random positions, high-norm tokens (Darcet et al. 2024, "Vision
      Transformers Need Registers"): their massive channels add ±`SPIKE`, about 4× the token norm.
    Tokens are independent draws: no kind looks at a token's neighbours."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    spectrum = np.arange(1, dim + 1, dtype=np.float64) ** -DECAY
    mix = q * np.sqrt(spectrum * dim / spectrum.sum())
    x = rng.standard_normal((n * a * tokens, dim)) @ mix.T
    mean = rng.normal(0, MEAN_SPREAD, dim)
    massive = rng.choice(dim, MASSIVE, replace=False)
    signs = rng.choice([-1.0, 1.0], MASSIVE)
    mean[massive] = signs * MASSIVE_MEAN
    x += mean
    high = rng.random(len(x)) < HIGH_NORM
    x[np.ix_(high, massive)] += signs * SPIKE
    return x.reshape(n, a, tokens, dim).astype(np.float32)


def kind_for(label: str, fit: np.ndarray, teacher: str) -> Kind | None:
    """The benched kind `label` for (n, C) tokens: pca fitted on them, the others as they are; None
    where it cannot hold C channels (int4 groups of 64 and EfficientNet's 112)."""
    name, group = BENCHED[label]
    try:
        return Pca.fit(fit, teacher) if name == "pca" else nominal_kind(name, fit.shape[-1], group, teacher)
    except RsmtdfError:
        return None


def fidelity(x: np.ndarray, teacher: str) -> tuple[dict, dict[str, Kind | None], dict]:
    """Each kind's `Fidelity` record on the odd tiles of (N, A, L, C) `x`, pca fitted on the even
    ones (None for a kind that cannot hold it); the kinds; the odd tiles' rate–distortion bound at
    `DEFAULT_FLOOR`."""
    fit, measured = x[0::2].reshape(-1, x.shape[-1]), x[1::2] if len(x) > 1 else x
    records, kinds = {}, {}
    for label in BENCHED:
        kinds[label] = kind = kind_for(label, fit, teacher)
        if kind is None:
            records[label] = None
            continue
        f = Fidelity()
        f.add(torch.from_numpy(measured), roundtrip(kind, measured))
        records[label] = f.record()
    return records, kinds, token_bound(measured.reshape(-1, x.shape[-1]), DEFAULT_FLOOR)


FEED_KINDS = ("int8", "int4", "pca")  # `bench feed:KIND` (int4 in groups of 16)


def stand_in(targets: dict[str, tuple[int, int, int]], storage: str) -> dict[str, tuple[int, int, int]]:
    """`bench feed`'s targets {name: (tokens, dim, input)} as float16 arrays holding, per (sample,
    view), as many bytes as each part of kind `storage` ("" as `name`, a part as `name-part`): what
    the loader path reads straight from the shard files and pins, chunk for chunk, until the reader
    reads the kinds' parts itself (their decode is device work: `decoder`)."""
    out = {}
    for name, (tokens, dim, size) in targets.items():
        for part, (shape, dtype) in nominal_kind(storage, dim, 16, name).parts(tokens, dim).items():
            width = -(-int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize // 2)
            out[f"{name}-{part}" if part else name] = (tokens, width, size)
    return out


def decoder(targets: dict[str, tuple[int, int, int]], storage: str, count: int, device: str):
    """A call decoding `count` (sample, view)s of each of `targets` stored as `storage` on `device`
    (values encoded from random tokens: the decode's cost does not depend on them)."""
    rng = np.random.default_rng(0)
    kinds = {n: nominal_kind(storage, d, 16, n) for n, (_, d, _) in targets.items()}
    parts = {n: {p: torch.from_numpy(v).to(device) for p, v in
                 kinds[n].encode(rng.standard_normal((count, t, d), dtype=np.float32)).items()}
             for n, (t, d, _) in targets.items()}
    return lambda: [kinds[n].decode(p) for n, p in parts.items()]


def read_and_decode(x: dict[str, np.ndarray], kinds: dict[str, Kind], path: str, device: str, repeats: int) -> dict:
    """Read and decode ms of one batch: `x` {teacher: (2 · BATCH, L, C)} (sample, view)s stored as
    `kinds` {teacher: kind}, written as BATCH samples × 2 views in shards of BATCH / 2 samples with
    the cache's chunks and codecs, then read as the reader's direct path does."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    files, out = [], {}
    for name, tokens in x.items():
        pairs = len(tokens)
        parts = kinds[name].encode(tokens.reshape(pairs // 2, 2, *tokens.shape[1:]))
        for part, values in parts.items():
            shape = values.shape[2:]
            arr = group.create_array(f"{part}s/{name}" if part else f"teachers/{name}", shape=values.shape,
                                     chunks=(1, 1, *shape), shards=(max(1, pairs // 4), 2, *shape),
                                     dtype=values.dtype, compressors=checksummed(None))
            arr[:] = values
            out[name, part] = np.empty((pairs, *shape), values.dtype)
            files.append((name, part, ShardFile.of(zarr.open_group(path, mode="r")[arr.path]), len(shape)))

    def read() -> None:
        for name, part, f, dims in files:
            for j in range(len(out[name, part])):
                f.read_into((j // 2, j % 2) + (0,) * dims, out[name, part][j][None, None])

    read_ms = cpu_ms(read, repeats)
    on = {name: {p: torch.from_numpy(v).to(device) for (n, p), v in out.items() if n == name} for name in x}

    def decode() -> None:
        for name, parts in on.items():
            kinds[name].decode(parts)

    return {"read_ms": read_ms, "decode_ms": 1e3 * median_time(decode, repeats, 2)["median_s"],
            "decode_gflop": step_flops(decode) / 1e9, "batch_bytes": sum(v.nbytes for v in out.values())}


def bench_storage(ctx: Context) -> dict:
    """The kinds' bytes, cosines, bound, read and decode times, and the verdict per kind."""
    quick = ctx.sizes.name == "quick"
    shapes, reps = QUICK if quick else PAPER, 3 if quick else 5
    real, source = real_features(ctx)
    sets = {**real, **{f"{n}-like ({t}×{c})": vit_like(4 * BATCH, 2, t, c, seed=k)
                       for k, (n, (t, c)) in enumerate(shapes.items())}}
    measured = {name: fidelity(x, name.split()[0]) for name, x in sets.items()}
    vit = {n: f"{n}-like ({t}×{c})" for n, (t, c) in shapes.items()}
    paper = [TeacherLayout(n, t, c) for n, (t, c) in PAPER.items()]
    batch = {n: sets[s][len(sets[s]) // 2:].reshape(-1, *sets[s].shape[2:])[: 2 * BATCH] for n, s in vit.items()}
    kinds: dict[str, dict] = {}
    for label, (name, group) in BENCHED.items():
        b = view_bytes(name, paper, group)
        cosines = {s: m[0][label] for s, m in measured.items() if m[0][label] is not None}
        timing = read_and_decode(batch, {n: measured[s][1][label] for n, s in vit.items()},
                                 str(ctx.workdir / "storage.zarr"), ctx.device, reps)
        met = b <= GOAL_BYTES and all(c["mean_cosine"] >= GOAL_MEAN and c["p01_cosine"] >= GOAL_P01
                                      for c in cosines.values())
        kinds[label] = {"bytes_per_view": b, "loveda_bytes": LOVEDA_TILES * LOVEDA_VIEWS * b, "cosine": cosines,
                        **timing, "met": met}
    bounds = {s: {**m[2], "dim": sets[s].shape[-1], "tokens": sets[s].shape[2],
                  "kinds_bytes_per_token": {k: kind and kind.bytes_per_token(sets[s].shape[-1])
                                            for k, kind in m[1].items()}}
              for s, m in measured.items()}
    result = {"sizes": {"paper_shapes": PAPER, "timed_shapes": shapes, "loveda": f"{LOVEDA_TILES} tiles × "
                        f"{LOVEDA_VIEWS} views", "data": source, "batch": f"{BATCH} + {BATCH}",
                        "features": {s: list(x.shape) for s, x in sets.items()},
                        "pca_fit": "every token of the even tiles (spread over the set, as extraction's probe); cosines on the odd tiles",
                        "threads": torch.get_num_threads(), "device": ctx.device},
              "kinds": kinds, "bounds": bounds,
              "ratios": {f"{label} MB/(tile, view)": {
                  "value": k["bytes_per_view"] / 1e6, "goal": "<= 0.66; cos .99, p01 .98", "met": k["met"],
                  "absolute": f"LoveDA A=8 {k['loveda_bytes'] / 1e9:.1f} GB; worst mean cos "
                              f"{min(c['mean_cosine'] for c in k['cosine'].values()):.4f}, p01 "
                              f"{min(c['p01_cosine'] for c in k['cosine'].values()):.4f}; read {k['read_ms']:.1f} ms, "
                              f"decode {k['decode_ms']:.1f} ms per {BATCH} + {BATCH}"}
                  for label, k in kinds.items()}}
    result["markdown"] = format_storage(result)
    return result


def format_storage(result: dict) -> str:
    """Markdown: bytes, times and verdict per kind; cosines per feature set; the bound per set."""
    kinds, bounds = result["kinds"], result["bounds"]
    device = result["sizes"]["device"]
    lines = [f"| kind | per (tile, view) | LoveDA A=8 | read ms, 8 + 8 (CPU, 1 thread) | decode ms, 8 + 8 ({device}) "
             "| decode GFLOP | verdict |", "|---|---|---|---|---|---|---|"]
    for label, k in kinds.items():
        lines.append(f"| {label} | {k['bytes_per_view'] / 1e6:.3f} MB | {k['loveda_bytes'] / 1e9:.1f} GB | "
                     f"{k['read_ms']:.2f} | {k['decode_ms']:.2f} | {k['decode_gflop']:.3g} | "
                     f"{'met' if k['met'] else 'missed'} |")
    sets = list(bounds)
    lines += ["", "| kind | " + " | ".join(f"{s}: mean / p01 / min cos" for s in sets) + " |",
              "|---" * (len(sets) + 1) + "|"]
    for label, k in kinds.items():
        cells = [f"{c['mean_cosine']:.4f} / {c['p01_cosine']:.4f} / {c['min_cosine']:.4f}" if (c := k["cosine"].get(s))
                 else "- (channels not divisible)" for s in sets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"| feature set | L × C | bound at cos {DEFAULT_FLOOR} (B/token) | "
                  + " | ".join(f"{label} B/token (× bound)" for label in kinds) + " |",
              "|---" * (len(kinds) + 3) + "|"]
    for s, b in bounds.items():
        cells = ["-" if v is None else f"{v:.0f} ({v / max(b['bytes_per_token'], 1e-9):.1f}×)"
                 for v in b["kinds_bytes_per_token"].values()]
        lines.append(f"| {s} | {b['tokens']} × {b['dim']} | {b['bytes_per_token']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
