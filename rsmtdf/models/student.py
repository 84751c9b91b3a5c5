"""The student: a timm encoder, the paper's teacher-feature fusion and a DPT decoder.

RS-MTDF distils the student's deepest feature toward each frozen teacher through a translator MLP
and fuses the translated features back into that feature before the decoder. Teachers never live in
this module: their targets come from the cache (or an online teacher) and are compared with
`StudentOutput.translated` by the training loss.

Every caller feeds its bands in [0, 1] (`scaling.BandScaling`, padded with 0; RGB first); the student
applies its encoder's pretrained mean/std (and, for bands past RGB, the bands' recorded statistics)
itself, so training, pseudo-labels, evaluation and mapping cannot forget it. `config["scaling"]`
records how pixels were scaled to [0, 1], so every checkpoint carries it.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.models import is_model_in_modules
from torch import Tensor, nn

from ..errors import RsmtdfError
from .weights import WeightSource, load_weights, resolve_weights

# DPT decoder sizes as in Depth-Anything / UniMatch-V2: (features, per-level out_channels).
DECODERS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "small": (64, (48, 96, 192, 384)),
    "base": (128, (96, 192, 384, 768)),
}
CNN_STRIDES = (4, 8, 16, 32)
# The autocast dtype a trained student runs at outside training, by device type: one policy for
# evaluation (in training too) and mapping, so a map and its scores come from the same arithmetic.
INFERENCE_AUTOCAST: dict[str, torch.dtype] = {"cuda": torch.bfloat16}


def inference_precision(device: str | torch.device) -> contextlib.AbstractContextManager:
    """The precision evaluation and mapping run the student at on `device` (`INFERENCE_AUTOCAST`):
    bf16 autocast on CUDA, as training's forward; float32 elsewhere."""
    kind = torch.device(device).type
    dtype = INFERENCE_AUTOCAST.get(kind)
    return contextlib.nullcontext() if dtype is None else torch.autocast(kind, dtype=dtype)


