"""Recipes: one TOML file per dataset/protocol under `pipeline/`, over defaults that are the paper's.

The schema is the section dataclasses below, read top to bottom: each field's annotation is the
type a value must have (exactly: `2.7` is not an integer, `"no"` is not a boolean, a string is not
a list), and its `rule` the range it must be in. A value is checked when a TOML file is read and
when a command-line option overrides it (`Recipe.override`), so both fail in one line naming the
file or option, the key, the value and what is allowed (`schema`). Checks that need the student's
encoder built (a crop its patch divides) are the resolve layer's (`pipeline.resolve`).

A section is any frozen dataclass field of `Recipe`; adding one means adding a dataclass and a
field, nothing else. `to_dict`/`from_dict` turn a recipe into plain JSON/TOML-able data and back,
which is how caches and checkpoints carry it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

from ..cache.storage import STORAGES
from ..data.datasets import DATASETS
from ..errors import RsmtdfError
from ..models.teachers import teacher_config
from ..transforms.views import ViewSpec
from ..utils.files import parse_file
from .schema import (BAND_INDICES, HEX_COLOURS, MASK_CODES, NONEMPTY_UNIQUE, ORDERED_RANGE, POSITIVE_SIZES,
                     PROBABILITY, RGB_BANDS, RGB_VALUES, Rule, above, as_typed, at_least, checked, key, show_toml)

DatasetName = Literal[tuple(DATASETS)]  # the registry's names: defined once, in `data.datasets`
Storage = Literal[STORAGES]


# ---- the schema ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    dataset: DatasetName = key("loveda")
    root: str = key("data/LoveDA", doc="dataset folder")
    splits: str | None = key(None, doc="split-list folder [default: pipeline/splits/<dataset>]")
    classes: tuple[str, ...] = key((), doc="class names of a `folder` dataset, in class-index order")
    codes: dict[str, int | tuple[int, ...]] = key({}, MASK_CODES, doc="a folder's raw mask code(s) per class "
                                                  "[default: 0..K-1 and nothing else]")
    colors: dict[str, tuple[int, int, int]] = key({}, RGB_VALUES, doc="a folder's mask colour per class (RGB masks)")
    ignore_codes: tuple[int, ...] = key((), Rule(lambda v: all(c >= 0 for c in v), "of codes >= 0"),
                                        doc="a folder's mask codes meaning 'no label' (ignored by losses and metrics)")
    palette: dict[str, str] = key({}, HEX_COLOURS, doc='display colour per class, "#rrggbb" '
                                  "[default: the dataset's official colours, else tab20]")
    bands: tuple[int, int, int] = key((0, 1, 2), RGB_BANDS, doc="raster bands shown as RGB")
    max_value: float | None = key(None, above(0), doc="value of full brightness [default: the dtype's range]")
    tile_size: int | None = key(None, at_least(1), doc="cut each scene into tiles of this many px, read by window "
                                "[default: one sample per file]")
    tile_stride: int | None = key(None, at_least(1), doc="px from one tile to the next [default: tile_size]")
    scaling: Literal["auto", "dtype", "max_value", "percentile"] = key(
        "auto", doc="how bands reach [0, 1]: auto = max_value if set, else the 2-98 % stretch of `rsmtdf stats` "
                    "for data that is not 8-bit, else the dtype's range")


@dataclass(frozen=True)
class ViewsConfig:
    count: int = key(8, at_least(1), doc="A stored views per sample")
    crop_size: int = key(518, at_least(1), doc="view crop in pixels; a multiple of the student's patch")
    scale_range: tuple[float, float] = key((0.5, 2.0), ORDERED_RANGE, doc="resize factors drawn from")
    hflip: bool = key(True)
    rot90: bool = key(False)
    seed: int = key(0)


@dataclass(frozen=True)
class TeachersConfig:
    names: tuple[str, ...] = key(("dinov2_vitb14", "clip_vitl14"), NONEMPTY_UNIQUE,
                                 doc="registry names or timm:MODEL[@SIZE][/LAYER]")
    storage: Storage = key("float16", doc="how targets are stored: float16, int8, int4 (group-wise), pca (a quarter "
                                          "of float16) or auto (the fewest bytes meeting min_cosine)")
    group_size: int = key(16, Rule(lambda v: v >= 2 and v % 2 == 0, "that is even and >= 2"),
                          doc="channels sharing one int4 scale (int4, auto)")
    min_cosine: float = key(0.0, PROBABILITY, doc="floor on each shard's mean token cosine of the stored targets "
                            "to the full-precision ones (0 = none; auto's default 0.99)")
    probe_samples: int = key(8, at_least(1), doc="samples (spread over the ids) whose targets fit pca's basis and measure auto's choice")
    sizes: dict[str, int] = key({}, POSITIVE_SIZES, doc="input size per teacher [default: the teacher's own]")


@dataclass(frozen=True)
class StudentConfig:
    encoder: str = key("vit_small_patch14_dinov2.lvd142m", doc="a timm model name")
    decoder: Literal["small", "base"] = key("small")
    fusion_weights: tuple[float, float] = key((0.8, 0.1), doc="[self, teacher] weights of the fused feature")
    translator_hidden: int = key(1024, at_least(1))
    pretrained: bool | str = key(True, doc="true, false or a weights file")
    kwargs: dict[str, Any] = key({}, doc="extra timm.create_model arguments")
    bands: tuple[int, ...] = key((), BAND_INDICES, doc="raster bands the student sees [default: [data] bands]; "
                                 "must include those, which come first")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(60, at_least(1))
    batch_size: int = key(8, at_least(1), doc="labeled (and as many unlabeled) samples per micro-batch, per process")
    accumulate: int = key(1, at_least(1), doc="micro-batches per optimiser step (gradient accumulation): the "
                          "step's batch is batch_size × accumulate per process")
    global_batch: int | None = key(None, at_least(1), doc="labeled samples per optimiser step over all processes "
                                   "(the paper: 32); sets accumulate = global_batch / (batch_size × processes)")
    lr: float = key(5e-6, above(0), doc="encoder learning rate")
    head_lr_multiplier: float = key(40.0, above(0))
    weight_decay: float = key(0.01, at_least(0))
    poly_power: float = key(0.9, at_least(0))
    conf_thresh: float = key(0.95, PROBABILITY)
    ema_momentum: float = key(0.996, PROBABILITY)
    distill_loss: Literal["mse", "cosine"] = key("mse")
    workers: int = key(2, at_least(0), doc="loader processes per rank")
    decoded_cache_mb: int = key(1024, at_least(0), doc="decoded tiles each loader worker keeps, so tiles are not "
                                                         "decoded again each epoch (MB; 0 = off)")
    eval_every: int = key(1, at_least(1), doc="epochs between evaluations")
    eval_mode: Literal["whole", "sliding"] = key("whole")
    seed: int = key(0)
    max_steps: int | None = key(None, at_least(1), doc="stop the schedule after this many steps")


@dataclass(frozen=True)
class EvalConfig:
    protocol: Literal["rsmtdf", "reference"] = key("rsmtdf", doc="`rsmtdf evaluate`'s protocol; `--protocol` overrides")
    scored_classes: tuple[str, ...] = key((), doc="classes in the means under `rsmtdf` ([] = all)")
    reference_scored_classes: tuple[str, ...] = key((), doc="classes the reference's eval script scores ([] = all)")


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: one frozen section per TOML table, plus where each value came from."""

    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = field(default="recipe defaults", compare=False)
    origins: dict[str, str] = field(default_factory=dict, compare=False)  # "views.count" -> "--views"

    # -- reading and writing --

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Recipe:
        """Check every value of `data` (TOML tables) against the schema; unknown keys are refused."""
        if not isinstance(data, dict):
            raise RsmtdfError(f"{source}: expected a table of recipe sections")
        sections = _sections()
        for name in data:
            if name not in sections:
                raise RsmtdfError(f"{source}: unknown recipe section [{name}] (known: {', '.join(sections)})")
        parts = {}
        for name, section_cls in sections.items():
            given = data.get(name, {})
            if not isinstance(given, dict):
                raise RsmtdfError(f"{source}: {name} = {show_toml(given)}: expected a [{name}] table")
            known = {f.name for f in fields(section_cls)}
            for k in given:
                if k not in known:
                    raise RsmtdfError(f"{source}: [{name}] {k}: unknown key (known: {', '.join(sorted(known))})")
            hints = get_type_hints(section_cls)
            parts[name] = section_cls(**{k: checked(v, hints[k], _rule(section_cls, k), f"{source}: [{name}] {k}")
                                         for k, v in given.items()})
        recipe = cls(**parts, source=source)
        if recipe.data.splits is None:
            recipe = dataclasses.replace(recipe, data=dataclasses.replace(
                recipe.data, splits=f"pipeline/splits/{recipe.name}"))
        return recipe.check()

    @property
    def name(self) -> str:
        """What default split and cache paths are named after: a known dataset's name, a `folder`
        recipe's file name (`pipeline/mine.toml` → `mine`), so two folder datasets never collide."""
        if self.data.dataset == "folder" and self.source.endswith(".toml"):
            return Path(self.source).stem
        return self.data.dataset

    def to_dict(self) -> dict:
        """Plain data (lists, dicts, no None: TOML has no null) that `from_dict` reads back."""
        out = {}
        for name in _sections():
            d = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if v is not None}
        return out

    def to_toml(self) -> str:
        """The resolved recipe as TOML that `load_recipe` reads back to an equal recipe."""
        lines = []
        for name, values in self.to_dict().items():
            lines += [f"[{name}]", *(f"{k} = {show_toml(v)}" for k, v in values.items()), ""]
        return "\n".join(lines)

    # -- overrides --

    def override(self, values: dict[str, Any], origin: dict[str, str] | None = None) -> Recipe:
        """A copy with `"section.key": value` pairs replaced (None values skipped), each checked as a
        file value is; `origin` names the option that gave each key, for the error line."""
        recipe, origin = self, origin or {}
        for dotted, value in values.items():
            if value is None:
                continue
            name, _, k = dotted.partition(".")
            section = getattr(recipe, name) if name in _sections() else None
            if section is None or k not in {f.name for f in fields(section)}:
                raise RsmtdfError(f"{origin.get(dotted, f'--set {dotted}')}: unknown recipe key '{dotted}'")
            where = f"{origin[dotted]} {as_typed(value)}" if dotted in origin else f"--set {dotted}={show_toml(value)}"
            hints = get_type_hints(type(section))
            value = checked(value, hints[k], _rule(type(section), k), where, option=True)
            recipe = dataclasses.replace(recipe, **{name: dataclasses.replace(section, **{k: value})},
                                         origins={**recipe.origins, dotted: where})
        return recipe.check()

    def where(self, dotted: str) -> str:
        """How an error names a key: the option that set it, or the file and the key = value."""
        name, _, k = dotted.partition(".")
        value = getattr(getattr(self, name), k)
        if dotted in self.origins:
            return self.origins[dotted]
        return f"{self.source}: [{name}] {k} = {show_toml(value)}"

    # -- checks across keys --

    def check(self) -> Recipe:
        """Checks that involve more than one value or a registry; returns self."""
        for name in self.teachers.names:
            try:
                teacher_config(name)
            except RsmtdfError as exc:
                raise RsmtdfError(f"{self.where('teachers.names')}: {exc}") from None
        if self.data.dataset == "folder" and not self.data.classes:
            raise RsmtdfError(f"{self.where('data.classes')}: dataset 'folder' needs its class names")
        self._check_class_table()
        d = self.data
        if d.tile_stride is not None and d.tile_size is None:
            raise RsmtdfError(f"{self.where('data.tile_stride')}: needs [data] tile_size")
        if d.tile_stride is not None and d.tile_stride > d.tile_size:
            raise RsmtdfError(f"{self.where('data.tile_stride')}: expected at most tile_size ({d.tile_size}); "
                              f"a longer stride leaves pixels out of every tile")
        if d.dataset == "loveda" and {d.tile_size, d.tile_stride} - {None, 512}:
            k = "data.tile_size" if d.tile_size not in (None, 512) else "data.tile_stride"
            raise RsmtdfError(f"{self.where(k)}: LoveDA's protocol cuts its scenes into 512 px tiles; "
                              f"leave tile_size and tile_stride unset")
        return self

    def _check_class_table(self) -> None:
        """Class-table keys name classes of the dataset; a folder's codes and colours are each one
        class's, and once codes are given every class has one (else it could never be labeled)."""
        d = self.data
        names = d.classes if d.dataset == "folder" else DATASETS[d.dataset].classes.names
        for k in ("codes", "colors", "ignore_codes"):
            if getattr(d, k) and d.dataset != "folder":
                raise RsmtdfError(f"{self.where('data.' + k)}: dataset '{d.dataset}' has its own class table; "
                                  f"only a `folder` dataset takes codes, colors and ignore_codes")
        for k in ("codes", "colors", "palette"):
            for name in getattr(d, k):
                if name not in names:
                    raise RsmtdfError(f"{self.where('data.' + k)}: '{name}' is not a class ({', '.join(names)})")
        seen: dict[int, str] = {}
        for name, given in d.codes.items():
            for code in (given,) if isinstance(given, int) else given:
                if code in seen:
                    raise RsmtdfError(f"{self.where('data.codes')}: code {code} is given to both '{seen[code]}' and '{name}'")
                seen[code] = name
        for code in d.ignore_codes:
            if code in seen:
                raise RsmtdfError(f"{self.where('data.ignore_codes')}: code {code} is also class '{seen[code]}'")
        if d.codes or d.colors:
            unlabeled = [n for n in names if n not in d.codes and n not in d.colors]
            if unlabeled:
                key = "data.codes" if d.codes else "data.colors"
                raise RsmtdfError(f"{self.where(key)}: class '{unlabeled[0]}' has no code or colour, "
                                  f"so no pixel could ever be labeled with it")

    def teacher_sizes(self) -> dict[str, int]:
        """Each teacher's input size: the recipe's `sizes`, else the teacher's own."""
        return {n: self.teachers.sizes.get(n) or teacher_config(n).input_size for n in self.teachers.names}

    def view_spec(self) -> ViewSpec:
        v = self.views
        return ViewSpec(v.count, v.crop_size, tuple(v.scale_range), v.hflip, v.rot90, v.seed)


