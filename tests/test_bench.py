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


def test_memory_fits_a_line_and_names_the_smallest_card():
    """The fit and card arithmetic of `bench memory` on known figures: the line through the first
    two points, 90 % of a card usable, the paper's 8 + 8 split into k micro-batches."""
    from rsmtdf.bench.memory import GIB, accumulation_table, fit_line, smallest_card

    assert fit_line([(1, 3.0), (2, 5.0), (3, 100.0)]) == (1.0, 2.0)  # the third point only checks the line
    assert smallest_card(14 * GIB) == 16 and smallest_card(15 * GIB) == 24  # 16 GB: 14.4 GiB usable
    assert smallest_card(72 * GIB) == 80 and smallest_card(73 * GIB) is None
    table = accumulation_table(1 * GIB, 2 * GIB)
    assert {k: (r["micro_batch"], r["peak_bytes"] / GIB, r["card_gb"]) for k, r in table.items()} == {
        1: (8, 17.0, 24), 2: (4, 9.0, 16), 4: (2, 5.0, 16), 8: (1, 3.0, 16)}


def test_bench_memory_quick_reports_three_steps_the_fit_and_the_accumulation_table():
    """`bench memory` at the quick sizes: three measured micro-batches whose peaks are the model
    state + the step's inputs + the step's RSS rise (CPU), the line through the first two, and the
    paper's batch predicted from it per accumulation (figures themselves not judged)."""
    from rsmtdf.bench import run
    from rsmtdf.bench.memory import ACCUMULATION, accumulation_table, fit_line

    res = run(["memory"], "quick", "cpu", echo=lambda line: None)["parts"]["memory"]
    batches = res["sizes"]["batches"]
    assert batches == [1, 2, 3] and set(res["measured"]) == set(batches)
    state = sum(res["state_bytes"].values())
    assert set(res["state_bytes"]) == {"weights", "gradients", "optimizer", "ema"} and state > 0
    assert res["state_bytes"]["optimizer"] >= 2 * res["state_bytes"]["gradients"] > 0  # AdamW: two moments
    for b in batches:
        m = res["measured"][b]
        assert m["rss_rise_bytes"] > 0 and m["input_bytes"] > 0
        assert m["peak_bytes"] == state + m["input_bytes"] + m["rss_rise_bytes"]
    assert m["input_bytes"] == 3 * res["measured"][1]["input_bytes"]  # inputs are per sample
    fixed, per = fit_line([(b, res["measured"][b]["peak_bytes"]) for b in batches])
    assert (res["fit"]["fixed_bytes"], res["fit"]["per_pair_bytes"]) == (fixed, per)
    assert res["accumulation"] == accumulation_table(fixed, per) and list(res["accumulation"]) == list(ACCUMULATION)
    (name, check), = res["ratios"].items()
    assert "3 + 3" in name and check["predicted"] * 2**30 == fixed + 3 * per
    assert check["value"] * 2**30 == res["measured"][3]["peak_bytes"]
    assert "upper bound" in res["basis"] and "| 8 | 1 + 1 |" in res["markdown"]


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
