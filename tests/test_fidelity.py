"""Input contracts: every pretrained network the project feeds gets its authors' preprocessing.

Random weights cannot reveal a wrong input, so each test feeds a real photograph through the
project's own path and compares the tensor that reaches the network's first layer (a pre-hook on the
patch embedding or stem conv, which also stops the forward there) with what the model's published
preprocessing makes of the same image: timm's data config and transforms, or, for CLIP, the
reference code's ImageNet-normalised 224 input. The image is given at the model's size so that both
sides resize nothing (or, for CLIP, resize the same way), and the tolerance stays tight.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as photos
from torch import nn
from torchvision import transforms

from rsmtdf.models.checkpoint import save_checkpoint
from rsmtdf.transforms.pixels import to_unit_rgb
from rsmtdf.errors import RsmtdfError
from rsmtdf.evaluate.evaluator import predict
from rsmtdf.models.student import Student, TeacherSlot
from rsmtdf.models.teachers import IMAGENET_MEAN, IMAGENET_STD, Teacher, teacher_config

from conftest import model_identity, run_cli

TOL = 1e-5
TINY_VIT = dict(embed_dim=48, depth=4, num_heads=3)


class _Reached(Exception):
    """Raised by the hook: the input is what we came for, the rest of the forward is not needed."""


def first_layer(model: nn.Module) -> tuple[str, nn.Conv2d]:
    return next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def first_layer_inputs(model: nn.Module, run: Callable[[], object], calls: int = 1) -> list[torch.Tensor]:
    """The tensors reaching `model`'s first conv during `run()`, stopping after `calls` of them."""
    _, conv = first_layer(model)
    seen: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append(args[0].detach().clone())
        if len(seen) == calls:
            raise _Reached

    handle = conv.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run()
    except _Reached:
        pass
    finally:
        handle.remove()
    assert len(seen) == calls, f"first layer reached {len(seen)} times, expected {calls}"
    return seen


def astronaut(size: int) -> np.ndarray:
    """A real photograph (skimage's astronaut) as H×W×3 uint8 at `size`², resized once, before both paths."""
    return np.array(Image.fromarray(photos.astronaut()).resize((size, size), Image.BICUBIC))


def unit(image: np.ndarray) -> torch.Tensor:
    """The project's own input path: raster → `to_unit_rgb` → (1, 3, H, W)."""
    return torch.from_numpy(to_unit_rgb(image)).permute(2, 0, 1)[None]


def timm_preprocess(model_name: str, image: np.ndarray) -> torch.Tensor:
    """timm's published eval transform for `model_name` at the image's own size (crop_pct 1, so the
    resize and centre crop are no-ops and only ToTensor + Normalize with the model's config act)."""
    config = timm.data.resolve_model_data_config(timm.create_model(model_name, pretrained=False))
    config = {**config, "input_size": (3, *image.shape[:2]), "crop_pct": 1.0}
    return timm.data.create_transform(**config, is_training=False)(Image.fromarray(image))[None]


# ---------------------------------------------------------------- the student


STUDENTS = [
    ("vit_small_patch14_dinov2.lvd142m", 56, TINY_VIT, "patch_embed.proj"),
    ("tf_efficientnet_lite0", 64, {}, "conv_stem"),
    ("resnet18", 64, {}, "conv1"),
]


@pytest.mark.parametrize(("encoder", "crop", "kwargs", "layer"), STUDENTS, ids=[s[0] for s in STUDENTS])
def test_student_encoder_sees_its_pretrained_normalisation(encoder, crop, kwargs, layer):
    """The bug this file exists for: the student was fed [0, 1] pixels. Fails on b672f42."""
    student = Student(encoder, num_classes=3, crop_size=crop, teachers=[], **kwargs).eval()
    assert first_layer(student.encoder.model)[0] == layer
    image = astronaut(crop)
    seen = first_layer_inputs(student.encoder.model, lambda: student(unit(image)))[0]
    expected = timm_preprocess(encoder, image)
    assert seen.shape == expected.shape
    assert (seen - expected).abs().max().item() < TOL