def load_recipe(path: str | Path | None, sets: list[str] | None = None) -> Recipe:
    """The recipe at `path` (defaults for keys it leaves out; None gives the defaults) with the
    `--set section.key=value` overrides `sets` applied, all checked."""
    if path is None:
        recipe = Recipe.from_dict({}, "recipe defaults")
    else:
        path = Path(path)
        recipe = Recipe.from_dict(parse_file(path, tomllib.loads, "TOML", "recipe not found"), str(path))
    return recipe.override(parse_sets(sets)) if sets else recipe


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set section.key=value` items as {"section.key": value}. A value is read as TOML (`3`,
    `true`, `[1, 2]`, `"x"`), or taken as a plain string where it is not TOML (`data.root=/data/x`)."""
    out = {}
    for item in items:
        dotted, sep, text = item.partition("=")
        if not sep or "." not in dotted:
            raise RsmtdfError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. --set train.lr=1e-5")
        try:
            out[dotted.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[dotted.strip()] = text
    return out


def recipe_from_json(text: str, source: str) -> Recipe:
    """A recipe stored in a checkpoint (JSON of `to_dict`), checked like a file."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        raise RsmtdfError(f"{source}: its recipe is not readable JSON") from None
    return Recipe.from_dict(data, f"{source} (its recipe)")


def _sections() -> dict[str, type]:
    hints = get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in fields(Recipe) if dataclasses.is_dataclass(hints[f.name])}


def _rule(section_cls: type, name: str) -> Rule | None:
    return next(f.metadata.get("rule") for f in fields(section_cls) if f.name == name)


