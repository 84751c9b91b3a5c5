"""Which kind each teacher stores, decided once, by the process that creates a cache: the request
(`[teachers] storage` with its `StorageOptions`), pca's basis fitted on a probe of the targets of
samples spread over the cache, and `auto`'s choice, the smallest kind whose mean token cosine on that probe
meets the floor. The decision is written into the cache (`attrs["stored"]`, pca's basis as arrays),
so every extraction worker, a resume and every reader store and decode the same way.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import RsmtdfError
from .storage import KINDS, Fidelity, Float16, Int4, Int8, Kind, Pca, roundtrip

AUTO_FLOOR = 0.99  # auto's floor on the mean token cosine where the recipe sets none
FIT_TOKENS = 65536  # at most this many of the probe's tokens (a seeded sample) fit pca's basis
TOKENS_PER_CHANNEL = 4  # at least this many tokens per channel fit a basis that holds beyond them
PROBED = ("pca", "auto")  # the requests decided on a probe of samples' targets


@dataclass(frozen=True)
class StorageOptions:
    """What, besides its kind, a storage request decides: the floor on each shard's mean token
    cosine (`min_cosine`, 0: none), and where they apply int4's `group_size` (int4, auto) and the
    samples the probe takes (`probe_samples`: pca, auto); None where they do not apply."""

    min_cosine: float = 0.0
    group_size: int | None = None
    probe_samples: int | None = None

    @classmethod
    def of(cls, storage: str, min_cosine: float, group_size: int, probe_samples: int) -> StorageOptions:
        return cls(float(min_cosine), group_size if storage in ("int4", "auto") else None,
                   probe_samples if storage in PROBED else None)

    def floor(self, storage: str) -> float:
        """The mean token cosine every shard must keep: `min_cosine`, or auto's default."""
        return self.min_cosine or (AUTO_FLOOR if storage == "auto" else 0.0)

    def record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, d: dict | None) -> StorageOptions | None:
        return None if d is None else cls(**d)


def fixed_kind(storage: str, options: StorageOptions | None) -> Kind | None:
    """The kind a request names outright (float16, int8, int4 with its groups); None for the
    requests decided on a probe."""
    if storage == "int4":
        return Int4(options.group_size if options is not None and options.group_size else 16)
    return None if storage in PROBED else KINDS[storage]()


def request_bytes_per_token(storage: str, dim: int, group_size: int = 16) -> float:
    """Bytes per token a request stores: exact for every kind (pca's is C/2 whatever its basis),
    an upper bound for auto (float16's, the largest it may choose)."""
    if storage == "pca":
        return dim / 2
    kind = Float16() if storage == "auto" else fixed_kind(storage, StorageOptions(group_size=group_size))
    return kind.bytes_per_token(dim)


@dataclass(frozen=True)
class Choice:
    """A teacher's kind and, for a probed request, what the probe measured (one line)."""

    kind: Kind
    why: str = ""


def fit_pca(probe: np.ndarray, teacher: str, seed: int) -> Pca:
    """pca's basis fitted on a seeded sample of at most `FIT_TOKENS` of the probe's (…, C) tokens;
    refused on fewer than `TOKENS_PER_CHANNEL` × C (the smallest variances, which whiten the
    coefficients, would be guesses: measured, such a basis keeps a cosine of 0.2 on other tokens)."""
    tokens = probe.reshape(-1, probe.shape[-1])
    need = TOKENS_PER_CHANNEL * tokens.shape[1]
    if len(tokens) < need:
        raise RsmtdfError(f"teacher '{teacher}': pca's basis needs at least {need} tokens to fit ({TOKENS_PER_CHANNEL} per "
                          f"channel), the probe gives {len(tokens)}; raise [teachers] probe_samples")
    if len(tokens) > FIT_TOKENS:
        rng = np.random.default_rng([seed, zlib.crc32(teacher.encode())])
        tokens = tokens[np.sort(rng.choice(len(tokens), FIT_TOKENS, replace=False))]
    return Pca.fit(tokens, teacher)


