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
