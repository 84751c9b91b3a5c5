"""How a teacher's targets are stored: the storage kinds, their encoding (numpy, in stage one) and
decoding (torch, on whatever device the batch is on: loader workers and PCIe move the compact bytes),
what each costs per token, and the fidelity every cache measures of what it stored.

A kind is data (`record()`, `storage_kind(record)`), its arrays per (sample, view) chunk named by
`parts`: "" is `teachers/<name>`, any other part `<part>s/<name>` (int8's `scales/<name>` as before).

- `float16`  2·C bytes per token.
- `int8`     C + 2: per-token symmetric, one float16 scale.
- `int4`     C/2 + 2·C/g: symmetric in ±7 per group of `g` channels, one float16 scale each; a group
             of zeros decodes to zeros; an outlier channel costs only its group's resolution.
- `pca`      C/2 (a quarter of float16): a per-teacher basis (mean, principal directions, their
             spreads) fitted in stage one on a seeded sample of tokens; the whitened coefficients
             of one token share one float16 scale, those of largest variance take 8 bits, the next
             4, the rest none (reverse water-filling on the fitted variances), each with the
             uniform quantiser of least error on a unit Gaussian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..errors import RsmtdfError

# the uniform midrise quantisers of least squared error on a unit Gaussian, bits → (step, error):
# Max (1960) for 16 levels; both recomputed by tests/test_storage.py
QUANTISERS = {4: (0.33520, 0.011543), 8: (0.030762, 8.7686e-05)}
PCA_SCALES = (1.0, 1.2, 1.45, 1.75, 2.1, 2.5, 3.0, 4.0)  # a token's scale, in units of its RMS


class Kind:
    """One storage kind with its parameters; `encode` in numpy, `decode` in torch."""

    name: ClassVar[str]
    part_names: ClassVar[tuple[str, ...]] = ("", "scale")  # the keys of `parts`, known without the shapes

    def record(self) -> dict:
        return {"kind": self.name}

    def describe(self) -> str:
        """The kind and its parameters in a few words, as `inspect` and refusals name it."""
        return self.name

    def parts(self, tokens: int, dim: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """The stored arrays of one (sample, view): part → (shape, dtype)."""
        raise NotImplementedError

    def bytes_per_token(self, dim: int) -> float:
        return sum(math.prod(shape) * np.dtype(dtype).itemsize
                   for shape, dtype in self.parts(1, dim).values())

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(..., L, C) float32 → the stored parts (..., *part shape)."""
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stored parts (any leading dims, any device) → (..., L, C) float32 on their device."""
        raise NotImplementedError

    def check(self, teacher: str, dim: int) -> None:
        """Refuse, in one line, a kind that cannot hold `dim` channels."""


@dataclass(frozen=True)
class Float16(Kind):
    name: ClassVar[str] = "float16"
    part_names: ClassVar[tuple[str, ...]] = ("",)

    def parts(self, tokens: int, dim: int) -> dict:
        return {"": ((tokens, dim), "float16")}

    def encode(self, x: np.ndarray) -> dict:
        with np.errstate(over="ignore"):  # an overflow becomes inf, which the writer's check names
            return {"": x.astype(np.float16)}

    def decode(self, parts: dict) -> torch.Tensor:
        return parts[""].float()


@dataclass(frozen=True)
class Int8(Kind):
    name: ClassVar[str] = "int8"

    def describe(self) -> str:
        return "int8 (per-token scale)"

    def parts(self, tokens: int, dim: int) -> dict:
        return {"": ((tokens, dim), "int8"), "scale": ((tokens,), "float16")}

    def encode(self, x: np.ndarray) -> dict:
        scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
        q = np.clip(np.rint(x / scale.astype(np.float32)), -127, 127).astype(np.int8)
        return {"": q, "scale": scale[..., 0]}

    def decode(self, parts: dict) -> torch.Tensor:
        return parts[""].float() * parts["scale"].float().unsqueeze(-1)


@dataclass(frozen=True)
class Int4(Kind):
    group: int = 16
    name: ClassVar[str] = "int4"

    def record(self) -> dict:
        return {"kind": self.name, "group": self.group}

    def describe(self) -> str:
        return f"int4 (groups of {self.group})"

    def check(self, teacher: str, dim: int) -> None:
        if self.group < 2 or self.group % 2 or dim % self.group:
            raise RsmtdfError(f"teacher '{teacher}': int4 groups of {self.group} channels do not divide its {dim} "
                              f"channels ([teachers] group_size must be even and divide {dim})")

    def parts(self, tokens: int, dim: int) -> dict:
        return {"": ((tokens, dim // 2), "uint8"), "scale": ((tokens, dim // self.group), "float16")}

    def encode(self, x: np.ndarray) -> dict:
        g = x.reshape(*x.shape[:-1], -1, self.group)
        scale = np.abs(g).max(axis=-1, keepdims=True) / 7.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
        q = np.clip(np.rint(g / scale.astype(np.float32)), -7, 7).astype(np.int16) + 8  # 1..15
        q = q.reshape(*x.shape[:-1], -1, 2).astype(np.uint8)
        return {"": q[..., 0] | (q[..., 1] << 4), "scale": scale[..., 0]}

    def decode(self, parts: dict) -> torch.Tensor:
        q = unpack_nibbles(parts[""]) - 8.0
        scale = parts["scale"].float()
        return (q.unflatten(-1, (scale.shape[-1], self.group)) * scale.unsqueeze(-1)).flatten(-2)


@dataclass(frozen=True, eq=False)
class Pca(Kind):
    """Transform-coded targets in a quarter of float16's bytes: the coefficients on a fitted basis,
    the `wide` ones of largest variance in 8 bits, the next `narrow` in 4, the rest dropped, the split
    chosen by reverse water-filling on the fitted variances. `mean` (C,), `vectors` (C, wide + narrow)
    orthonormal and `spread` (the coefficients' standard deviations) are stored once per teacher."""

    mean: np.ndarray
    vectors: np.ndarray
    spread: np.ndarray
    wide: int
    _on: dict = field(default_factory=dict, repr=False)  # the basis as tensors, per device
    name: ClassVar[str] = "pca"

    @property
    def narrow(self) -> int:
        return self.vectors.shape[1] - self.wide

    def record(self) -> dict:
        return {"kind": self.name, "wide": self.wide, "narrow": self.narrow}

    def describe(self) -> str:
        return f"pca ({self.wide} coefficients in 8 bits, {self.narrow} in 4)"

    def __getstate__(self) -> dict:  # pickled without the basis's device copies
        return {**self.__dict__, "_on": {}}

    def parts(self, tokens: int, dim: int) -> dict:
        return {"": ((tokens, self.wide + self.narrow // 2), "uint8"), "scale": ((tokens,), "float16")}

    def basis(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "vectors": self.vectors, "spread": self.spread}

    @classmethod
    def fit(cls, tokens: np.ndarray, teacher: str = "") -> Pca:
        """The basis of (n, C) tokens and the split of C/2 − 2 bytes between 8- and 4-bit
        coefficients with the least expected error (Gaussian coefficients: `QUANTISERS`)."""
        n, dim = tokens.shape
        if dim % 2 or dim < 8:
            raise RsmtdfError(f"teacher '{teacher}': pca storage needs an even number of channels ≥ 8, not {dim}")
        x = tokens.astype(np.float64)
        mean = x.mean(axis=0)
        values, vectors = np.linalg.eigh(np.cov(x - mean, rowvar=False))
        order = np.argsort(values)[::-1]
        variance = np.clip(values[order], 0, None)
        total = np.concatenate([[0], np.cumsum(variance)])
        nibbles = dim - 4  # C/2 − 2 bytes: the float16 scale takes the rest of a quarter of 2·C
        error = [QUANTISERS[8][1] * total[m] + QUANTISERS[4][1] * (total[m + nibbles - 2 * m] - total[m])
                 + total[-1] - total[m + nibbles - 2 * m] for m in range(nibbles // 2 + 1)]
        wide = int(np.argmin(error))
        keep = order[: wide + nibbles - 2 * wide]
        spread = np.sqrt(np.clip(values[keep], 1e-12, None))
        return cls(mean.astype(np.float32), vectors[:, keep].astype(np.float32), spread.astype(np.float32), wide)

    def _steps(self) -> np.ndarray:
        return np.repeat([QUANTISERS[8][0], QUANTISERS[4][0]], [self.wide, self.narrow]).astype(np.float32)

    def encode(self, x: np.ndarray) -> dict:
        """Each token's scale is the one with the least squared error in feature space among
        `PCA_SCALES` × its RMS (the RMS itself suits Gaussian tokens) and the least that clips none of
        its coefficients (a token with an outlier)."""
        u = ((x - self.mean) @ self.vectors) / self.spread
        rms = np.sqrt((u.astype(np.float64) ** 2).mean(axis=-1, keepdims=True))
        rms = np.where(rms == 0, 1.0, rms)
        steps, top = self._steps(), np.repeat([255, 15], [self.wide, self.narrow])
        unclipped = np.abs(u / (steps * (top + 1) / 2)).max(axis=-1, keepdims=True)
        best = None
        for scale in (*(rms * f for f in PCA_SCALES), np.maximum(unclipped, 1e-30)):
            scale = np.minimum(scale, 65504).astype(np.float16)
            step = scale.astype(np.float32) * steps
            q = np.clip(np.floor(u / step + (top + 1) / 2), 0, top)
            err = (((u - (q - top / 2) * step) * self.spread) ** 2).sum(axis=-1, keepdims=True)
            if best is None:
                best = [q, scale, err]
                continue
            better = err < best[2]
            best = [np.where(better, q, best[0]), np.where(better, scale, best[1]), np.minimum(err, best[2])]
        best_q, best_scale = best[0], best[1]
        q = best_q.astype(np.uint8)
        pairs = q[..., self.wide:].reshape(*x.shape[:-1], -1, 2)
        return {"": np.concatenate([q[..., : self.wide], pairs[..., 0] | (pairs[..., 1] << 4)], axis=-1),
                "scale": best_scale[..., 0]}

    def decode(self, parts: dict) -> torch.Tensor:
        values = parts[""]
        mean, vectors, spread, steps = self._tensors(values.device)
        q = torch.cat([values[..., : self.wide].float() - 127.5, unpack_nibbles(values[..., self.wide:]) - 7.5], -1)
        return (q * steps * parts["scale"].float().unsqueeze(-1) * spread) @ vectors.T + mean

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._on:
            arrays = (self.mean, self.vectors, self.spread, self._steps())
            self._on[key] = tuple(torch.from_numpy(a).to(device) for a in arrays)
        return self._on[key]


KINDS: dict[str, type[Kind]] = {k.name: k for k in (Float16, Int8, Int4, Pca)}
STORAGES = (*KINDS, "auto")  # what a recipe may ask for; `auto` picks per teacher (see `choose`)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) of two 4-bit values each (low nibble first) → float32 (..., 2n)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).float()


def storage_kind(record: dict, basis: dict[str, np.ndarray] | None = None) -> Kind:
    """The kind a cache records (`record()`), with its stored basis where it has one."""
    name = record["kind"]
    if name == "pca":
        if basis is None:
            raise RsmtdfError("a pca storage needs its stored basis")
        return Pca(*(np.asarray(basis[k], np.float32) for k in ("mean", "vectors", "spread")), int(record["wide"]))
    if name == "int4":
        return Int4(int(record["group"]))
    return KINDS[name]()


def roundtrip(kind: Kind, x: np.ndarray) -> torch.Tensor:
    """What a reader decodes of `x` stored as `kind` (on the CPU)."""
    return kind.decode({p: torch.from_numpy(np.ascontiguousarray(v)) for p, v in kind.encode(x).items()})


# ---- fidelity: what the stored targets keep of the full-precision ones ----------------------

COSINE_EDGES = np.concatenate([np.linspace(-1, 0.9, 191), np.linspace(0.9, 1, 1001)[1:]])  # 1e-4 near 1


@dataclass
class Fidelity:
    """Streamed token statistics of stored against full-precision targets: count, sums for the mean
    cosine and the relative error energy, the minimum, and a histogram for percentiles (bins of 1e-4
    above 0.9). `vector()`/`from_vector` carry it through a shard-sized float64 array; `+` merges."""

    tokens: int = 0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    error: float = 0.0
    energy: float = 0.0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(COSINE_EDGES) - 1))

    def add(self, full: torch.Tensor | np.ndarray, stored: torch.Tensor | np.ndarray) -> None:
        """Count (..., C) tokens: `full` the targets as computed, `stored` what a reader decodes. In
        float64 numpy, whose sums do not depend on a thread count (torch's do), so a cache's record
        is the same bits whatever machine wrote it. A token kept exactly (zeros too) has cosine 1."""
        full, stored = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, np.float64) for x in (full, stored))
        full, stored = full.reshape(-1, full.shape[-1]), stored.reshape(-1, full.shape[-1])
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite targets are the writer's to refuse
            norms = np.sqrt((full ** 2).sum(-1)) * np.sqrt((stored ** 2).sum(-1))
            cos = np.clip((full * stored).sum(-1) / np.maximum(norms, 1e-12), -1, 1)
            cos[(full == stored).all(-1)] = 1.0
            self.error += float(((full - stored) ** 2).sum())
            self.energy += float((full ** 2).sum())
        self.tokens += len(cos)
        self.cosine_sum += float(cos.sum())
        self.cosine_min = min(self.cosine_min, float(cos.min(initial=1.0)))
        self.histogram += np.histogram(cos, COSINE_EDGES)[0]

    def __add__(self, other: Fidelity) -> Fidelity:
        return Fidelity(self.tokens + other.tokens, self.cosine_sum + other.cosine_sum,
                        min(self.cosine_min, other.cosine_min), self.error + other.error,
                        self.energy + other.energy, self.histogram + other.histogram)

    def vector(self) -> np.ndarray:
        return np.concatenate([[self.tokens, self.cosine_sum, self.cosine_min, self.error, self.energy],
                               self.histogram])

    @classmethod
    def from_vector(cls, v: np.ndarray) -> Fidelity:
        return cls(int(v[0]), float(v[1]), float(v[2]), float(v[3]), float(v[4]), np.array(v[5:], np.float64))

    @property
    def mean_cosine(self) -> float:
        return self.cosine_sum / max(self.tokens, 1)

    def percentile(self, q: float) -> float:
        """The q-th percentile of the token cosines, to the upper edge of its histogram bin."""
        if not self.tokens:
            return float("nan")
        at = np.searchsorted(np.cumsum(self.histogram), q / 100 * self.tokens)
        return float(COSINE_EDGES[min(at + 1, len(COSINE_EDGES) - 1)])

    def line(self) -> str:
        """The record in words, as `extract-features` and `inspect` print it."""
        return (f"token cosine mean {self.mean_cosine:.5f}, 1st percentile {self.percentile(1):.4f}, "
                f"min {self.cosine_min:.4f}; error energy {self.error / max(self.energy, 1e-30):.2e} "
                f"({self.tokens} tokens)")

    def record(self) -> dict:
        return {"tokens": self.tokens, "mean_cosine": self.mean_cosine, "p01_cosine": self.percentile(1),
                "min_cosine": self.cosine_min, "error_energy": self.error / max(self.energy, 1e-30)}


# ---- the least bytes any coder could use -----------------------------------------------------

def gaussian_rate_bits(variances: np.ndarray, distortion: float) -> float:
    """Bits per token that independent Gaussian components of `variances` need at mean squared error
    `distortion` per token (reverse water-filling: R = Σ max(0, ½ log2(σᵢ²/θ)), Σ min(θ, σᵢ²) = D)."""
    v = np.sort(np.asarray(variances, np.float64))[::-1]
    if distortion >= v.sum():
        return 0.0
    lo, hi = 0.0, float(v.max())
    for _ in range(200):  # θ by bisection: Σ min(θ, σᵢ²) rises with θ
        theta = (lo + hi) / 2
        lo, hi = (theta, hi) if np.minimum(theta, v).sum() < distortion else (lo, theta)
    theta = (lo + hi) / 2
    return float(0.5 * np.log2(np.maximum(v / theta, 1.0)).sum())


def distortion_at(cosine: float) -> float:
    """The relative error energy at which a reconstruction orthogonal to its error (as the best
    coders' are) keeps cosine `cosine`: |x̂|² = |x|² − |e|², so e = 1 − cos²."""
    return 1.0 - cosine ** 2
