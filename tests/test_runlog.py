"""A training run's TensorBoard events hold every step's losses, mask ratio and learning rate, each
evaluation's mIoU and per-class IoU for student and EMA, pictures of validation tiles and the
recipe, read back with TensorBoard's own event reader; metrics.jsonl and curves.png are kept."""

from __future__ import annotations

import json

import pytest
from conftest import train_run


@pytest.fixture(scope="module")
def run(student_cache, tmp_path_factory):
    _, _, tmp = student_cache
    run_dir = tmp_path_factory.mktemp("runlog") / "run"
    train_run(student_cache, run_dir, "--max-steps", "3")
    return run_dir, tmp / "splits"


def test_tensorboard_holds_steps_evaluations_pictures_and_recipe(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, splits = run
    assert list(run_dir.glob("events.out.tfevents.*")), "no event file in the run folder"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for key in ("loss", "loss_sup", "loss_unsup", "loss_distill", "mask_ratio", "lr"):
        assert [e.step for e in events.Scalars(f"train/{key}")] == [1, 2, 3], key

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps])
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in steps])

    (evaluation,) = [r for r in rows if "eval" in r]
    classes = ("background", "building", "road", "water", "barren", "forest", "agriculture")
    for model, res in (("student", evaluation["eval"]), ("ema", evaluation["eval_ema"])):
        (miou,) = events.Scalars(f"val/{model}/mIoU")
        assert miou.step == 3 and miou.value == pytest.approx(res["mIoU"])
        logged = {t.rsplit("/", 1)[1] for t in scalars if t.startswith(f"val/{model}/IoU/")}
        present = {c for c, iou in zip(classes, res["IoU"]) if iou == iou}  # NaN: class absent from the tiles
        assert logged == present and present
        for name in present:
            assert events.Scalars(f"val/{model}/IoU/{name}")[0].value == pytest.approx(res["IoU"][classes.index(name)])
        images = [t for t in events.Tags()["images"] if t.startswith(f"val/{model}/")]
        val = (splits / "val.txt").read_text().split()
        assert len(images) == min(4, len(val)) > 0
        shot = events.Images(images[0])[0]
        assert shot.step == 3 and (shot.width, shot.height) == (3 * 512 + 2 * 4, 512)  # image | truth | prediction

    text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "translator_hidden = 64" in text and "effnet_lite1 = 28" in text
    assert (run_dir / "recipe.toml").read_text() in text  # the resolved recipe, also beside the run
    assert (run_dir / "curves.png").stat().st_size > 0


def test_evaluate_shows_a_progress_bar_over_tiles(run):
    from conftest import run_cli

    run_dir, splits = run
    proc = run_cli("evaluate", "--checkpoint", run_dir / "best.pt", "--split", "val", check=True)
    tiles = len((splits / "val.txt").read_text().split())
    assert "evaluate: 100%" in proc.stderr and f"{tiles}/{tiles} [" in proc.stderr, proc.stderr[-2000:]