def measured(kind: Kind, probe: np.ndarray) -> Fidelity:
    """The fidelity of `probe` (…, L, C) stored as `kind`, as a reader decodes it."""
    fid = Fidelity()
    for chunk in probe.reshape(-1, *probe.shape[-2:]):
        fid.add(chunk, roundtrip(kind, chunk))
    return fid


def choose(storage: str, options: StorageOptions, teacher: str, probe: np.ndarray, seed: int) -> Choice:
    """The kind `teacher` stores under a probed request, from its float32 targets (n, A, L, C) of
    the probe: pca's basis fitted on them. For auto, every candidate (pca, int4 with the recipe's
    groups, int8, float16, those the teacher's channels allow) is measured on the probe, pca's
    basis fitted on half of its samples and measured on the other half (on its own tokens a basis
    looks better than it is), and the one of fewest bytes per token whose mean cosine meets the
    floor is chosen, pca then fitted on the whole probe."""
    dim, n, views = probe.shape[-1], probe.shape[0], probe.shape[1]
    tokens = f"{n} samples × {views} views, {probe[..., 0].size} tokens"
    if storage == "pca":
        return Choice(fit_pca(probe, teacher, seed), f"teacher '{teacher}': pca basis fitted on the probe ({tokens})")
    fitted, held = (probe[0::2], probe[1::2]) if n > 1 else (probe[:, 0::2], probe[:, 1::2])
    cosines, skipped = {}, []
    for make in (lambda: fit_pca(fitted, teacher, seed), lambda: Int4(options.group_size or 16), Int8, Float16):
        try:
            kind = make()
            kind.check(teacher, dim)
        except RsmtdfError as exc:  # a kind the channels or the probe cannot hold
            skipped.append(str(exc).removeprefix(f"teacher '{teacher}': "))
            continue
        cosines[kind] = measured(kind, held if isinstance(kind, Pca) else probe).mean_cosine
    floor = options.floor(storage)
    said = f"floor {floor:g}" + ("" if options.min_cosine else " (auto's default; [teachers] min_cosine sets another)")
    seen = ", ".join(f"{k.describe()} {c:.4f}" for k, c in cosines.items()) + \
        "".join(f"; not pca: {why}" for why in skipped)
    fitting = sorted((k for k, c in cosines.items() if c >= floor), key=lambda k: k.bytes_per_token(dim))
    if not fitting:
        raise RsmtdfError(f"teacher '{teacher}': no storage kind keeps a mean token cosine of {said} on the probe "
                          f"({tokens}; measured {seen}); lower [teachers] min_cosine")
    kind = fit_pca(probe, teacher, seed) if isinstance(fitting[0], Pca) else fitting[0]
    share = kind.bytes_per_token(dim) / Float16().bytes_per_token(dim)
    return Choice(kind, f"teacher '{teacher}': auto chose {kind.describe()}, {share:.3g}× float16's bytes: the fewest "
                        f"whose mean token cosine on the probe ({tokens}) meets the {said}; measured {seen}")


def below_floor(layout, kind: Kind, mean: float, shard: int, storage: str, options: StorageOptions,
                floor_from: str) -> str:
    """Why a shard is refused: its mean token cosine as `kind` is below the floor; what to choose."""
    floor = options.floor(storage)
    shown = f"{mean:.4f}" if float(f"{mean:.4f}") < floor else f"{mean:.6f}"
    key = f"[teachers] min_cosine = {floor:g}" if options.min_cosine else \
        f'the floor {floor:g} of storage = "auto" ([teachers] min_cosine unset)'
    larger = [k for k in (Int8(), Float16()) if k.bytes_per_token(layout.dim) > kind.bytes_per_token(layout.dim)]
    advice = f"choose {' or '.join(k.name for k in larger)}" if larger else "lower [teachers] min_cosine"
    advice += ', or storage = "auto"' if storage != "auto" else ", or a larger [teachers] probe_samples"
    where = f" ({floor_from})" if floor_from else ""
    return (f"teacher '{layout.name}' stored as {kind.describe()} keeps a mean token cosine of {shown} on shard "
            f"{shard}, below {key}{where}; {advice}")
