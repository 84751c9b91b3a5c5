"""`--protocol reference`: the paper's code's evaluation on hand-built cases whose scores are computed
by hand here, and strict, self-explaining reports under either protocol."""

from __future__ import annotations

import json
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import model_identity, run_cli
from rsmtdf.models.checkpoint import save_checkpoint
from rsmtdf.data.classes import POTSDAM
from rsmtdf.data.datasets import open_dataset
from rsmtdf.evaluate.evaluator import PROTOCOLS, evaluate, predict, resolve_protocol
from rsmtdf.errors import RsmtdfError
from rsmtdf.evaluate.metrics import ConfusionMatrix, format_table
from rsmtdf.models.student import Student
from rsmtdf.config.recipe import EvalConfig, load_recipe


def cm_of(pairs: list[tuple[int, list[int]]], num_classes: int) -> ConfusionMatrix:
    """A matrix from (target, [predictions at pixels of that target]) pairs."""
    target = torch.tensor([t for t, preds in pairs for _ in preds])
    pred = torch.tensor([p for _, preds in pairs for p in preds])
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, target)
    return cm


# target 0 is the excluded class (as Potsdam's class 0 under the reference), 255 is ignore
PIXELS = [(0, [0, 1, 1]), (255, [2]), (1, [1, 1, 1, 2]), (2, [2, 2, 2, 0, 1])]


def test_reference_convention_by_hand():
    """Classes 1, 2 scored. Masked: I = (3, 3); outputs (c1 4, c2 4), targets (4, 5), so U = (5, 6):
    IoU 3/5, 3/6. The reference's precision divides by *every* predicted pixel, ignored ones too:
    c1 6, c2 5, so P = (1/2, 3/5), R = (3/4, 3/5), F1 = (3/5, 3/5). Kappa over the 9 scored pixels:
    p0 = 6/9, pe = (6*4 + 5*5)/81 = 49/81, kappa = 5/32."""
    m = cm_of(PIXELS, 3).compute(scored=[1, 2], convention="reference")
    assert m["mIoU"] == pytest.approx(100 * (3 / 5 + 3 / 6) / 2, rel=1e-9)
    assert m["IoU"][1:] == pytest.approx([60.0, 50.0], rel=1e-9)
    assert m["F1"][1:] == pytest.approx([60.0, 60.0], rel=1e-9)
    assert m["mF1"] == pytest.approx(60.0, rel=1e-9)
    assert m["OA"] == pytest.approx(100 * 6 / 9, rel=1e-9)
    assert m["kappa"] == pytest.approx(5 / 32, rel=1e-8)
    # the excluded class is still reported, from the full matrix: TP 1, truth 3, predicted 2
    assert m["IoU"][0] == pytest.approx(100 * 1 / 4) and m["scored"] == [1, 2] and m["absent"] == []


def test_rsmtdf_convention_on_the_same_pixels():
    """Ours counts only predictions at scored pixels: F1 = 2TP / (truth + predicted) = 6/8, 6/9;
    pe = (4*4 + 5*4)/81, kappa = (54 - 36) / (81 - 36) = 2/5. IoU is the same."""
    m = cm_of(PIXELS, 3).compute(scored=[1, 2])
    assert m["IoU"][1:] == pytest.approx([60.0, 50.0])
    assert m["F1"][1:] == pytest.approx([75.0, 200 / 3])
    assert m["kappa"] == pytest.approx(0.4)


def test_absent_class_is_zero_for_the_reference_and_left_out_for_us():
    pixels = PIXELS + [(3, [])]  # a fourth class with no truth and no prediction
    ref = cm_of(pixels, 4).compute(scored=[1, 2, 3], convention="reference")
    ours = cm_of(pixels, 4).compute(scored=[1, 2, 3])
    assert ref["mIoU"] == pytest.approx(100 * (3 / 5 + 3 / 6 + 0) / 3, rel=1e-9)
    assert ours["mIoU"] == pytest.approx(100 * (3 / 5 + 3 / 6) / 2)
    assert ref["absent"] == ours["absent"] == [3] and ref["IoU"][3] is None
    names = ["impervious", "building", "low vegetation", "tree"]
    assert format_table(ref, names).splitlines()[-1] == \
        "absent from truth and prediction (counted as 0 IoU in the means): tree"
    assert "impervious" in format_table(ref, names) and "(not scored)" in format_table(ref, names)


def test_two_class_maps_lead_with_the_foreground():
    m = cm_of([(0, [0] * 97), (1, [0] * 3)], 2).compute()  # never predicts the road
    table = format_table(m, ["background", "road"])
    assert table.splitlines()[0] == "foreground 'road': IoU 0.00, F1 0.00"
    assert m["mIoU"] == pytest.approx(48.5) and m["OA"] == pytest.approx(97.0)


# ---------------------------------------------------------------- the resize mode, by hand