def test_evaluation_pads_in_unit_space_then_normalises():
    """Whole-tile evaluation pads [0, 1] pixels with 0 before the student normalises, as the reference
    pads before it normalises: the pad reaches the encoder as -mean/std."""
    student = Student(STUDENTS[0][0], num_classes=3, crop_size=56, teachers=[], **TINY_VIT).eval()
    image = astronaut(50)
    seen = first_layer_inputs(student.encoder.model, lambda: predict(student, unit(image), "whole", 56, 14))[0]
    assert seen.shape[-2:] == (56, 56)
    expected = timm_preprocess(STUDENTS[0][0], image)
    assert (seen[..., :50, :50] - expected).abs().max().item() < TOL
    pad = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    assert (seen[..., 50:, :] - pad).abs().max().item() < TOL


def test_student_second_pass_at_clips_size_matches_the_reference():
    """The reference resizes the normalised crop to 224 (bilinear, align_corners) for the student's
    CLIP-sized pass; resizing [0, 1] first and normalising after is the same to float rounding."""
    clip = TeacherSlot("clip", dim=8, grid=4, input_size=56)
    student = Student(STUDENTS[0][0], num_classes=3, crop_size=70, teachers=[clip], **TINY_VIT).eval()
    image = astronaut(70)
    first, second = first_layer_inputs(student.encoder.model, lambda: student(unit(image)), calls=2)
    normalised = timm_preprocess(STUDENTS[0][0], image)
    assert (first - normalised).abs().max().item() < TOL
    reference = F.interpolate(normalised, size=(56, 56), mode="bilinear", align_corners=True)
    assert (second - reference).abs().max().item() < TOL


def test_checkpoint_config_carries_the_normalisation_and_it_is_used():
    student = Student("resnet18", num_classes=3, crop_size=64, teachers=[])
    assert student.config["input_mean"] == list(IMAGENET_MEAN)
    assert student.config["input_std"] == list(IMAGENET_STD)
    assert "input_mean" not in student.state_dict()  # weights load as before; the config carries it
    # a model trained with other statistics is rebuilt with those, not with timm's
    config = json.loads(json.dumps({**student.config, "input_mean": [0.1, 0.2, 0.3], "input_std": [0.5, 0.25, 2.0]}))
    rebuilt = Student.from_config(config).eval()
    image = astronaut(64)
    seen = first_layer_inputs(rebuilt.encoder.model, lambda: rebuilt(unit(image)))[0]
    expected = transforms.Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])(transforms.ToTensor()(image))[None]
    assert (seen - expected).abs().max().item() < TOL


def test_a_config_without_normalisation_is_refused():
    config = Student("resnet18", num_classes=3, crop_size=64, teachers=[]).config
    old = {k: v for k, v in config.items() if k not in ("input_mean", "input_std")}
    with pytest.raises(RsmtdfError, match="old.pt: the model config records no input normalisation"):
        Student.from_config(old, source="old.pt")


