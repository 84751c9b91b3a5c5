"""The storage kinds (rsmtdf/cache/storage.py): round trips, their edges, the fidelity record and
the rate–distortion bound, against definitions written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from rsmtdf.cache.storage import (COSINE_EDGES, QUANTISERS, Fidelity, Float16, Int4, Int8, Pca, distortion_at,
                                  gaussian_rate_bits, roundtrip, storage_kind)
from rsmtdf.errors import RsmtdfError


def _features(shape: tuple[int, ...], seed: int = 0, decay: float = 0.7) -> np.ndarray:
    """Correlated tokens with a power-law spectrum, like a ViT's (not i.i.d. channels)."""
    rng = np.random.default_rng(seed)
    dim = shape[-1]
    mix = rng.normal(size=(dim, dim)) * (np.arange(1, dim + 1) ** -decay)[None]
    return (rng.normal(size=shape) @ mix.T).astype(np.float32)


def _kinds(x: np.ndarray) -> list:
    return [Float16(), Int8(), Int4(8), Int4(16), Pca.fit(x.reshape(-1, x.shape[-1]))]


def _cosines(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(torch.from_numpy(a).double(), b.double(), dim=-1).numpy()


def test_each_kind_round_trips_with_its_shapes_dtypes_and_bytes():
    x = _features((2, 3, 50, 32))
    for kind in _kinds(x):
        parts = kind.encode(x)
        want = kind.parts(50, 32)
        assert set(parts) == set(want), kind
        for name, arr in parts.items():
            assert arr.shape == (2, 3, *want[name][0]) and arr.dtype == np.dtype(want[name][1]), (kind, name)
        assert sum(a.nbytes for a in parts.values()) == kind.bytes_per_token(32) * 2 * 3 * 50
        y = roundtrip(kind, x)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert _cosines(x, y).min() > 0.95, kind


def test_bytes_per_token_are_the_documented_ones():
    dim = 768
    assert Float16().bytes_per_token(dim) == 2 * dim
    assert Int8().bytes_per_token(dim) == dim + 2
    assert Int4(16).bytes_per_token(dim) == dim / 2 + 2 * dim / 16
    pca = Pca.fit(_features((400, dim)))
    assert pca.bytes_per_token(dim) == dim / 2  # a quarter of float16, scale included


def test_int4_matches_its_definition_at_group_edges():
    """Each group of g channels: scale = max|x| / 7 (float16), q = round(x / scale) in ±7; the
    nibbles low first. A group holding one channel's outlier leaves the next group's resolution alone."""
    x = _features((5, 48), seed=1)
    x[2, 15] = 400.0  # last channel of group 0 (g = 16)
    kind = Int4(16)
    y = roundtrip(kind, x).numpy()
    g = x.reshape(5, 3, 16)
    scale = (np.abs(g).max(-1, keepdims=True) / 7).astype(np.float16).astype(np.float32)
    want = (np.clip(np.rint(g / scale), -7, 7) * scale).reshape(5, 48)
    np.testing.assert_array_equal(y, want)
    rest = (x[2, 16:] - y[2, 16:]) ** 2
    assert rest.sum() / (x[2, 16:] ** 2).sum() < 0.01  # group 1 and 2 of the outlier's token untouched by it
    packed = kind.encode(x)[""]
    q = np.clip(np.rint(g / scale), -7, 7).reshape(5, 48).astype(np.int16) + 8
    np.testing.assert_array_equal(packed & 15, q[:, 0::2])
    np.testing.assert_array_equal(packed >> 4, q[:, 1::2])


def test_a_group_of_zeros_decodes_to_zeros():
    x = _features((4, 32), seed=2)
    x[1, :16] = 0.0
    x[3] = 0.0
    for kind in (Int8(), Int4(16), Float16()):
        y = roundtrip(kind, x).numpy()
        assert (y[1, :16] == 0).all() and (y[3] == 0).all(), kind
        assert np.isfinite(y).all()


def test_int4_refuses_groups_that_do_not_divide_the_channels():
    with pytest.raises(RsmtdfError, match="group_size"):
        Int4(24).check("clip_vitl14", 1000)
    with pytest.raises(RsmtdfError, match="group_size"):
        Int4(7).check("t", 56)
    Int4(16).check("t", 768)


def test_pca_spends_its_bytes_by_water_filling():
    """On a steep spectrum the largest components get 8 bits; on a flat one none do (every
    component at 4 bits but the four bytes' worth the scale takes)."""
    steep = _features((3000, 64), decay=1.2)
    flat = np.random.default_rng(3).normal(size=(3000, 64)).astype(np.float32)
    fitted = Pca.fit(steep)
    assert fitted.wide > 0 and fitted.bytes_per_token(64) == 32
    fitted = Pca.fit(flat)
    assert (fitted.wide, fitted.narrow) == (0, 60)


@pytest.mark.parametrize("size", [10, 200])
def test_a_token_with_one_huge_outlier_channel(size: float):
    """The per-token and per-group kinds keep it (its scale takes the outlier); pca, whose basis
    never saw such a token, keeps most of it and leaves the other tokens alone: this is what a
    cache's recorded minimum cosine shows, and `min_cosine` guards."""
    steep = _features((3000, 64), decay=1.2)
    x = steep[:200].copy()
    x[7, 3] += size * float(steep.std())
    for kind, floor in ((Int8(), 0.999), (Int4(16), 0.99), (Pca.fit(steep), 0.9)):
        cos = _cosines(x, roundtrip(kind, x))
        assert cos[7] > floor, kind
        assert np.delete(cos, 7).mean() > 0.995, kind


def test_pca_record_and_basis_rebuild_the_same_decoder():
    x = _features((2, 20, 32), seed=4)
    kind = Pca.fit(x.reshape(-1, 32))
    again = storage_kind(kind.record(), kind.basis())
    parts = {p: torch.from_numpy(v) for p, v in kind.encode(x).items()}
    torch.testing.assert_close(again.decode(parts), kind.decode(parts), rtol=0, atol=0)
    assert storage_kind({"kind": "int4", "group": 8}) == Int4(8)
    with pytest.raises(RsmtdfError, match="basis"):
        storage_kind({"kind": "pca", "wide": 0})


def test_quantiser_constants_are_the_least_error_uniform_quantisers_of_a_unit_gaussian():
    u = np.linspace(-12, 12, 1_000_001)
    p = stats.norm.pdf(u)

    def error(step: float, levels: int) -> float:
        q = np.clip(np.floor(u / step + levels / 2), 0, levels - 1)
        return float(np.trapezoid((u - (q + 0.5 - levels / 2) * step) ** 2 * p, u))

    for bits, (step, err) in QUANTISERS.items():
        best = optimize.minimize_scalar(lambda s: error(s, 2 ** bits), bounds=(1e-3, 1), method="bounded",
                                        options={"xatol": 1e-7})
        assert abs(best.x - step) / step < 1e-3 and abs(best.fun - err) / err < 1e-3


def test_fidelity_equals_a_direct_computation_and_merges():
    x = _features((3, 40, 32), seed=5)
    y = roundtrip(Int4(16), x)
    cos = _cosines(x, y).ravel()
    f = Fidelity()
    f.add(torch.from_numpy(x[:1]), y[:1])
    g = Fidelity()
    g.add(torch.from_numpy(x[1:]), y[1:])
    merged = Fidelity.from_vector((f + g).vector())
    rec = merged.record()
    assert rec["tokens"] == cos.size
    assert rec["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-12)
    assert rec["min_cosine"] == pytest.approx(cos.min(), abs=1e-12)
    assert rec["error_energy"] == pytest.approx(((x - y.numpy()) ** 2).sum() / (x ** 2).sum(), rel=1e-6)
    width = np.diff(COSINE_EDGES[-1001:]).max()
    assert np.percentile(cos, 1) - width <= rec["p01_cosine"] <= np.percentile(cos, 1) + 2 * width


def test_rate_distortion_bound_is_reverse_water_filling():
    # equal variances: R = n/2 log2(σ²/θ) with θ = D/n
    assert gaussian_rate_bits(np.ones(10), 1.0) == pytest.approx(5 * np.log2(10))
    # one component above the water level: θ = 1 takes the small ones whole
    v = np.array([16.0, 0.5, 0.5])
    assert gaussian_rate_bits(v, 2.0) == pytest.approx(0.5 * np.log2(16.0))
    assert gaussian_rate_bits(v, v.sum()) == 0.0
    assert distortion_at(0.99) == pytest.approx(0.0199)
