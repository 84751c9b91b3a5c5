"""`rsmtdf report`: the HTML page opened in a real headless Chromium loads without console errors and
with every image; the folder is replaced whole, and a folder that is not a report is refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli
from headless import find_browser, open_page
from PIL import Image
from test_errors import error_line, tree_hashes
from test_inspect_stats import CLASSES, GRID, make_cache

from rsmtdf.cache import FeatureCache
from rsmtdf.cache.storage import COSINE_EDGES, Fidelity
from rsmtdf.data.datasets import open_dataset
from rsmtdf.inspect.compact import fidelity_figure, share_below, stored_fidelity
from rsmtdf.inspect.html import write_report
from rsmtdf.transforms.views import View

VIEWS = [View(1.0, 0, 0), View(0.75, 2, 4, hflip=True), View(1.5, 10, 6, rot90=1)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> FeatureCache:
    """Two teachers over 5 samples with masks, written through the cache API."""
    tmp = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    feats = {"alpha": rng.normal(size=(5, 3, GRID**2, 12)).astype(np.float32),
             "beta": rng.normal(size=(5, 3, GRID**2, 20)).astype(np.float32)}
    masks = rng.integers(0, 3, (5, 32, 32)).astype(np.uint8)
    return make_cache(tmp, feats, VIEWS, masks=masks)


def _report(cache: FeatureCache, out: Path, gallery: int = 3) -> dict:
    return write_report(cache, open_dataset("folder", cache.attrs["dataset"]["root"], CLASSES), out, gallery=gallery,
                        progress=False)


def test_report_folder_holds_page_figures_gallery_and_json(cache: FeatureCache, tmp_path: Path) -> None:
    done = _report(cache, tmp_path / "rep")
    out = tmp_path / "rep"
    page = (out / "index.html").read_text()
    figures = ["norms.png", "channels.png", "spectrum.png", "consistency.png", "agreement.png"]
    figures += ["fidelity.png"] if any(stored_fidelity(cache).values()) else []  # caches that record it
    gallery = sorted(p.name for p in (out / "gallery").glob("*.png"))
    assert done["gallery"] == 3 * len(VIEWS) and len(gallery) == 3 * len(VIEWS) * 4  # view, 2 teachers, mask
    for name in figures + [f"gallery/{g}" for g in gallery]:
        assert f'src="{name}"' in page and Image.open(out / name).size[0] > 0
    assert page.count("<img ") == len(figures) + len(gallery)
    assert "http://" not in page and "https://" not in page  # nothing to fetch: it works offline
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"] == 5 and set(stats["features"]) == {"alpha", "beta"}
    # one PCA basis per teacher over the gallery: the pictures of a teacher span the full colour range together
    pics = np.stack([np.asarray(Image.open(out / "gallery" / g)) for g in gallery if g.endswith("_t0.png")])
    assert pics.reshape(-1, 3).min(axis=0).tolist() == [0, 0, 0] and pics.reshape(-1, 3).max(axis=0).tolist() == [255] * 3
    assert not list(tmp_path.glob(".rep.tmp-*"))

    _report(cache, out, gallery=1)  # an earlier report is replaced whole
    assert len(list((out / "gallery").glob("*.png"))) == len(VIEWS) * 4


def test_report_refuses_a_folder_that_is_not_a_report(cache: FeatureCache, tmp_path: Path) -> None:
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    before = tree_hashes(other)
    error_line(run_cli("report", cache.url, "-o", other, "--gallery", "1"), str(other), "not an rsmtdf report")
    assert tree_hashes(other) == before
    error_line(run_cli("report", cache.url, "-o", tmp_path / "r", "--gallery", "-1"), "--gallery -1")


def test_report_in_headless_chromium(cache: FeatureCache, tmp_path: Path) -> None:
    if find_browser() is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium; .ci/run installs it)")
    out = tmp_path / "rep"
    proc = run_cli("report", cache.url, "-o", out, "--gallery", "2", check=True)
    assert f"open {out / 'index.html'}" in proc.stdout
    shot = tmp_path / "screenshot.png"
    seen = open_page(out / "index.html", shot)
    assert seen["errors"] == []
    expected = (out / "index.html").read_text().count("<img ")
    figures = 5 + any(stored_fidelity(cache).values())  # the token-cosine figure where the cache records fidelity
    assert len(seen["images"]) == expected == figures + 2 * len(VIEWS) * 4
    assert all(width > 0 for _, width in seen["images"]), seen["images"]
    picture = Image.open(shot)
    assert picture.size[0] == 1200 and picture.size[1] > 600
    assert len(np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # figures, not a blank page

    (out / "gallery" / "s0_v0_t0.png").unlink()  # the same check sees a missing picture
    seen = open_page(out / "index.html", shot)
    assert dict(seen["images"])["gallery/s0_v0_t0.png"] == 0 and any("s0_v0_t0.png" in e for e in seen["errors"])


def _fidelity(cosines: np.ndarray) -> Fidelity:
    """A Fidelity of tokens whose stored vectors make exactly `cosines` with the full ones."""
    full = np.zeros((len(cosines), 4))
    full[:, 0] = 1.0
    stored = np.stack([cosines, np.sqrt(1 - cosines**2), np.zeros_like(cosines), np.zeros_like(cosines)], axis=1)
    f = Fidelity()
    f.add(torch.from_numpy(full), torch.from_numpy(stored))
    return f


def test_fidelity_figure_draws_the_share_of_tokens_below_each_cosine(tmp_path: Path) -> None:
    """The curve is the share of tokens below each bin edge, counted directly here; the figure is a PNG."""
    cosines = np.concatenate([np.random.default_rng(0).uniform(0.9, 1.0, 2000), [0.5, 0.97, 1.0]])
    f = _fidelity(cosines)
    edges, share = share_below(f)
    direct = (cosines[None, :] < edges[:, None] - 1e-12).mean(axis=1)
    np.testing.assert_allclose(share, direct, atol=1.5 / len(cosines))
    assert share[0] == 0 and share[-1] == pytest.approx((cosines < COSINE_EDGES[-2]).mean(), abs=1 / len(cosines))
    png = fidelity_figure({"alpha": f, "beta": _fidelity(np.ones(10))}, tmp_path / "fidelity.png", 0.99)
    assert Image.open(png).size[0] > 100


def test_report_draws_the_recorded_fidelity_or_says_the_cache_records_none(cache: FeatureCache, tmp_path: Path,
                                                                          monkeypatch) -> None:
    import rsmtdf.inspect.html as report

    monkeypatch.setattr(report, "stored_fidelity", lambda c: {"alpha": None, "beta": None})  # a cache from before
    _report(cache, tmp_path / "before", gallery=0)
    page = (tmp_path / "before" / "index.html").read_text()
    assert "this cache records none" in page and not (tmp_path / "before" / "fidelity.png").exists()
    monkeypatch.setattr(report, "stored_fidelity", lambda c: {"alpha": _fidelity(np.full(50, 0.995)), "beta": None})
    _report(cache, tmp_path / "after", gallery=0)
    page = (tmp_path / "after" / "index.html").read_text()
    assert 'src="fidelity.png"' in page and "records none" not in page
    assert Image.open(tmp_path / "after" / "fidelity.png").size[0] > 100


def test_stored_fidelity_is_what_the_cache_records_or_none() -> None:
    """A cache with `fidelity(name)` and the `fidelity/<name>` array gives its Fidelity; one from
    before (no such method or array) or with nothing measured yet gives None."""
    teachers = [SimpleNamespace(name=n) for n in ("a", "b", "c")]
    recorded = {"a": _fidelity(np.full(5, 0.99)), "c": Fidelity()}
    new = SimpleNamespace(identity=SimpleNamespace(teachers=teachers), group={"fidelity/a", "fidelity/c"},
                          fidelity=recorded.get)
    assert stored_fidelity(new) == {"a": recorded["a"], "b": None, "c": None}
    old = SimpleNamespace(identity=SimpleNamespace(teachers=teachers), group={"fidelity/a"})
    assert stored_fidelity(old) == {"a": None, "b": None, "c": None}
