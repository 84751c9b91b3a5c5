"""ConfusionMatrix / format_table against hand-computed and independently computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rsmtdf.evaluate import metrics as metrics_mod
from rsmtdf.evaluate.metrics import ConfusionMatrix, format_table

# Hand-built 3-class example, rows = target, cols = prediction:
#     [[3, 1, 0],
#      [1, 2, 1],
#      [0, 0, 2]]
# total 10, TP = (3, 2, 2), target counts (4, 4, 2), prediction counts (4, 3, 3).
HAND = [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
# IoU = TP / (target + pred - TP): 3/5, 2/5, 2/3
EXP_IOU = [60.0, 40.0, 200 / 3]
EXP_MIOU = (60.0 + 40.0 + 200 / 3) / 3  # 55.5556
# F1 = 2TP / (target + pred): 6/8, 4/7, 4/5
EXP_F1 = [75.0, 400 / 7, 80.0]
EXP_MF1 = (75.0 + 400 / 7 + 80.0) / 3  # 70.7143
EXP_OA = 70.0  # 7 / 10
# pe = (4*4 + 4*3 + 2*3) / 100 = 0.34; kappa = (0.70 - 0.34) / (1 - 0.34) = 6/11
EXP_KAPPA = 6 / 11


def pairs_from_matrix(matrix: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (pred, target) label vectors realising a given confusion matrix."""
    pred, target = [], []
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            pred += [p] * count
            target += [t] * count
    return torch.tensor(pred), torch.tensor(target)


def test_hand_computed_three_class_example() -> None:
    pred, target = pairs_from_matrix(HAND)
    perm = torch.randperm(pred.numel(), generator=torch.Generator().manual_seed(0))
    cm = ConfusionMatrix(3)
    cm.update(pred[perm].reshape(2, 5), target[perm].reshape(2, 5))  # a 2-D "image"
    assert cm.matrix.tolist() == HAND
    assert cm.matrix.dtype == torch.int64
    m = cm.compute()
    assert m["IoU"] == pytest.approx(EXP_IOU)
    assert m["F1"] == pytest.approx(EXP_F1)
    assert m["mIoU"] == pytest.approx(EXP_MIOU)
    assert m["mF1"] == pytest.approx(EXP_MF1)
    assert m["OA"] == pytest.approx(EXP_OA)
    assert m["kappa"] == pytest.approx(EXP_KAPPA)
    assert m["pixels"] == 10 and isinstance(m["pixels"], int)


def test_ignore_index_pixels_are_skipped_whatever_the_prediction() -> None:
    pred, target = pairs_from_matrix(HAND)
    # Ignored pixels with predictions of every class; they must not change a single count.
    pred = torch.cat([pred, torch.tensor([0, 1, 2, 2])])
    target = torch.cat([target, torch.full((4,), 255)])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == HAND
    assert cm.compute()["pixels"] == 10
    assert cm.compute()["mIoU"] == pytest.approx(EXP_MIOU)

    custom = ConfusionMatrix(3, ignore_index=-1)
    custom.update(pred, torch.where(target == 255, -1, target))
    assert custom.matrix.tolist() == HAND


def test_perfect_prediction_scores_100_and_kappa_1() -> None:
    target = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    cm = ConfusionMatrix(4)
    cm.update(target.clone(), target)
    m = cm.compute()
    for key in ("mIoU", "mF1", "OA"):
        assert m[key] == pytest.approx(100.0)
    assert m["IoU"] == pytest.approx([100.0] * 4)
    assert m["F1"] == pytest.approx([100.0] * 4)
    assert m["kappa"] == pytest.approx(1.0)


def test_single_class_perfect_prediction_has_kappa_1_not_nan() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.ones(8, dtype=torch.long), torch.ones(8, dtype=torch.long))
    m = cm.compute()
    assert m["kappa"] == 1.0
    assert m["mIoU"] == pytest.approx(100.0)


def test_class_absent_everywhere_is_null_listed_and_excluded_from_means() -> None:
    pred, target = pairs_from_matrix(HAND)  # class 3 never appears
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    assert m["IoU"][3] is None and m["F1"][3] is None and m["absent"] == [3]
    json.loads(json.dumps(m, allow_nan=False))  # strict JSON: no bare NaN
    assert m["IoU"][:3] == pytest.approx(EXP_IOU)
    assert m["mIoU"] == pytest.approx(EXP_MIOU)  # mean over 3 classes, not (sum + 0) / 4
    assert m["mF1"] == pytest.approx(EXP_MF1)
    assert m["kappa"] == pytest.approx(EXP_KAPPA)


