"""`rsmtdf inspect --stats`: statistics of caches written from known arrays equal the values
computed by hand; cross-view consistency on a real LoveDA cache, and its collapse when the stored
views are shuffled; rank-k features need k components; the CLI's table, JSON and errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import zarr
from scipy import optimize
from conftest import hand_identity, run_cli, write_recipe
from PIL import Image
from test_errors import error_line

from rsmtdf.cache import FeatureCache
from rsmtdf.cache.format import TeacherLayout
from rsmtdf.data.classes import ClassTable
from rsmtdf.data.datasets import open_dataset
from rsmtdf.inspect.stats import FP16_MAX, compute_stats, default_output, format_stats, linear_cka
from rsmtdf.data.splits import make_splits
from rsmtdf.transforms.views import View

SIZE, GRID = 32, 4  # 32² samples, a 4×4 token grid on the 32² crop: token (r, c) sits on pixel (8r + 4, 8c + 4)
CLASSES = ["a", "b", "c"]


def make_cache(tmp: Path, feats: dict[str, np.ndarray], views: list[View], storage: str = "float16",
               masks: np.ndarray | None = None) -> FeatureCache:
    """A finalized cache holding exactly `feats` ({teacher: (N, A, GRID², C)}) through the cache API, of
    a folder dataset of N samples whose masks are `masks` (N, SIZE, SIZE) when given."""
    n = next(iter(feats.values())).shape[0]
    ids = [f"s{i}" for i in range(n)]
    root = tmp / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, sid in enumerate(ids):
        Image.fromarray(np.full((SIZE, SIZE, 3), 100, np.uint8)).save(root / "images" / f"{sid}.png")
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8) if masks is None else masks[i]).save(root / "masks" / f"{sid}.png")
    classes = ClassTable(tuple(CLASSES), {**{k: k for k in range(len(CLASSES))}, 255: 255})  # 255 = ignore
    identity = hand_identity(ids, root, classes, {t: (GRID, x.shape[-1]) for t, x in feats.items()}, SIZE,
                             len(views), SIZE, storage)
    cache = FeatureCache.create(str(tmp / "cache"), ids, identity, {}, [TeacherLayout(t, GRID**2, x.shape[-1])
                                                                        for t, x in feats.items()], shard_samples=2)
    # the writer refuses non-finite features; the statistics must still count those a damaged or
    # hand-made store holds, so this constructed cache is written past that check
    with mock.patch.object(FeatureCache, "_check_finite", lambda *_: None):
        for k in range(cache.num_shards):
            r = cache.shard_range(k)
            cache.write_shard(k, np.stack([np.stack([v.to_array() for v in views]) for _ in r]),
                              {t: x[r.start : r.stop] for t, x in feats.items()})
    cache.finalize()
    return FeatureCache.open(tmp / "cache")


def stats_of(cache: FeatureCache, **kw) -> dict:
    d = cache.identity.dataset
    return compute_stats(cache, open_dataset(d.name, d.root, d.classes), progress=False, **kw)


def test_feature_statistics_equal_hand_computed_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, (3, 2, GRID**2, 6)).astype(np.float32)
    x[0, 0, 3] = 0.0  # one all-zero token: 6 zero values
    x[1, 1, 5, 2] = np.inf  # fp16 overflow, and a value at fp16's maximum: 2 saturated values
    x[2, 0, 7, 4] = FP16_MAX
    x[2, 1, 0, 0] = np.nan  # one chunk the reader refuses
    cache = make_cache(tmp_path, {"t": x}, [View(1.0, 0, 0), View(1.0, 0, 0, hflip=True)])
    f = stats_of(cache)["features"]["t"]

    stored = x.astype(np.float16).astype(np.float64)
    tokens = np.concatenate([stored[i, a] for i in range(3) for a in range(2) if (i, a) != (2, 1)])
    values = tokens.size
    tokens = tokens[np.isfinite(tokens).all(axis=1)]  # the infinite token is counted, not measured
    norms = np.linalg.norm(tokens, axis=1)
    assert f["chunks"] == 5 and f["nan_chunks"] == 1 and f["nonfinite_tokens"] == 1
    assert f["tokens"] == len(tokens) == 5 * GRID**2 - 1
    assert f["norm"]["min"] == pytest.approx(norms.min(), rel=1e-9) and f["norm"]["min"] == 0.0
    assert f["norm"]["max"] == pytest.approx(norms.max(), rel=1e-9) and f["norm"]["max"] > FP16_MAX
    for q in (1, 5, 25, 50, 75, 95, 99):
        assert f["norm"][f"p{q}"] == pytest.approx(np.percentile(norms, q), rel=1e-9)
    assert f["norm"]["mean"] == pytest.approx(norms.mean(), rel=1e-9)
    assert f["fraction"] == {"zero": 6 / values, "saturated": 2 / values, "nan_chunks": 1 / 6}
    assert np.allclose(f["channel_mean"], tokens.mean(axis=0), rtol=1e-9, atol=0)
    assert np.allclose(f["channel_var"], tokens.var(axis=0), rtol=1e-9, atol=0)


def test_int8_saturation_counts_values_at_the_clip(tmp_path: Path) -> None:
    x = np.zeros((2, 1, GRID**2, 8), np.float32)
    x[..., 0], x[..., 1], x[..., 2] = 4.0, -4.0, 1.0  # two channels at ±max: both at ±127
    x[1, 0, 0] = 0.0  # an all-zero token has nothing at the clip
    f = stats_of(make_cache(tmp_path, {"t": x}, [View(1.0, 0, 0)], storage="int8"))["features"]["t"]
    values = 2 * GRID**2 * 8
    assert f["fraction"]["saturated"] == (2 * (2 * GRID**2 - 1)) / values
    assert f["fraction"]["zero"] == (5 * (2 * GRID**2 - 1) + 8) / values


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_k_features_need_k_components(tmp_path: Path, k: int) -> None:
    rng = np.random.default_rng(k)
    basis = rng.normal(size=(k, 24))
    x = (rng.normal(size=(4, 2, GRID**2, k)) @ basis + rng.normal(size=24)).astype(np.float32)  # offset: centred away
    spectrum = stats_of(make_cache(tmp_path, {"t": x}, [View(1.0, 0, 0), View(1.0, 0, 0)]))["features"]["t"]["spectrum"]
    assert spectrum["components"]["0.999"] == k
    assert spectrum["components"]["0.9"] <= k and spectrum["explained"][k - 1] > 0.999


def test_rate_distortion_bound_by_reverse_water_filling_on_the_measured_spectrum(tmp_path: Path) -> None:
    """The bound at the default floor 0.99 (no floor recorded): the stored tokens' covariance
    eigenvalues water-filled at D = (1 − 0.99²) · E|x|² of the raw tokens, their mean included;
    beside it each kind's bytes per token, the cache's own (float16) marked."""
    rng = np.random.default_rng(5)
    scale = np.linspace(3.0, 0.1, 32)
    x = (rng.normal(size=(4, 2, GRID**2, 32)) * scale + 2.0).astype(np.float32)  # an offset: the mean counts in E|x|²
    result = stats_of(make_cache(tmp_path, {"t": x}, [View(1.0, 0, 0), View(1.0, 0, 0)]))
    tokens = x.astype(np.float16).astype(np.float64).reshape(-1, 32)
    values = np.linalg.eigvalsh(np.cov(tokens, rowvar=False, bias=True))
    distortion = (1 - 0.99**2) * (tokens**2).sum(axis=1).mean()
    theta = optimize.brentq(lambda t: np.minimum(t, values).sum() - distortion, 1e-12, values.max())
    bits = 0.5 * np.log2(np.maximum(values / theta, 1)).sum()
    b = result["rate_bound"]
    t = b["teachers"]["t"]
    assert b["cosine"] == 0.99 and b["group_size"] == 16 and t["stored"] == "float16"
    assert t["bits_per_token"] == pytest.approx(bits, rel=1e-6) and t["bytes_per_token"] == pytest.approx(bits / 8)
    assert t["bytes_per_view"] == pytest.approx(bits / 8 * GRID**2)
    assert t["kinds"] == {"float16": 64, "int8": 34, "int4": 16 + 4, "pca": 16}
    text = format_stats(result)
    assert "rate–distortion bound at token cosine 0.99" in text
    assert re.search(rf"t\s+{bits / 8:.1f} B\s+{bits / 8 * GRID**2 / 1e3:.1f} kB\s+64 \([\d.]+×\)\*", text), text
    fidelity = result["fidelity"]["t"]  # what the cache recorded of its float16 targets, None where it records none
    assert set(result["fidelity"]) == {"t"} and (fidelity is None or fidelity["mean_cosine"] > 0.9999)


def test_identical_views_are_consistent_and_scrambled_ones_are_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 1, GRID**2, 16)).astype(np.float32)
    flipped = base.reshape(4, 1, GRID, GRID, 16)[:, :, :, ::-1].reshape(4, 1, GRID**2, 16)  # the mirrored view's tokens
    x = np.concatenate([base, flipped], axis=1)
    c = stats_of(make_cache(tmp_path / "a", {"t": x}, [View(1.0, 0, 0), View(1.0, 0, 0, hflip=True)]))["consistency"]["t"]
    assert c["matched"]["mean"] == pytest.approx(1.0, abs=1e-3) and c["matched"]["pairs"] == 4 * GRID**2
    assert c["ok"] and c["gap"] > 0.5
    wrong = stats_of(make_cache(tmp_path / "b", {"t": x}, [View(1.0, 0, 0), View(1.0, 0, 0)]))["consistency"]["t"]
    assert not wrong["ok"]  # the second view said unflipped: positions compared are the mirrored ones


def test_teacher_agreement_cka_and_class_separation_by_hand(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    masks = rng.integers(0, 3, (3, GRID, GRID)).astype(np.uint8)
    masks[0, 0, 0] = 255  # an ignored token
    pixel_masks = np.kron(masks, np.ones((8, 8), np.uint8))  # one class per token cell
    centres = np.eye(3, 10) * 5
    a = (centres[np.where(masks == 255, 0, masks)] + rng.normal(size=(3, GRID, GRID, 10))).reshape(3, 1, GRID**2, 10)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    feats = {"a": a.astype(np.float32), "rot": (3 * a @ q).astype(np.float32),
             "noise": rng.normal(size=(3, 1, GRID**2, 10)).astype(np.float32)}
    r = stats_of(make_cache(tmp_path, feats, [View(1.0, 0, 0)], masks=pixel_masks))["agreement"]
    assert r["cka"]["a|rot"]["cka"] == pytest.approx(1.0, abs=1e-4) and r["cka"]["a|rot"]["positions"] == 3 * GRID**2
    assert r["cka"]["a|noise"]["cka"] < 0.5

    x = a.reshape(-1, 10).astype(np.float16).astype(np.float64)
    y = masks.reshape(-1)
    x, y = x[y != 255], y[y != 255]
    mu = x.mean(axis=0)
    between = sum((y == k).sum() * ((x[y == k].mean(0) - mu) ** 2).sum() for k in range(3))
    within = sum(((x[y == k] - x[y == k].mean(0)) ** 2).sum() for k in range(3))
    sep = r["separation"]["a"]
    assert sep["tokens"] == len(y) and sep["overall"] == pytest.approx(between / within, rel=1e-9)
    for k, name in enumerate(CLASSES):
        inside, rest = x[y == k], x[y != k]
        spread = inside.var(axis=0).sum() + rest.var(axis=0).sum()
        expected = ((inside.mean(0) - rest.mean(0)) ** 2).sum() / spread
        assert sep["classes"][name]["ratio"] == pytest.approx(expected, rel=1e-9)
        assert sep["classes"][name]["ratio"] > 3 * r["separation"]["noise"]["classes"][name]["ratio"]


def test_linear_cka_invariances() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, 2 * x @ q + 1) == pytest.approx(1.0)
    y = rng.normal(size=(200, 4))
    xc, yc = x - x.mean(0), y - y.mean(0)
    hsic = lambda k, m: np.trace(k @ m)  # noqa: E731 - CKA by its kernel definition, K = X Xᵀ
    kx, ky = xc @ xc.T, yc @ yc.T
    assert linear_cka(x, y) == pytest.approx(hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky)))


# ---- a real cache of the LoveDA sample with EfficientNet-Lite teachers -------------------------


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory, loveda_sample) -> Path:
    tmp = tmp_path_factory.mktemp("real")
    make_splits(open_dataset("loveda", loveda_sample), tmp / "splits")
    recipe = write_recipe(tmp / "r.toml", loveda_sample, tmp / "splits", views=4, crop=224,
                          teachers='["effnet_lite0", "effnet_lite1"]', sizes="{ effnet_lite1 = 112 }")
    recipe.write_text(recipe.read_text().replace("crop_size = 224", "crop_size = 224\nrot90 = true"))  # every geometry
    run_cli("extract-features", "-r", recipe, "-o", tmp / "cache", "--workers", "0", "--device", "cpu", check=True)
    return tmp / "cache"


def test_real_cache_views_line_up_and_shuffled_views_do_not(real_cache: Path, tmp_path: Path) -> None:
    proc = run_cli("inspect", real_cache, "--stats", check=True)
    result = json.loads(default_output(str(real_cache)).read_text())
    assert default_output(str(real_cache)) == real_cache.with_name("cache.stats.json")  # beside, not inside
    assert not list(real_cache.rglob("*.json.tmp")) and not (real_cache / "cache.stats.json").exists()
    assert result["samples"] == 8 and result["samples_with_mask"] == 8
    for name, c in result["consistency"].items():
        assert c["grid"]["method"] == "receptive field"
        assert c["ok"] and c["gap"] > 0.1 and c["matched"]["pairs"] > 300, (name, c["gap"])
    assert "NO GAP" not in proc.stdout and "inspected 8 samples × 4 views" in proc.stdout
    assert 0 < result["agreement"]["cka"]["effnet_lite0|effnet_lite1"]["cka"] < 1

    shuffled = tmp_path / "shuffled"
    shutil.copytree(real_cache, shuffled)
    views = zarr.open_group(str(shuffled), mode="r+")["views"]
    v = views[:]
    views[:] = v.reshape(-1, 5)[np.random.default_rng(0).permutation(v.shape[0] * v.shape[1])].reshape(v.shape)
    proc = run_cli("inspect", shuffled, "--stats", "--stats-out", tmp_path / "s.json", check=True)
    bad = json.loads((tmp_path / "s.json").read_text())
    for name, c in bad["consistency"].items():
        assert not c["ok"] and abs(c["gap"]) < 0.05, (name, c["gap"])
    assert proc.stdout.count("NO GAP") == 2


def test_samples_subset_is_seeded(real_cache: Path, tmp_path: Path) -> None:
    cache = FeatureCache.open(real_cache)
    one = compute_stats(cache, None, samples=3, seed=5, progress=False)
    two = compute_stats(cache, None, samples=3, seed=5, progress=False)
    assert one["samples"] == 3 and one["features"] == two["features"] and one["samples_with_mask"] == 0
    assert one["consistency"]["effnet_lite0"]["ok"]  # LoveDA tiles: the tile size places tokens without the dataset


@pytest.mark.parametrize("args, needle", [(["--stats", "--samples", "0"], "--samples 0"),
                                          (["--samples", "3"], "only with --stats")])
def test_stats_option_errors_are_one_line(real_cache: Path, args: list[str], needle: str) -> None:
    error_line(run_cli("inspect", real_cache, *args), needle)


def test_a_mask_that_cannot_be_read_is_reported_not_silently_dropped(tmp_path: Path) -> None:
    masks = np.zeros((3, SIZE, SIZE), np.uint8)
    masks[1, :4] = 7  # a code the class table neither names nor ignores: that mask is refused
    cache = make_cache(tmp_path, {"t": np.ones((3, 1, GRID**2, 4), np.float32)}, [View(1.0, 0, 0)], masks=masks)
    result = stats_of(cache)
    assert result["samples_with_mask"] == 2 and result["masks_unread"]["samples"] == 1
    assert "s1.png: mask code 7 (128 px)" in result["masks_unread"]["first"]
    out = run_cli("inspect", tmp_path / "cache", "--stats", check=True).stdout
    assert "masks not read for 1 of 3 samples" in out and "mask code 7" in out