class ChannelNet(nn.Module):
    """A 'model' whose class scores are its input's first two channels: what it sees is what it predicts."""

    patch = 14

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        self.sizes.append(tuple(x.shape[-2:]))
        return SimpleNamespace(logits=x[:, :2])


def line_tile() -> tuple[np.ndarray, np.ndarray]:
    """16×16, class 0 everywhere but a one-pixel column of class 1 at x = 5 (channel 1 = 1 there)."""
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 5] = 1
    image = np.stack([255 * (1 - mask), 255 * mask, np.zeros_like(mask)], axis=-1).astype(np.uint8)
    return image, mask


def test_reference_resize_mode_by_hand():
    """The reference resizes a 16 px tile to int(16/14 + 0.5) * 14 = 14 (bilinear, align_corners)
    and the logits back: the column's channel-1 value becomes 0.615 and 0.231 at the two samples
    beside x = 5 (at 4.615 and 5.769), and back at x = 5 (q = 4.333) 0.615 - 0.333 * 0.385 = 0.487
    < 0.5: the line vanishes. Padding to 28 keeps it."""
    image, mask = line_tile()
    x = torch.from_numpy(image / 255.0).float().permute(2, 0, 1)[None]
    net = ChannelNet()
    resized = predict(net, x, "whole", 14, 14, whole="resize").argmax(1)[0]
    assert net.sizes == [(14, 14)] and resized.sum() == 0
    padded = predict(net, x, "whole", 14, 14, whole="pad").argmax(1)[0]
    assert net.sizes[-1] == (28, 28) and torch.equal(padded, torch.from_numpy(mask).long())


def test_reference_sliding_sums_softmax():
    """Two windows over a 3-px overlap: window A scores (0, 0, -10), window B (0, -10, 3). Averaged
    logits (0, -5, -3.5) say class 0; summed probabilities (0.5 + 0.047, 0.5 + 0, 0 + 0.953) class 2."""

    class TwoWindows(nn.Module):
        patch = 1

        def forward(self, x):
            first = x[0, 0, 0, 0] > 0.5  # only the first window starts on the marked pixel
            value = torch.tensor([0.0, 0.0, -10.0]) if first else torch.tensor([0.0, -10.0, 3.0])
            return SimpleNamespace(logits=value.view(1, 3, 1, 1).expand(1, 3, *x.shape[-2:]))

    x = torch.zeros(1, 3, 1, 9)  # crop 6 at stride 4: windows at 0 and 3
    x[0, 0, 0, 0] = 1
    logits = predict(TwoWindows(), x, "sliding", 6, 1, sliding="logits").argmax(1)[0, 0]
    softmax = predict(TwoWindows(), x, "sliding", 6, 1, sliding="softmax").argmax(1)[0, 0]
    assert logits[3:6].tolist() == [0, 0, 0] and softmax[3:6].tolist() == [2, 2, 2]


def test_evaluate_reference_protocol_on_a_dataset_by_hand(tmp_path):
    """The same tile through `evaluate` with the reference protocol: all 256 pixels predicted 0, so
    IoU (240/256, 0/16); with the pad mode of ours, both 100."""
    image, mask = line_tile()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "t.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "t.png")
    dataset = open_dataset("folder", tmp_path, ["other", "line"])
    ref = evaluate(ChannelNet(), dataset, ["t"], 2, "cpu", "whole", 14, protocol=PROTOCOLS["reference"])
    assert ref["IoU"] == pytest.approx([100 * 240 / 256, 0.0], rel=1e-9)
    assert ref["mIoU"] == pytest.approx(100 * 240 / 256 / 2, rel=1e-9)
    ours = evaluate(ChannelNet(), dataset, ["t"], 2, "cpu", "whole", 14)
    assert ours["IoU"] == [100.0, 100.0]


# ---------------------------------------------------------------- the CLI, on a DWL-prepared Potsdam


def potsdam_folder(root, tiles: dict[str, np.ndarray]):
    """DWL's layout: image/<name>_RGB.tif and label/<name>_label.tif (index masks)."""
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    for name, mask in tiles.items():
        Image.fromarray(np.full((*mask.shape, 3), 128, np.uint8)).save(root / "image" / f"{name}_RGB.tif")
        Image.fromarray(mask).save(root / "label" / f"{name}_label.tif")
    return root


