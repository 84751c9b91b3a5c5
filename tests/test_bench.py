"""`rsmtdf bench`: every part runs (quick sizes) and reports finite, positive ratios; figures not judged."""

from __future__ import annotations

import json
import math

from conftest import run_cli
from rsmtdf.bench import PARTS, median_time


def test_median_time_warms_up_and_takes_the_median(monkeypatch):
    """On a clock each call moves by a known duration: the two warm-up calls are not timed, the
    three timed ones are, and the median is theirs."""
    import rsmtdf.bench.common as common

    clock, durations = [0.0], iter([7.0, 9.0, 5.0, 1.0, 3.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += next(durations)
    r = median_time(call, repeats=3, warmup=2)
    assert r["times_s"] == [5.0, 1.0, 3.0] and r["median_s"] == 3.0


def test_bench_all_quick_writes_every_part(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "all", "--quick", "--threads", "1", "--out", out, check=True)
    assert "| step" in proc.stdout and "cpu" in proc.stdout.lower()
    res = json.loads(out.read_text())
    assert set(res["parts"]) == set(PARTS)
    assert res["machine"]["torch"] and res["machine"]["cores"] >= 1
    for part in PARTS:
        ratios = res["parts"][part]["ratios"]
        assert ratios, part
        for name, r in ratios.items():
            assert math.isfinite(r["value"]) and r["value"] > 0, (part, name, r)
            if "predicted" in r:
                assert math.isfinite(r["predicted"]) and r["predicted"] > 0, (part, name, r)


def test_bench_refuses_an_unknown_part():
    proc = run_cli("bench", "nonsense")
    assert proc.returncode == 2 and "choose one of" in proc.stderr


def test_feed_measures_the_model_step_where_it_can_and_predicts_it_elsewhere():
    """`bench feed` on a GPU times the model work it otherwise predicts from the FLOP count; the
    measuring path runs here on the CPU at the quick sizes."""
    from rsmtdf.bench.feed import FEED_SIZES, _model_step

    f = FEED_SIZES["quick"]
    predicted = _model_step(f, f["crop"], f["batch"], "cpu", measure=False)
    measured = _model_step(f, f["crop"], f["batch"], "cpu", measure=True, repeats=1)
    assert not predicted["measured"] and measured["measured"]
    assert predicted["flops"] == measured["flops"] > 0
    assert measured["step_s"] > 0 and "measured on this CPU" in measured["basis"]
    assert "predicted" in predicted["basis"]


def test_bench_storage_quick_bytes_cosines_bound_and_the_feed_variant(tmp_path):
    """`bench storage` at the quick size: every kind's bytes per (tile, view) at the paper's shapes and
    LoveDA's total against the arithmetic written out here, cosines in [0, 1], the bound below every
    kind; and `bench feed:pca`, whose targets hold pca's bytes. No timing is judged."""
    from rsmtdf.bench import run
    from rsmtdf.bench.storage import BENCHED

    res = run(["storage", "feed:pca"], "quick", "cpu", workdir=tmp_path, echo=lambda _: None)["parts"]
    kinds = res["storage"]["kinds"]
    per_token = {"float16": (768 * 2, 1024 * 2), "int8": (768 + 2, 1024 + 2), "int4 g=16": (384 + 96, 512 + 128),
                 "int4 g=64": (384 + 24, 512 + 32), "pca": (384, 512)}
    assert set(kinds) == set(BENCHED) == set(per_token)
    for label, (dino, clip) in per_token.items():
        k = kinds[label]
        assert k["bytes_per_view"] == 1369 * dino + 256 * clip, label
        assert k["loveda_bytes"] == 10_088 * 8 * k["bytes_per_view"]
        assert k["cosine"] and isinstance(k["met"], bool)
        for c in k["cosine"].values():
            assert 0 <= c["min_cosine"] <= c["p01_cosine"] <= 1 and 0 <= c["mean_cosine"] <= 1, (label, c)
        assert k["read_ms"] > 0 and k["decode_ms"] > 0
    assert kinds["pca"]["bytes_per_view"] == 656_768 and kinds["float16"]["bytes_per_view"] == 4 * 656_768
    assert set(kinds["int4 g=64"]["cosine"]) == {s for s in res["storage"]["bounds"] if "like" in s}  # 112 % 64 ≠ 0
    for s, b in res["storage"]["bounds"].items():
        assert b["kinds_bytes_per_token"]["pca"] == b["dim"] / 2  # the fitted basis: a quarter of float16
        assert 0 < b["bytes_per_token"] < b["kinds_bytes_per_token"]["pca"], s
    feed = res["feed:pca"]
    stored = {n: tuple(v) for n, v in feed["sizes"]["stored"].items()}
    for name, (tokens, dim, _) in feed["sizes"]["targets"].items():  # pca: (C/2 − 2) bytes of codes + a float16 scale
        assert stored[name][:2] == (tokens, (dim // 2 - 2) // 2) and stored[f"{name}-scale"][:2] == (tokens, 1)
    assert "targets decode (pca, device)" in feed["device_ms_per_step"]
    assert feed["ratios"]["loader cores per GPU"]["value"] > 0