def _resize(x: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    """Bilinear resize that skips the no-op, so equal sizes stay bit-identical."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class Encoder(nn.Module):
    """Any timm ViT or CNN as four NCHW feature maps, through timm's `forward_intermediates`.

    A ViT (timm's `vision_transformer` family, e.g. DINOv2-S/14) gives four evenly spaced blocks
    ending at the last (2, 5, 8, 11 for depth 12) after the final norm, all at the patch stride, and
    takes any input size divisible by the patch (the student also runs at CLIP's 224). A CNN gives
    its feature maps at strides 4, 8, 16, 32. Layers past the last tap are pruned, so every
    parameter receives a gradient (DDP needs no unused-parameter search).
    """

    def __init__(self, name: str, img_size: int, pretrained: WeightSource | str | Path | None = None, **timm_kwargs: Any):
        super().__init__()
        self.is_vit = is_model_in_modules(name, ["vision_transformer"])
        if self.is_vit:
            timm_kwargs = {"img_size": img_size, "dynamic_img_size": True, **timm_kwargs}
        path, layout = self._weights_file(name, pretrained)
        if layout == "native":
            # timm's own loader runs the model's checkpoint filter, which e.g. resamples DINOv2's
            # position embedding (trained at 518) to this crop size.
            try:
                self.model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **timm_kwargs)
            except (RuntimeError, KeyError, ValueError) as exc:
                raise RsmtdfError(f"{path}: does not fit '{name}' ({str(exc).splitlines()[0]})") from None
        else:
            self.model = timm.create_model(name, pretrained=False, **timm_kwargs)
            if path is not None:
                load_weights(self.model, path, layout)

        info = self.model.feature_info
        if self.is_vit:
            depth = len(self.model.blocks)
            self.indices = [round((i + 1) * depth / 4) - 1 for i in range(4)]
            self.patch = self.model.patch_embed.patch_size[0]
        else:
            reductions = [f["reduction"] for f in info]
            missing = [s for s in CNN_STRIDES if s not in reductions]
            if missing:
                raise RsmtdfError(f"encoder '{name}' has no feature map at stride {missing[0]}; a CNN needs strides {CNN_STRIDES}")
            self.indices = [max(i for i, r in enumerate(reductions) if r == s) for s in CNN_STRIDES]
            self.patch = CNN_STRIDES[-1]
        self.channels: list[int] = [info[i]["num_chs"] for i in self.indices]
        self.reductions: list[int] = [info[i]["reduction"] for i in self.indices]
        self.model.prune_intermediate_layers(self.indices, prune_norm=not self.is_vit, prune_head=True)
        if self.is_vit and "dinov2" in name:
            self.model._pos_embed = partial(_dinov2_pos_embed, self.model, self.model._pos_embed)

    @staticmethod
    def _weights_file(name: str, pretrained: WeightSource | str | Path | None) -> tuple[Path | None, str | None]:
        """(file, layout) for the requested weights; a plain path is a native timm state dict."""
        if pretrained is None:
            return None, None
        if isinstance(pretrained, WeightSource):
            return resolve_weights(name, pretrained), pretrained.layout
        return resolve_weights(name, WeightSource(), pretrained), "native"

    def forward(self, x: Tensor) -> list[Tensor]:
        """Four maps (B, C_i, H / r_i, W / r_i), shallow to deep."""
        return self.model.forward_intermediates(x, indices=self.indices, norm=True, intermediates_only=True)


def _dinov2_pos_embed(vit: nn.Module, timm_pos_embed: Any, x: Tensor) -> Tensor:
    """timm's `_pos_embed` for a DINOv2 ViT, with DINOv2's own `interpolate_pos_encoding` at other
    grid sizes (the student's 224 pass for CLIP, odd tiles): bicubic without antialias at scale
    (n + 0.1) / N, as the reference runs it, where timm would resample with antialias to size n."""
    B, H, W, C = x.shape
    gh, gw = vit.patch_embed.grid_size
    if (H, W) == (gh, gw) or vit.pos_embed is None:
        return timm_pos_embed(x)
    n = 0 if vit.no_embed_class else vit.num_prefix_tokens
    prefix, grid = vit.pos_embed[:, :n], vit.pos_embed[:, n:]
    grid = grid.float().reshape(1, gh, gw, C).permute(0, 3, 1, 2)
    if torch.compiler.is_exporting():  # ONNX: the same resampling with H and W kept symbolic
        grid = _bicubic_at_scale(grid, H, W)
    else:
        grid = F.interpolate(grid, scale_factor=((H + 0.1) / gh, (W + 0.1) / gw), mode="bicubic", antialias=False)
    pos = torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, H * W, C).to(prefix.dtype)], dim=1)
    tokens = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    x = x.reshape(B, H * W, C)
    x = torch.cat([*tokens, x + pos], dim=1) if vit.no_embed_class else torch.cat([*tokens, x], dim=1) + pos
    return vit.pos_drop(x)


def _bicubic_at_scale(grid: Tensor, H: Any, W: Any) -> Tensor:
    """`F.interpolate(scale_factor=(H + 0.1) / gh, ...)` as a `grid_sample` whose sampling points are
    computed from H and W, so an export keeps them symbolic (interpolate's float scale would be
    frozen at the example's size). Equal to interpolate in float64 to 1e-7; the exported model
    matches PyTorch's logits to 5e-7 (tests/test_export.py)."""
    gh, gw = grid.shape[-2:]

    def points(n: Any, old: int) -> Tensor:  # at n == old DINOv2 keeps the embedding: scale 1 here
        k = torch.arange(n, dtype=grid.dtype, device=grid.device)
        size = torch.full((), n, dtype=grid.dtype, device=grid.device)
        return (k + 0.5) * old / (size + 0.1 * (size != old).to(grid.dtype)) * 2 / old - 1

    ys, xs = points(H, gh), points(W, gw)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return F.grid_sample(grid, torch.stack([xx, yy], -1)[None], mode="bicubic", padding_mode="border",
                         align_corners=False)


class ResidualConvUnit(nn.Module):
    """ReLU-conv-ReLU-conv with a skip connection (RefineNet)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """One DPT refinement step: add the refined skip, refine, upsample, 1x1 conv.

    The deepest block has no skip input, so it gets no skip unit (the reference builds one it never
    uses, which would leave parameters without gradients).
    """

    def __init__(self, features: int, with_skip: bool):
        super().__init__()
        self.skip_unit = ResidualConvUnit(features) if with_skip else None
        self.unit = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if self.skip_unit is not None:
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """DPT decoder (Depth-Anything / UniMatch-V2) over four feature maps.

    Single-stride ViT features are first brought to strides /4, /2, x1, x2 of the patch grid; CNN
    features already sit at four strides and pass through unchanged.
    """

    def __init__(self, in_channels: list[int], num_classes: int, features: int, out_channels: tuple[int, ...], single_stride: bool):
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(in_channels, out_channels))
        if single_stride:
            o = out_channels
            resize = [nn.ConvTranspose2d(o[0], o[0], 4, stride=4), nn.ConvTranspose2d(o[1], o[1], 2, stride=2),
                      nn.Identity(), nn.Conv2d(o[3], o[3], 3, stride=2, padding=1)]
        else:
            resize = [nn.Identity() for _ in out_channels]
        self.resize_layers = nn.ModuleList(resize)
        self.layers_rn = nn.ModuleList(nn.Conv2d(o, features, 3, padding=1, bias=False) for o in out_channels)
        self.refine = nn.ModuleList(FusionBlock(features, with_skip=i < 3) for i in range(4))
        self.output_conv = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1), nn.ReLU(True), nn.Conv2d(features, num_classes, 1)
        )

    def forward(self, feats: list[Tensor]) -> Tensor:
        """Logits at twice the resolution of the shallowest level."""
        layers = [rn(rs(pr(f))) for f, pr, rs, rn in zip(feats, self.projects, self.resize_layers, self.layers_rn)]
        path = self.refine[3](layers[3], size=layers[2].shape[-2:])
        for i in (2, 1, 0):
            path = self.refine[i](path, layers[i], size=layers[i - 1].shape[-2:] if i else None)
        return self.output_conv(path)


@dataclass(frozen=True)
class TeacherSlot:
    """What the student must know of a teacher: its token dimension, grid and input size."""

    name: str
    dim: int  # d_t, channels of a target token
    grid: int  # tokens per side of the target
    input_size: int  # side of the image the teacher sees


class StudentOutput(NamedTuple):
    logits: Tensor  # (B, num_classes, H, W)
    translated: dict[str, Tensor]  # teacher name -> T_t(f_t) as (B, grid_t^2, d_t), row-major tokens


def _translator(d_s: int, hidden: int, d_t: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_s, hidden), nn.ReLU(), nn.Linear(hidden, d_t))


class Student(nn.Module):
    """Encoder + per-teacher translators and projections + DPT head.

    The deepest feature f becomes `w_self * f + w_teacher * sum_t resize(P_t(T_t(f_t)))`, where
    f_t is the deepest feature of the input resized to the teacher's input size and T_t runs
    token-wise on f_t's grid; resize(T_t(f_t)) to the teacher's grid is what is distilled (the paper runs the
    student again on the 224 view for CLIP). With no teachers it is a plain DPT segmenter.
    """

    def __init__(
        self,
        encoder: str,
        num_classes: int,
        crop_size: int,
        teachers: list[TeacherSlot],
        decoder: str = "small",
        fusion_weights: tuple[float, float] = (0.8, 0.1),
        translator_hidden: int = 1024,
        pretrained: WeightSource | str | Path | None = None,
        input_mean: tuple[float, ...] | None = None,
        input_std: tuple[float, ...] | None = None,
        scaling: dict | None = None,
        extra_norm: tuple[tuple[float, ...], tuple[float, ...]] = ((), ()),
        **timm_kwargs: Any,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise RsmtdfError(f"unknown decoder '{decoder}': choose one of {sorted(DECODERS)}")
        for t in teachers:
            if "." in t.name or not t.name:
                raise RsmtdfError(f"teacher name '{t.name}' must be non-empty and contain no '.'")
        self.teachers = list(teachers)
        self.w_self, self.w_teacher = fusion_weights
        self.encoder = Encoder(encoder, crop_size, pretrained, **timm_kwargs)
        if input_mean is None or input_std is None:
            # the statistics the encoder was pretrained with, as timm publishes them for it
            # and, for input bands past RGB (`in_chans` > 3), `extra_norm`: their (means, stds)
            data = timm.data.resolve_model_data_config(self.encoder.model)
            input_mean, input_std = (*data["mean"], *extra_norm[0]), (*data["std"], *extra_norm[1])
        self.config: dict[str, Any] = {
            "encoder": encoder, "num_classes": num_classes, "crop_size": crop_size,
            "teachers": [asdict(t) for t in teachers], "decoder": decoder,
            "fusion_weights": [float(w) for w in fusion_weights], "translator_hidden": translator_hidden,
            "input_mean": [float(v) for v in input_mean], "input_std": [float(v) for v in input_std],
            "scaling": scaling, "timm_kwargs": dict(timm_kwargs),
        }
        # not in the state dict: the config carries them, so a checkpoint's weights load as before
        self.register_buffer("input_mean", torch.tensor(self.config["input_mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(self.config["input_std"]).view(1, -1, 1, 1), persistent=False)
        features, out_channels = DECODERS[decoder]
        self.head = DPTHead(self.encoder.channels, num_classes, features, out_channels, single_stride=self.encoder.is_vit)
        d_s = self.encoder.channels[-1]
        self.translators = nn.ModuleDict({t.name: _translator(d_s, translator_hidden, t.dim) for t in teachers})
        self.projections = nn.ModuleDict({t.name: nn.Linear(t.dim, d_s) for t in teachers})

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str | Path = "model config") -> Student:
        """Rebuild (randomly initialised) the model a checkpoint's `config` describes, with the input
        normalisation it records (never re-resolved: the weights were trained with that one)."""
        if "input_mean" not in config or "input_std" not in config:
            raise RsmtdfError(f"{source}: the model config records no input normalisation (a checkpoint from "
                              "before the student normalised its own input, trained on unnormalised pixels); retrain it")
        kwargs = dict(config)
        kwargs["teachers"] = [TeacherSlot(**t) for t in kwargs["teachers"]]
        kwargs["fusion_weights"] = tuple(kwargs["fusion_weights"])
        return cls(**kwargs.pop("timm_kwargs"), **kwargs)

    @property
    def patch(self) -> int:
        return self.encoder.patch

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything outside the encoder (head, translators, projections): the x40 learning rate."""
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def forward(self, x: Tensor) -> StudentOutput:
        """Logits and translated features for its bands in [0, 1] (B, C, H, W), RGB first."""
        x = (x - self.input_mean) / self.input_std
        feats = self.encoder(x)
        f = feats[-1]
        translated: dict[str, Tensor] = {}
        if self.teachers:
            # one encoder run per input size, keyed by teacher size (None: the input's own size) rather
            # than by shape, so the key is a plain int under torch.export's symbolic shapes (ONNX export)
            deepest: dict[int | None, Tensor] = {None: f}
            fused = 0
            for t in self.teachers:
                # a teacher at the crop size reads the student's own pass, whatever the input size
                # (whole tiles at evaluation); others see the input resized to their size (CLIP: 224)
                key = None if t.input_size == self.config["crop_size"] else t.input_size
                if key not in deepest:
                    deepest[key] = self.encoder(_resize(x, (key, key), align_corners=True))[-1]
                # The translator (an MLP) runs token-wise on the student's own grid, as the reference's;
                # its output is resized to the teacher's grid for distillation (a no-op at the crop
                # size, where the grids agree).
                g = deepest[key]
                tokens = self.translators[t.name](g.flatten(2).transpose(1, 2))
                grid_map = tokens.transpose(1, 2).reshape(x.shape[0], -1, *g.shape[-2:])
                translated[t.name] = _resize(grid_map, (t.grid, t.grid), align_corners=False).flatten(2).transpose(1, 2)
                # Projecting before resizing to f's grid equals the reference's resize-then-project:
                # both maps are linear and bilinear weights sum to one (bias included).
                projected = self.projections[t.name](tokens).transpose(1, 2).reshape(x.shape[0], -1, *g.shape[-2:])
                fused = fused + _resize(projected, tuple(f.shape[-2:]), align_corners=True)
            feats[-1] = self.w_self * f + self.w_teacher * fused
        logits = _resize(self.head(feats), tuple(x.shape[-2:]), align_corners=True)
        return StudentOutput(logits, translated)