def constant_student(num_classes: int, cls: int) -> Student:
    """A student whose every pixel says `cls`: the head's last conv reduced to a bias."""
    torch.manual_seed(0)
    s = Student("vit_small_patch14_dinov2.lvd142m", num_classes, 28, [], embed_dim=48, depth=4, num_heads=3)
    last = s.head.output_conv[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(10 * torch.nn.functional.one_hot(torch.tensor(cls), num_classes).float())
    return s


@pytest.fixture()
def potsdam_checkpoint(tmp_path):
    a = np.zeros((28, 28), np.uint8)
    a[14:] = 1  # 392 impervious surface, 392 building
    b = np.full((28, 28), 2, np.uint8)
    b[:4, :4] = 255  # 768 low vegetation, 16 ignored
    root = potsdam_folder(tmp_path / "Potsdam", {"top_potsdam_2_10_1": a, "top_potsdam_2_10_2": b})
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "test.txt").write_text("top_potsdam_2_10_1_RGB\ntop_potsdam_2_10_2_RGB\n")
    names = list(POTSDAM.names)
    student, ema = constant_student(6, 1), constant_student(6, 2)
    recipe = load_recipe(None).override({"eval.reference_scored_classes": names[1:]}).to_dict()
    identity = model_identity(names, open_dataset("potsdam", root), splits)
    path = tmp_path / "run" / "best.pt"
    save_checkpoint({"identity": identity, "model": student.config, "split": "-", "student": student.state_dict(),
                     "ema": ema.state_dict(),
                     "recipe": json.dumps(recipe)}, path)
    return path


def strict(text: str) -> dict:
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_cli_reference_protocol_gives_the_hand_computed_numbers(potsdam_checkpoint):
    """Student says building everywhere, EMA low vegetation. The reference scores the student over
    classes 1-5 with class-0 truth ignored: I(building) = 392 of 1160 scored pixels, so IoU 392/1160,
    the rest 0 (tree, car, clutter absent: counted 0) -> mIoU = 392/1160/5. Its precision counts all
    1568 pixels predicted building: F1 = 2(1/4)(1)/(5/4) = 0.4 -> mF1 8. Kappa: p0 = 392/1160,
    pe = 1568*392/1160^2."""
    proc = run_cli("evaluate", "--checkpoint", potsdam_checkpoint, "--protocol", "reference", check=True)
    report = strict((potsdam_checkpoint.parent / "best-test-whole-reference.json").read_text())
    assert report["model"] == "student" and report["protocol"]["whole"] == "resize"
    assert report["scored_classes"] == ["building", "low vegetation", "tree", "car", "clutter"]
    assert report["absent_classes"] == ["tree", "car", "clutter"]
    assert report["mIoU"] == pytest.approx(100 * 392 / 1160 / 5, rel=1e-9)
    assert report["IoU"][1:3] == pytest.approx([100 * 392 / 1160, 0.0], rel=1e-9)
    assert report["IoU"][3:] == [None, None, None]
    assert report["IoU"][0] == 0.0  # impervious surface: reported (from the full matrix), not scored
    assert report["mF1"] == pytest.approx(8.0, rel=1e-9)
    p0, pe = Fraction(392, 1160), Fraction(1568 * 392, 1160**2)
    assert report["kappa"] == pytest.approx(float((p0 - pe) / (1 - pe)), rel=1e-8)
    # both models are reported: the EMA under the same protocol scores nothing (all low vegetation
    # -> IoU(low vegetation) = 768/1160, the rest 0)
    assert report["models"]["ema"]["mIoU"] == pytest.approx(100 * 768 / 1160 / 5, rel=1e-9)
    out = proc.stdout
    assert out.splitlines()[0].startswith("protocol reference: student model, whole tiles resized")
    assert "impervious surface" in out and "(not scored)" in out
    assert "absent from truth and prediction (counted as 0 IoU in the means): tree, car, clutter" in out
    assert "ema model: mIoU 13.24" in out


def test_cli_default_protocol_scores_the_ema_over_all_classes(potsdam_checkpoint):
    """Ours: EMA (low vegetation everywhere) over all six classes, the three absent ones left out:
    IoU(low vegetation) = 768/1552, impervious and building 0 -> mIoU over 3 classes; OA 768/1552;
    kappa 0 (a constant prediction agrees only by chance)."""
    run_cli("evaluate", "--checkpoint", potsdam_checkpoint, check=True)
    report = strict((potsdam_checkpoint.parent / "best-test-whole-rsmtdf.json").read_text())
    assert report["model"] == "ema" and len(report["scored_classes"]) == 6
    assert report["mIoU"] == pytest.approx(100 * 768 / 1552 / 3)
    assert report["OA"] == pytest.approx(100 * 768 / 1552)
    assert report["mF1"] == pytest.approx(100 * 2 * 768 / (768 + 1552) / 3)
    assert report["kappa"] == pytest.approx(0.0, abs=1e-12)
    assert report["absent_classes"] == ["tree", "car", "clutter"]
    assert report["models"]["student"]["mIoU"] == pytest.approx(100 * 392 / 1552 / 3)


def test_unknown_protocol_and_class_names_are_one_line(potsdam_checkpoint, tmp_path):
    proc = run_cli("evaluate", "--checkpoint", potsdam_checkpoint, "--protocol", "paper")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert lines == ["error: --protocol paper: choose one of rsmtdf, reference"]
    with pytest.raises(RsmtdfError, match="reference_scored_classes: 'roads' is not a class"):
        resolve_protocol("reference", EvalConfig(reference_scored_classes=("roads",)), list(POTSDAM.names))