def test_class_present_only_in_target_counts_as_zero_not_nan() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 1]))  # class 2 never predicted
    m = cm.compute()
    assert m["IoU"][2] == 0.0 and m["F1"][2] == 0.0
    assert m["mIoU"] == pytest.approx((50.0 + 100.0 + 0.0) / 3)


def test_several_updates_equal_one_big_update() -> None:
    g = torch.Generator().manual_seed(2)
    preds = [torch.randint(0, 5, (3, 8, 8), generator=g) for _ in range(4)]
    targets = [torch.randint(0, 5, (3, 8, 8), generator=g) for _ in range(4)]
    for t in targets:
        t[t == 4] = 255  # sprinkle ignore pixels
    split, whole = ConfusionMatrix(5), ConfusionMatrix(5)
    for p, t in zip(preds, targets):
        split.update(p, t)
    whole.update(torch.cat(preds), torch.cat(targets))
    assert torch.equal(split.matrix, whole.matrix)
    assert split.matrix.sum().item() == sum(int((t != 255).sum()) for t in targets)
    a, b = split.compute(), whole.compute()
    assert a["pixels"] == b["pixels"]
    for key in ("mIoU", "OA", "kappa", "mF1"):
        assert a[key] == b[key]
    np.testing.assert_array_equal(a["IoU"], b["IoU"])  # class 4 is NaN (ignored) in both


def test_kappa_matches_independent_numpy_formula() -> None:
    rng = np.random.default_rng(3)
    target = rng.integers(0, 6, size=5000)
    # Correlated prediction so kappa is well away from 0.
    pred = np.where(rng.random(5000) < 0.6, target, rng.integers(0, 6, size=5000))
    po = np.mean(pred == target)
    pe = sum(np.mean(target == k) * np.mean(pred == k) for k in range(6))
    expected = (po - pe) / (1 - pe)
    cm = ConfusionMatrix(6)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    m = cm.compute()
    assert 0.3 < expected < 0.8
    assert m["kappa"] == pytest.approx(expected, rel=1e-12)
    assert m["OA"] == pytest.approx(100 * po, rel=1e-12)


def test_out_of_range_labels_and_shape_mismatch_raise() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))  # prediction 3 of 3 classes
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 5]))  # target 5, not ignore
    with pytest.raises(ValueError):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    assert cm.matrix.sum().item() == 0


def test_all_reduce_is_noop_without_distributed() -> None:
    pred, target = pairs_from_matrix(HAND)
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    cm.all_reduce()
    assert cm.matrix.tolist() == HAND


def test_all_reduce_sums_matrix_when_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_all_reduce(tensor: torch.Tensor, op: object) -> None:
        calls.append(op)
        tensor.mul_(2)  # as if a second rank held the same counts

    monkeypatch.setattr(metrics_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(metrics_mod.dist, "all_reduce", fake_all_reduce)
    pred, target = pairs_from_matrix(HAND)
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    cm.all_reduce()
    assert calls == [torch.distributed.ReduceOp.SUM] * 2  # the matrix and the ignored pixels' predictions
    assert cm.matrix.tolist() == [[2 * c for c in row] for row in HAND]
    assert cm.compute()["mIoU"] == pytest.approx(EXP_MIOU)


def test_format_table_lists_classes_and_scores() -> None:
    pred, target = pairs_from_matrix(HAND)
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    m = cm.compute()
    names = ["impervious", "building", "low vegetation", "tree"]
    table = format_table(m, names)
    for name in names:
        assert name in table
    assert f"{EXP_MIOU:.2f}" in table  # 55.56
    assert "60.00" in table and "75.00" in table and "70.00" in table and "0.55" in table
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "F1"]
    assert lines[4].split() == ["tree", "absent", "absent"]  # named, not silently dropped
    assert [line.split()[0] for line in lines[-5:-1]] == ["mIoU", "mF1", "OA", "kappa"]
    assert lines[-1] == "absent from truth and prediction (left out of the means): tree"
    with pytest.raises(ValueError):
        format_table(m, names[:3])