def test_evaluate_refuses_a_checkpoint_without_normalisation_in_one_line(tmp_path):
    student = Student("resnet18", num_classes=3, crop_size=64, teachers=[])
    old = {k: v for k, v in student.config.items() if k not in ("input_mean", "input_std")}
    path = tmp_path / "old.pt"
    save_checkpoint({"identity": model_identity(["a", "b", "c"]), "model": old, "split": "-",
                     "ema": student.state_dict(), "student": student.state_dict(),
                     "recipe": "{}"}, path)
    proc = run_cli("evaluate", "--checkpoint", path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert lines == [f"error: {path}: the model config records no input normalisation (a checkpoint from before "
                     "the student normalised its own input, trained on unnormalised pixels); retrain it"]


# ---------------------------------------------------------------- the teachers


@pytest.mark.parametrize(("name", "layer"), [("dinov2_vitb14", "patch_embed.proj"), ("effnet_lite0", "conv_stem"),
                                             ("effnet_lite1", "conv_stem"), ("dinov3_vitl16_sat", "patch_embed.proj")])
def test_timm_teacher_sees_timms_published_preprocessing(name, layer):
    config = teacher_config(name)
    teacher = Teacher(config, pretrained=False)
    assert first_layer(teacher.model)[0] == layer
    image = astronaut(config.input_size)
    seen = first_layer_inputs(teacher.model, lambda: teacher.targets(unit(image)))[0]
    expected = timm_preprocess(config.model, image)
    assert (seen - expected).abs().max().item() < TOL


def test_clip_teacher_sees_the_reference_codes_input():
    """The reference feeds CLIP the ImageNet-normalised 518 crop resized to 224 (bilinear,
    align_corners=True), not open_clip's own preprocessing (OpenAI mean/std, bicubic resize): the
    recipes say so and the README lists it. This pins the reference's quirk exactly."""
    import open_clip

    teacher = Teacher(teacher_config("clip_vitl14"), pretrained=False)
    assert first_layer(teacher.model)[0] == "conv1"
    image = astronaut(518)
    seen = first_layer_inputs(teacher.model, lambda: teacher.targets(unit(image)))[0]
    normalised = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(image))[None]
    expected = F.interpolate(normalised, size=(224, 224), mode="bilinear", align_corners=True)
    assert seen.shape == (1, 3, 224, 224)
    assert (seen - expected).abs().max().item() < TOL
    # and open_clip's published statistics are indeed other ones (the quirk is a real difference)
    assert tuple(open_clip.OPENAI_DATASET_MEAN) != tuple(teacher.config.mean)


def test_clip_teacher_at_its_size_with_openai_statistics_is_open_clips_preprocessing():
    """With open_clip's own statistics and an image already at 224, the teacher's input is exactly what
    open_clip's published `image_transform` makes of it."""
    import open_clip

    config = replace(teacher_config("clip_vitl14"), mean=tuple(open_clip.OPENAI_DATASET_MEAN),
                     std=tuple(open_clip.OPENAI_DATASET_STD))
    teacher = Teacher(config, pretrained=False)
    image = astronaut(224)
    seen = first_layer_inputs(teacher.model, lambda: teacher.targets(unit(image)))[0]
    expected = open_clip.image_transform(224, is_train=False)(Image.fromarray(image))[None]
    assert (seen - expected).abs().max().item() < TOL


def test_dinov2_student_interpolates_position_embeddings_as_dinov2_does():
    """At another grid (the 224 pass: 16×16 of a 518-trained 37×37 embedding) the student adds
    DINOv2's interpolation of its position embedding: bicubic, no antialias, scale (16 + 0.1) / 37,
    as the reference's backbone; timm's default (antialias, size 16) would differ."""
    from timm.layers import resample_abs_pos_embed

    student = Student(STUDENTS[0][0], num_classes=3, crop_size=518, teachers=[], **TINY_VIT).eval()
    vit = student.encoder.model
    seen: dict[str, torch.Tensor] = {}
    vit.patch_embed.register_forward_hook(lambda _m, _a, out: seen.__setitem__("patches", out.detach()))
    vit.blocks[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("tokens", args[0].detach()))
    with torch.no_grad():
        vit.forward_intermediates(torch.rand(1, 3, 224, 224), indices=[0], intermediates_only=True)
    pos = vit.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    dinov2 = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    expected_pos = torch.cat([pos[:, :1], dinov2.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    patches = seen["patches"].reshape(1, 256, -1)
    expected = torch.cat([vit.cls_token, patches], dim=1) + expected_pos
    assert (seen["tokens"] - expected).abs().max().item() < 1e-6
    timm_pos = resample_abs_pos_embed(pos, new_size=(16, 16), old_size=(37, 37), num_prefix_tokens=1)
    assert (timm_pos - expected_pos).abs().max().item() > 1e-4  # the two really differ
